"""Approximate online estimators against exact RTRL and BPTT: SnAp-1/2, UORO, KF-RTRL, e-prop, RFLO (float64, random).

Several estimators of one problem are compiled as one program, with the cheap code generation tests/conftest.py
asks XLA for, since compilation dominates these tests.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbptt
from jbptt import cells, losses
from jbptt.estimators.bptt import reference_gradient
from jbptt.estimators.online import unit_rows
from jbptt.testing import random_problem

TOL = 1e-10


def relative_error(estimate, reference):
    """``||estimate - reference|| / ||reference||`` over whole pytrees, on the host (no eager ops to compile)."""
    flat = lambda tree: np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree.leaves(tree)])
    return np.linalg.norm(flat(estimate) - flat(reference)) / np.linalg.norm(flat(reference))

ELMAN = cells.with_readout(cells.elman(5), 2)
LSTM = cells.with_readout(cells.lstm(3), 2)


def problem(cell, key=None, **options):
    """``(params, batch)`` of :func:`jbptt.testing.random_problem` for ``cell`` as it is (no readout added)."""
    key = jax.random.key(0) if key is None else key
    options = {"B": 2, "T": 8, "input_size": 3, **options}
    _, params, batch = random_problem(cell, key, output_size=cell.output_size, **options)
    return params, batch


def gradients(cell, params, batch, *specs):
    """Gradients of several estimators ``(name, options)`` (``"bptt_reference"``: the plain reference) from fresh
    states on one problem, compiled as one program (``init`` included: its eager checks are tested on their own)."""
    ests = [None if name == "bptt_reference" else jbptt.make_estimator(name, cell, losses.mse, **options)
            for name, options in specs]

    def run(p, b):
        c = cell.initial_carry(p, (b.inputs.shape[0],))
        return [reference_gradient(cell, losses.mse, p, b)[1] if est is None else
                est.update(p, est.init(p, c, inputs=b.inputs), b)[1] for est in ests]

    return jax.jit(run)(params, batch)


def test_registered_names():
    for name in ("rtrl", "snap", "snap1", "snap2", "uoro", "eprop", "rflo", "kfrtrl"):
        jbptt.make_estimator(name, ELMAN, losses.mse)


DIAGONAL = [
    ("indrnn", cells.with_readout(cells.indrnn(4, activation="tanh"), 2)),
    ("lru_real", cells.diagonal_linear(4, 2, complex_valued=False)),
    ("lru_complex", cells.diagonal_linear(4, 3)),
]


@pytest.mark.parametrize("name,cell", DIAGONAL, ids=[c[0] for c in DIAGONAL])
def test_snap1_equals_rtrl_on_diagonal_cells(name, cell, key):
    params, batch = problem(cell, key, resets=True)
    g_rtrl, g_snap1 = gradients(cell, params, batch, ("rtrl", {}), ("snap1", {}))
    assert float(relative_error(g_snap1, g_rtrl)) <= TOL


def test_snap2_equals_rtrl_on_dense_elman_and_snap1_does_not(key):
    params, batch = problem(ELMAN, key, lengths=True)
    g_rtrl, g_snap2, g_snap1 = gradients(ELMAN, params, batch, ("rtrl", {}), ("snap2", {}), ("snap1", {}))
    assert float(relative_error(g_snap2, g_rtrl)) <= TOL
    assert float(relative_error(g_snap1, g_rtrl)) > 1e-3


def test_compressed_estimators_are_exact_on_an_esn(key):
    """An ESN trains only its readout: no parameter drives a unit, the compressed influence is empty (``[0, N]``
    rows) and SnAp-1 / KF-RTRL / e-prop return the exact gradient."""
    cell = cells.with_readout(cells.esn(4, density=1.0), 2)
    params, batch = problem(cell, key, resets=True)
    assert unit_rows(cell, params).idx.shape == (0, 4)
    g_ref, *gs = gradients(cell, params, batch, ("bptt_reference", {}), ("snap1", {}), ("kfrtrl", {}),
                           ("eprop", {}))
    for g in gs:
        assert float(relative_error(g, g_ref)) <= TOL


@pytest.mark.slow
def test_snap_n1_masked_equals_snap1_compressed_on_indrnn(key):
    """The masked dense SnAp-1 and the compressed SnAp-1 are the same algorithm (element-wise cell: both exact)."""
    cell = DIAGONAL[0][1]
    params, batch = problem(cell, key)
    g1, g_n1 = gradients(cell, params, batch, ("snap1", {}), ("snap", {"n": 1}))
    assert float(relative_error(g_n1, g1)) <= TOL


@pytest.mark.parametrize("name,cell", [
    ("uoro", cells.with_readout(cells.learned_initial_carry(cells.elman(3)), 2)),
    ("kfrtrl", cells.with_readout(cells.elman(3), 2)),
], ids=["uoro", "kfrtrl"])
def test_stochastic_estimators_are_unbiased(name, cell, key):
    """The mean of K independent estimates (one ``init`` key each) converges to BPTT: ||mean - g||^2 is compared
    with its expected value tr(Cov)/K estimated from the sample variance (E[ratio] = 1; a biased estimator fails
    because its bias does not shrink with K: scaling UORO's rank-one trace by 0.9 gives a ratio of ~11 here)."""
    params, batch = problem(cell, key, B=1, T=6, input_size=2)
    est = jbptt.make_estimator(name, cell, losses.mse)
    carry = cell.initial_carry(params, (1,))
    est.init(params, carry, inputs=batch.inputs)  # eager once: runs the estimator's own checks
    flat = lambda g: jnp.concatenate([a.ravel() for a in jax.tree.leaves(g)])

    @jax.jit
    def many(keys):
        one = lambda k: flat(est.update(params, est.init(params, carry, key=k, inputs=batch.inputs), batch)[1])
        return jax.vmap(one)(keys), flat(reference_gradient(cell, losses.mse, params, batch)[1])

    K = 4000
    samples, g_ref = map(np.asarray, many(jax.random.split(key, K)))
    mean = samples.mean(0)
    expected_sq = np.sum(samples.var(0, ddof=1)) / K
    ratio = float(np.sum((mean - g_ref) ** 2) / expected_sq)
    assert ratio < 3.0, ratio
    assert float(np.linalg.norm(samples[0] - g_ref) / np.linalg.norm(g_ref)) > 0.05  # one estimate is noisy


def test_cell_checks_run_in_init(key):
    """Estimators defined only for some cells refuse the others in ``init`` (eagerly, on the example inputs they
    need): KF-RTRL needs a rank-one immediate influence and a fixed initial carry, e-prop a readout of ``h``."""
    cases = [("kfrtrl", cells.lstm(3), "single-component"), ("kfrtrl", cells.indrnn(3), "factorises"),
             ("kfrtrl", cells.learned_initial_carry(cells.elman(3)), "learned initial carry"),
             ("eprop", cells.diagonal_linear(3, 2), "readout")]
    for name, cell, match in cases:
        params, batch = problem(cell, key, T=2)
        est = jbptt.make_estimator(name, cell, losses.mse)
        carry = cell.initial_carry(params, (2,))
        with pytest.raises(ValueError, match=match):
            est.init(params, carry, inputs=batch.inputs)
        with pytest.raises(ValueError, match="inputs="):
            est.init(params, carry)


@functools.cache
def local_rule_problems(name):
    """The T=1 and T=12 problems of ``ELMAN`` / ``LSTM`` and their references."""
    cell = {"elman": ELMAN, "lstm": LSTM}[name]
    params, batch = problem(cell, T=12)
    one = batch._replace(inputs=batch.inputs[:, :1], targets=batch.targets[:, :1])
    refs = jax.jit(lambda p, b1, b: (reference_gradient(cell, losses.mse, p, b1)[1],
                                 reference_gradient(cell, losses.mse, p, b)[1]))(params, one, batch)
    return cell, params, one, batch, refs


@pytest.mark.parametrize("name,cell_name,options", [
    ("eprop", "elman", {}),
    ("eprop", "lstm", {}),
    ("rflo", "elman", {"feedback": "symmetric"}),
    pytest.param("rflo", "elman", {"feedback": "symmetric", "leak": 0.3}, marks=pytest.mark.slow),
], ids=["eprop_elman", "eprop_lstm", "rflo_elman", "rflo_leaky"])
def test_local_rules_equal_bptt_for_one_step_and_differ_over_many(name, cell_name, options):
    cell, params, one, batch, (g_ref_one, g_ref) = local_rule_problems(cell_name)
    (g_one,) = gradients(cell, params, one, (name, options))
    assert float(relative_error(g_one, g_ref_one)) <= TOL
    (g,) = gradients(cell, params, batch, (name, options))
    assert float(relative_error(g, g_ref)) > 1e-3


def test_rflo_random_feedback_only_changes_the_recurrent_part():
    """With random feedback the readout gradient stays exact and the recurrent gradient changes."""
    _, params, one, _, (g_ref, _) = local_rule_problems("elman")
    (g,) = gradients(ELMAN, params, one, ("rflo", {}))
    assert float(relative_error(g["readout"], g_ref["readout"])) <= TOL
    assert float(relative_error(g["core"], g_ref["core"])) > 1e-2


def test_eprop_keeps_the_lstm_cell_state_trace():
    """e-prop on an LSTM carries the eligibility through c (the forget gate): with it the estimate is closer to
    BPTT than with no internal component (``internal=()``, the purely immediate rule)."""
    _, params, _, batch, (_, g_ref) = local_rule_problems("lstm")
    g_c, g_none = gradients(LSTM, params, batch, ("eprop", {}), ("eprop", {"internal": ()}))
    assert float(relative_error(g_c, g_ref)) < float(relative_error(g_none, g_ref))


def test_online_estimators_run_stateful_under_jit(key):
    """Every online estimator continues from its state across segments under jit, with finite gradients."""
    params, batch = problem(ELMAN, key, T=8)
    carry = ELMAN.initial_carry(params, (2,))
    ests = [jbptt.make_estimator(name, ELMAN, losses.mse, stateful=True) for name in ("snap1", "uoro", "rflo")]
    states = [est.init(params, carry, inputs=batch.inputs) for est in ests]

    @jax.jit
    def twice(states):
        out = []
        for est, state in zip(ests, states, strict=True):
            _, g1, state = est.update(params, state, batch)
            _, g2, state = est.update(params, state, batch)
            out.append((g1, g2))
        return out

    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(twice(states)))
