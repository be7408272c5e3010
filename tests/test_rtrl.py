"""Exact RTRL against plain BPTT (float64, random inputs): every cell, stacks, both modes, the diagonal path.

Estimator and reference are compiled together, with the cheap code generation tests/conftest.py asks XLA for,
since compilation dominates these tests.
"""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import jbptt
from jbptt import cells, losses
from jbptt.estimators.bptt import reference_gradient
from jbptt.estimators.online import split_segment
from jbptt.estimators.rtrl import check_unit_structure, influence_bytes, rtrl
from jbptt.testing import random_problem

TOL = 1e-10


def relative_error(estimate, reference):
    """``||estimate - reference|| / ||reference||`` over whole pytrees, on the host (no eager ops to compile)."""
    flat = lambda tree: np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree.leaves(tree)])
    return np.linalg.norm(flat(estimate) - flat(reference)) / np.linalg.norm(flat(reference))


def problem(cell, key, **options):
    """``(params, batch)`` of :func:`jbptt.testing.random_problem` for ``cell`` as it is (no readout added)."""
    options = {"B": 2, "T": 8, "input_size": 3, **options}
    _, params, batch = random_problem(cell, key, output_size=cell.output_size, **options)
    return params, batch


def against_reference(est, cell, loss_fn, params, batch):
    """``((loss, grads) of est from a fresh state, (loss, grads) of the plain reference)``, compiled as one program
    (``init`` included: its eager checks are tested on their own)."""

    def both(p, b):
        state = est.init(p, cell.initial_carry(p, (b.inputs.shape[0],)), inputs=b.inputs)
        return est.update(p, state, b)[:2], reference_gradient(cell, loss_fn, p, b)

    return jax.jit(both)(params, batch)


CELLS = [
    ("elman", cells.with_readout(cells.elman(5), 2), {}),
    ("elman_jvp", cells.with_readout(cells.elman(5), 2), {"mode": "jvp"}),
    ("lstm", cells.lstm(4), {}),
    ("gru", cells.with_readout(cells.gru(4), 2), {}),
    ("lru_complex_diag", cells.diagonal_linear(4, 3), {"diagonal": True}),
    ("stack", cells.stack([cells.lstm(3), cells.diagonal_linear(3, 3), cells.indrnn(3)], residual=True), {}),
    ("stack_jvp", cells.with_readout(cells.stack([cells.gru(3), cells.elman(2)]), 2), {"mode": "jvp"}),
    ("learned_carry_lstm", cells.with_readout(cells.learned_initial_carry(cells.lstm(3)), 2), {}),
    ("indrnn_diag_learned_carry", cells.with_readout(cells.learned_initial_carry(cells.indrnn(3, activation="tanh")),
                                                     2), {"diagonal": True}),
    ("esn_readout_flax_gru", cells.stack([cells.esn(5, density=0.5),
                                          cells.from_flax(nn.GRUCell(features=2, param_dtype=jnp.float64))]), {}),
]


@pytest.mark.parametrize("name,cell,options", CELLS, ids=[c[0] for c in CELLS])
def test_rtrl_equals_bptt(name, cell, options, key):
    """Exact RTRL == BPTT with variable lengths, episode resets and a loss mask, on random inputs."""
    params, batch = problem(cell, key, lengths=True, resets=True, mask=True)
    (loss, g), (loss_ref, g_ref) = against_reference(rtrl(cell, losses.mse, **options), cell, losses.mse, params,
                                                     batch)
    assert abs(float(loss - loss_ref)) <= TOL * abs(float(loss_ref))
    assert float(relative_error(g, g_ref)) <= TOL


def test_rtrl_dense_elman_n32_t50(key):
    """The issue's headline check: dense Elman n=32, T=50 (with a readout, cross-entropy over 3 classes)."""
    cell = cells.with_readout(cells.elman(32), 3)
    _, params, batch = random_problem(cell, key, B=2, T=50, input_size=4, output_size=3, loss=losses.cross_entropy)
    (_, g), (_, g_ref) = against_reference(rtrl(cell, losses.cross_entropy), cell, losses.cross_entropy, params,
                                           batch)
    assert float(relative_error(g, g_ref)) <= TOL


