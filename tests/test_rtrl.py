"""Exact RTRL against plain BPTT (float64, random inputs): every cell, stacks, both modes, the diagonal path."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import jbptt
from jbptt import cells, losses
from jbptt.diagnostics import relative_error
from jbptt.estimators.bptt import reference_gradient
from jbptt.estimators.online import split_segment
from jbptt.estimators.rtrl import check_unit_structure, influence_bytes, rtrl
from tests.helpers import init_f64

TOL = 1e-10


def random_problem(cell, key, *, B=2, T=12, I=3, lengths=False, resets=False, mask=False):
    """float64 params (perturbed so no parameter is exactly zero) and a random batch with optional extras."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())  # host RNG: nothing to compile
    params = jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape), init_f64(cell, key, I))
    batch = jbptt.Batch(
        jnp.asarray(rng.standard_normal((B, T, I))), jnp.asarray(rng.standard_normal((B, T, cell.output_size))),
        mask=jnp.asarray(rng.random((B, T)) < 0.7, jnp.float64) if mask else None,
        seq_lengths=jnp.asarray(rng.integers(T // 2, T + 1, (B,))) if lengths else None,
        resets=jnp.asarray(rng.random((B, T)) < 0.2) if resets else None)
    return params, batch


def gradient(est, cell, params, batch, carry=None):
    """``est.update`` from a fresh state (jitted: one compilation instead of op-by-op dispatch)."""
    B = batch.inputs.shape[0]
    carry = cell.initial_carry(params, (B,)) if carry is None else carry
    return jax.jit(est.update)(params, est.init(params, carry), batch)


def reference(cell, loss_fn, params, batch):
    """Plain BPTT (jitted)."""
    return jax.jit(lambda p, b: reference_gradient(cell, loss_fn, p, b))(params, batch)


CELLS = [
    ("elman", cells.with_readout(cells.elman(5), 2), {}),
    ("elman_jvp", cells.with_readout(cells.elman(5), 2), {"mode": "jvp"}),
    ("lstm", cells.lstm(4), {}),
    ("gru", cells.with_readout(cells.gru(4), 2), {}),
    ("lru_complex_diag", cells.diagonal_linear(4, 3), {"diagonal": True}),
    ("stack", cells.stack([cells.lstm(3), cells.diagonal_linear(3, 3), cells.indrnn(3)], residual=True), {}),
    ("stack_jvp", cells.with_readout(cells.stack([cells.gru(3), cells.elman(2)]), 2),
     {"mode": "jvp"}),
    ("learned_carry_lstm", cells.with_readout(cells.learned_initial_carry(cells.lstm(3)), 2), {}),
    ("indrnn_diag_learned_carry", cells.with_readout(cells.learned_initial_carry(cells.indrnn(3, activation="tanh")),
                                                     2), {"diagonal": True}),
    ("esn_readout_flax_gru", cells.stack([cells.esn(5, density=0.5),
                                          cells.from_flax(nn.GRUCell(features=2, param_dtype=jnp.float64))]), {}),
]


@pytest.mark.parametrize("name,cell,options", CELLS, ids=[c[0] for c in CELLS])
def test_rtrl_equals_bptt(name, cell, options, key):
    """Exact RTRL == BPTT with variable lengths, episode resets and a loss mask, on random inputs."""
    params, batch = random_problem(cell, key, lengths=True, resets=True, mask=True)
    loss_ref, g_ref = reference(cell, losses.mse, params, batch)
    loss, g, _ = gradient(rtrl(cell, losses.mse, **options), cell, params, batch)
    assert abs(float(loss - loss_ref)) <= TOL * abs(float(loss_ref))
    assert float(relative_error(g, g_ref)) <= TOL


def test_rtrl_dense_elman_n32_t50(key):
    """The issue's headline check: dense Elman n=32, T=50 (with a readout, cross-entropy over 3 classes)."""
    cell = cells.with_readout(cells.elman(32), 3)
    params, batch = random_problem(cell, key, B=2, T=50, I=4)
    batch = batch._replace(targets=jax.random.randint(jax.random.key(5), (2, 50), 0, 3))
    _, g_ref = reference(cell, losses.cross_entropy, params, batch)
    _, g, _ = gradient(rtrl(cell, losses.cross_entropy), cell, params, batch)
    assert float(relative_error(g, g_ref)) <= TOL


def test_rtrl_under_jit_and_online_chunks(key):
    """jit gives the same gradient; splitting the segment into online chunks (stateful carry + influence) and
    weighting each chunk's gradient by its share of the loss weights recovers the whole-sequence gradient."""
    cell = cells.with_readout(cells.gru(3), 2)
    params, batch = random_problem(cell, key, T=10, mask=True, resets=True)
    est = rtrl(cell, losses.mse, stateful=True)
    _, g_ref = reference(cell, losses.mse, params, batch)
    state0 = est.init(params, cell.initial_carry(params, (2,)))
    _, g_jit, _ = jax.jit(est.update)(params, state0, batch)
    assert float(relative_error(g_jit, g_ref)) <= TOL
    total = jnp.sum(batch.weights(jnp.float64))
    state, acc = state0, jax.tree.map(jnp.zeros_like, params)
    for chunk in split_segment(batch, 3):
        _, g, state = est.update(params, state, chunk)
        share = jnp.sum(chunk.weights(jnp.float64)) / total
        acc = jax.tree.map(lambda a, b, s=share: a + s * b, acc, g)
    assert float(relative_error(acc, g_ref)) <= TOL


def test_rtrl_trains_online(key):
    """Online learning with an optimizer update every 4 steps through the ordinary train step."""
    cell = cells.with_readout(cells.elman(4), 1)
    params, batch = random_problem(cell, key, B=4, T=40, I=2)
    batch = batch._replace(targets=jnp.roll(batch.inputs[..., :1], 1, axis=1))  # recall the previous input
    est = jbptt.make_estimator("rtrl", cell, losses.mse, stateful=True)
    opt = optax.adam(3e-2)
    state = jbptt.train.init_train_state(est, opt, params, cell.initial_carry(params, (4,)))
    step = jax.jit(jbptt.train.make_train_step(est, opt))
    losses_seen = []
    for _ in range(5):
        for chunk in split_segment(batch, 4):
            state, metrics = step(state, chunk)
            losses_seen.append(float(metrics["loss"]))
    assert all(jnp.isfinite(jnp.asarray(losses_seen)))
    assert sum(losses_seen[-10:]) < 0.7 * sum(losses_seen[:10])


def test_influence_size_error_suggests_approximation():
    cell = cells.elman(16)
    params = cell.init(jax.random.key(0), 8)
    nbytes = influence_bytes(cell, params, 4)
    assert nbytes == 4 * (16 * 16 + 8 * 16 + 16) * 16 * 4
    est = rtrl(cell, losses.mse, max_influence_bytes=nbytes - 1)
    with pytest.raises(ValueError, match=r"(?s)influence matrix.*bytes.*snap1"):
        est.init(params, cell.initial_carry(params, (4,)))
    rtrl(cell, losses.mse, max_influence_bytes=nbytes).init(params, cell.initial_carry(params, (4,)))


def test_diagonal_path_rejects_dense_cells(key):
    cell = cells.elman(4)
    params, batch = random_problem(cell, key)
    with pytest.raises(ValueError, match="element-wise"):
        check_unit_structure(cell, params, batch.inputs[0, 0])
    with pytest.raises(ValueError, match="element-wise"):
        est = rtrl(cell, losses.mse, diagonal=True)
        est.update(params, est.init(params, cell.initial_carry(params, (2,))), batch)
    check_unit_structure(cells.indrnn(4), *random_problem(cells.indrnn(4), key)[:1], batch.inputs[0, 0])


def test_diagonal_influence_is_linear_in_n():
    """The compressed influence of an element-wise cell holds O(P) numbers, not O(P n)."""
    for n in (8, 64):
        cell = cells.indrnn(n)
        params = cell.init(jax.random.key(0), 2)
        assert influence_bytes(cell, params, 1, diagonal=True) == (2 + 1 + 1) * n * 4
        assert influence_bytes(cell, params, 1) == (2 + 1 + 1) * n * n * 4


def test_readme_online_example_runs():
    """The README's online-learning example runs as written."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("## Online learning: exact RTRL and its approximations", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
