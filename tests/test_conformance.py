"""Conformance: every registered estimator x every cell of the zoo, float64, against the plain BPTT reference.

One problem per cell carries every variant at once: sequence lengths, episode resets and a loss mask (the zoo has
cells with a learned initial carry, plain and fused). Exact estimators must equal
:func:`jbptt.estimators.bptt.reference_gradient` (which scans the plain step) to 1e-10 in loss and gradient; the
approximate ones must return finite gradients with the params' structure, shapes and dtypes. A combination is
skipped only where the algorithm is undefined for the cell: there ``init`` must refuse it, and the skip says why.
Everything runs under strict dtype promotion. The default run covers every estimator on three cells; ``-m slow``
adds the rest of the zoo.

Compilation dominates the run time, so the problems are tiny, each reference is computed once per cell, each
estimator's update is compiled once per combination, and the jitted combinations are compiled with the cheap code
generation tests/conftest.py asks XLA for.
"""

import functools
from typing import NamedTuple

import chex
import jax
import pytest

import jbptt
from jbptt import losses
from jbptt.diagnostics import relative_error
from jbptt.estimator import ESTIMATORS
from jbptt.estimators.bptt import reference_gradient
from jbptt.testing import ZooCell, random_problem, zoo

TOL = 1e-10
T = 5
LOSS = losses.mse
ZOO = {z.name: z for z in zoo(hidden=3)}



class Case(NamedTuple):
    """An estimator configuration: registered ``name`` built with ``options``; ``id`` names it in test ids."""

    id: str
    name: str
    options: dict


# Extra configurations of some registered estimators; every other one runs with its defaults.
CASES = {
    "tbptt": [Case("tbptt", "tbptt", {"k1": T, "k2": T})],
    "rtrl": [Case("rtrl", "rtrl", {}), Case("rtrl_diagonal", "rtrl", {"diagonal": True})],
    "snap": [Case("snap_n1", "snap", {"n": 1})],  # the default n=2 is the registered snap2
}


def jbptt_estimators() -> list[str]:
    """The estimators jbptt itself registers (``import jbptt`` registers them)."""
    return sorted(n for n, f in ESTIMATORS.items() if f.__module__.startswith("jbptt."))


def cases() -> list[Case]:
    return [c for n in jbptt_estimators() for c in CASES.get(n, [Case(n, n, {})])]


def undefined(case: Case, z: ZooCell) -> str | None:
    """Why ``case`` is undefined on ``z`` (the skip reason), or None."""
    if case.id == "rtrl_diagonal" and not z.elementwise:
        return "rtrl(diagonal=True) is exact RTRL for element-wise recurrences only; this cell couples its units"
    if case.name == "kfrtrl" and not z.rank_one:
        return ("kfrtrl needs a rank-one immediate influence a ⊗ psi (an Elman-type cell h' = f([x, h, 1] W)); "
                "this cell's does not factorise")
    if case.id == "snap1" and z.name in ("stack", "fused_stack_learned_carry"):
        return ("snap1's compressed per-unit layout needs every parameter to drive its own unit only; in a stack a "
                "layer's parameters drive the next layer's units within the same step (snap with n=1 is SnAp-1 here)")
    if case.name in ("eprop", "rflo") and not z.reads_h:
        return (f"{case.name}'s learning signal dl/dh needs the output to be a readout of the carry's first "
                "component h; this cell's output is not")
    return None


def exact(case: Case, z: ZooCell) -> bool:
    """Whether ``case`` must equal the reference on ``z`` (to ``TOL``)."""
    if case.id in ("bptt", "tbptt", "rtrl", "rtrl_diagonal"):
        return True
    if case.id in ("snap1", "snap_n1"):
        return z.elementwise or z.name == "esn"
    if case.id == "snap2":
        # exact where the 2-step pattern covers the influence, as it does on the zoo's small dense and element-wise
        # cells (the ReLU cell included: snap unions the pattern over several probe points)
        return True
    if case.name in ("eprop", "rflo", "kfrtrl"):
        # an ESN trains only its readout, so no parameter drives a unit: the influence is empty and the gradient
        # is the readout's immediate one
        return z.name == "esn"
    return False


# The default run: every estimator on three cells that between them have every property an estimator depends on
# (Elman-type, element-wise, fused, stacked, learned initial carry). The whole zoo runs with ``-m slow``.
CORE = ("elman_tanh", "indrnn", "fused_stack_learned_carry")
# Also called without jit (as chex's ``without_jit`` variant does) on the BPTT family, where the learned-carry bug
# lived, on a learned-carry cell.
NOJIT = ("bptt", "tbptt")
NOJIT_CELL = "fused_stack_learned_carry"


def params_list():
    out = []
    for c in cases():
        for z in ZOO.values():
            marks = () if z.name in CORE else (pytest.mark.slow,)
            out.append(pytest.param(c, z, True, marks=marks, id=f"{c.id}-{z.name}-jit"))
            if c.id in NOJIT and z.name == NOJIT_CELL:
                out.append(pytest.param(c, z, False, id=f"{c.id}-{z.name}-nojit"))
    return out


def strict():
    """Strict dtype promotion (as equinox's tests run). Rank promotion stays allowed: every cell's step broadcasts
    its ``[H]`` biases over the leading batch dims by design."""
    return jax.numpy_dtype_promotion("strict")


@functools.cache
def problem(name: str):
    """``(model, params, batch, loss_ref, grads_ref)`` for zoo cell ``name`` (computed once per module)."""
    model, params, batch = random_problem(ZOO[name].cell, jax.random.key(3), B=2, T=T, lengths=True, resets=True,
                                          mask=True, loss=LOSS)
    with strict():
        ref = jax.jit(lambda p, b: reference_gradient(model, LOSS, p, b))
        loss_ref, grads_ref = ref(params, batch)
    return model, params, batch, loss_ref, grads_ref


@pytest.mark.parametrize("case,z,jit", params_list())
def test_estimator_conforms(case: Case, z: ZooCell, jit: bool):
    """``update`` from ``init`` equals the reference (exact estimators) or is a finite gradient of the params'
    structure (the others); where the algorithm is undefined for the cell, ``init`` refuses it."""
    model, params, batch, loss_ref, grads_ref = problem(z.name)
    est = jbptt.make_estimator(case.name, model, LOSS, **case.options)
    carry = model.initial_carry(params, (batch.inputs.shape[0],))
    reason = undefined(case, z)
    if reason is not None:
        with strict(), pytest.raises(ValueError):
            est.init(params, carry, key=jax.random.key(1), inputs=batch.inputs)
        pytest.skip(f"{reason} (init refuses it)")
    with strict():
        state = est.init(params, carry, key=jax.random.key(1), inputs=batch.inputs)
        update = jax.jit(est.update) if jit else est.update
        loss, grads, _ = update(params, state, batch)
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)
    chex.assert_tree_all_finite((loss, grads))
    if exact(case, z):
        assert abs(float(loss - loss_ref)) <= TOL * abs(float(loss_ref)), (float(loss), float(loss_ref))
        assert float(relative_error(grads, grads_ref)) <= TOL, float(relative_error(grads, grads_ref))


def test_every_case_names_a_registered_estimator():
    """The extra configurations above refer to registered estimators (a rename cannot drop them silently)."""
    assert set(CASES) <= set(jbptt_estimators())
    assert {"bptt", "tbptt", "rtrl", "snap1", "snap2", "uoro", "kfrtrl", "eprop", "rflo"} <= set(jbptt_estimators())