def test_rtrl_under_jit_and_online_chunks(key):
    """jit gives the same gradient; splitting the segment into online chunks (stateful carry + influence) and
    weighting each chunk's gradient by its share of the loss weights recovers the whole-sequence gradient."""
    cell = cells.with_readout(cells.gru(3), 2)
    params, batch = problem(cell, key, T=9, mask=True, resets=True)
    est = rtrl(cell, losses.mse, stateful=True)
    (_, g_jit), (_, g_ref) = against_reference(est, cell, losses.mse, params, batch)
    assert float(relative_error(g_jit, g_ref)) <= TOL
    total = jnp.sum(batch.weights(jnp.float64))
    state = est.init(params, cell.initial_carry(params, (2,)), inputs=batch.inputs)
    acc = jax.tree.map(jnp.zeros_like, params)
    update = jax.jit(est.update)
    for chunk in split_segment(batch, 3):
        _, g, state = update(params, state, chunk)
        share = jnp.sum(chunk.weights(jnp.float64)) / total
        acc = jax.tree.map(lambda a, b, s=share: a + s * b, acc, g)
    assert float(relative_error(acc, g_ref)) <= TOL


def test_rtrl_trains_online(key):
    """Online learning with an optimizer update every 4 steps through the ordinary train step."""
    cell = cells.with_readout(cells.elman(4), 1)
    params, batch = problem(cell, key, B=4, T=40, input_size=2)
    batch = batch._replace(targets=jnp.roll(batch.inputs[..., :1], 1, axis=1))  # recall the previous input
    est = jbptt.make_estimator("rtrl", cell, losses.mse, stateful=True)
    opt = optax.adam(3e-2)
    state = jbptt.train.init_train_state(est, opt, params, cell.initial_carry(params, (4,)), inputs=batch.inputs)
    step = jax.jit(jbptt.train.make_train_step(est, opt))
    losses_seen = []
    for _ in range(5):
        for chunk in split_segment(batch, 4):
            state, metrics = step(state, chunk)
            losses_seen.append(float(metrics["loss"]))
    assert all(np.isfinite(losses_seen))
    assert sum(losses_seen[-10:]) < 0.7 * sum(losses_seen[:10])


def test_influence_size_error_suggests_approximation():
    cell = cells.elman(16)
    params = jax.eval_shape(lambda k: cell.init(k, 8), jax.random.key(0))  # the guard reads shapes only
    carry = jax.ShapeDtypeStruct((4, 16), jnp.float32)
    nbytes = influence_bytes(cell, params, 4)
    assert nbytes == 4 * (16 * 16 + 8 * 16 + 16) * 16 * 4
    est = rtrl(cell, losses.mse, max_influence_bytes=nbytes - 1)
    with pytest.raises(ValueError, match=r"(?s)influence matrix.*bytes.*snap1"):
        jax.eval_shape(lambda p, c: est.init(p, c), params, carry)
    jax.eval_shape(lambda p, c: rtrl(cell, losses.mse, max_influence_bytes=nbytes).init(p, c), params, carry)
    with pytest.raises(ValueError, match="mode must be"):
        rtrl(cell, losses.mse, mode="forward")


def test_diagonal_path_rejects_dense_cells(key):
    """``rtrl(diagonal=True)`` checks the cell in ``init`` (eagerly, on an example input it needs)."""
    cell = cells.elman(4)
    params, batch = problem(cell, key)
    with pytest.raises(ValueError, match="element-wise"):
        check_unit_structure(cell, params, batch.inputs[0, 0])
    est = rtrl(cell, losses.mse, diagonal=True)
    carry = cell.initial_carry(params, (2,))
    with pytest.raises(ValueError, match="element-wise"):
        est.init(params, carry, inputs=batch.inputs)
    with pytest.raises(ValueError, match="inputs="):
        est.init(params, carry)
    check_unit_structure(cells.indrnn(4), problem(cells.indrnn(4), key)[0], batch.inputs[0, 0])


@pytest.mark.parametrize("seed", [0, 1])
def test_diagonal_check_sees_couplings_hidden_at_one_point(seed):
    """A ReLU Elman cell whose units are inactive at most points (bias -3) is still refused: the check unions the
    carry Jacobian over several probe points (one random point, as before, saw no coupling at these seeds)."""
    cell = cells.elman(3, activation="relu", recurrent_init="identity")
    _, params, batch = random_problem(cell, jax.random.key(seed), B=1, T=1, input_size=2, output_size=3)
    params = {**params, "b": params["b"] - 3.0}
    with pytest.raises(ValueError, match="element-wise"):
        check_unit_structure(cell, params, batch.inputs[0, 0], key=jax.random.key(seed))


def test_diagonal_influence_is_linear_in_n():
    """The compressed influence of an element-wise cell holds O(P) numbers, not O(P n)."""
    for n in (8, 64):
        cell = cells.indrnn(n)
        params = jax.eval_shape(lambda k, c=cell: c.init(k, 2), jax.random.key(0))
        assert influence_bytes(cell, params, 1, diagonal=True) == (2 + 1 + 1) * n * 4
        assert influence_bytes(cell, params, 1) == (2 + 1 + 1) * n * n * 4
