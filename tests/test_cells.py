"""Cells: gradients against finite differences, batching, initialisers, ESN, Flax adapter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.flatten_util import ravel_pytree

import jbptt
from jbptt import cells, losses
from jbptt.testing import cell_zoo, finite_difference_grad, init_f64, to_f64
from jbptt.unroll import unroll, with_step_keys

B, T, I = 2, 5, 3
SLOW_FD = {"elman_irnn", "lru_real", "indrnn", "readout_lstm", "learned_carry_gru", "esn", "flax_lstm"}
"""Cells whose finite-difference check runs under -m slow only (a cell of each kind stays in the default run)."""


@pytest.mark.parametrize("name,cell", [  # the fused cells equal the plain ones (tests/test_fused.py): slow here
    pytest.param(n, c, marks=pytest.mark.slow) if n.startswith("fused_") or n in SLOW_FD else (n, c)
    for n, c in cell_zoo()
], ids=[n for n, _ in cell_zoo()])
def test_gradients_match_finite_differences(name, cell, key):
    cell = cells.with_readout(cell, 2)
    params = init_f64(cell, key, I)
    xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float64)
    targets = jax.random.normal(jax.random.key(2), (B, T, 2), jnp.float64)
    batch = jbptt.Batch(xs, targets)

    def loss(p):
        return jbptt.estimators.bptt.loss_and_outputs(cell, losses.mse, p, batch)[0]

    grads = jax.grad(loss)(params)
    fd = finite_difference_grad(loss, params)
    mask = cells.trainable_mask(params)
    g = ravel_pytree(jax.tree.map(lambda a, m: a * m, grads, mask))[0]
    f = ravel_pytree(jax.tree.map(lambda a, m: a * m, fd, mask))[0]
    assert jnp.linalg.norm(g) > 0
    assert jnp.linalg.norm(g - f) / jnp.linalg.norm(g) <= 1e-6


def test_stack_with_dropout_gradients_match_finite_differences(key):
    cell = cells.with_readout(cells.stack([cells.lstm(3), cells.gru(3)], dropout_rate=0.5), 2)
    params = init_f64(cell, key, I)
    xs = with_step_keys(jax.random.normal(jax.random.key(1), (B, T, I), jnp.float64), jax.random.key(7))
    batch = jbptt.Batch(xs, jax.random.normal(jax.random.key(2), (B, T, 2), jnp.float64))

    def loss(p):
        return jbptt.estimators.bptt.loss_and_outputs(cell, losses.mse, p, batch)[0]

    g, f = ravel_pytree(jax.grad(loss)(params))[0], ravel_pytree(finite_difference_grad(loss, params))[0]
    assert jnp.linalg.norm(g - f) / jnp.linalg.norm(g) <= 1e-6


def test_dropout_is_active_only_with_keys(key):
    cell = cells.stack([cells.elman(8), cells.elman(8)], dropout_rate=0.5)
    params = cell.init(key, I)
    xs = jax.random.normal(key, (B, T, I))
    _, plain = unroll(cell, params, xs)
    _, dropped = unroll(cell, params, with_step_keys(xs, jax.random.key(3)))
    _, again = unroll(cell, params, with_step_keys(xs, jax.random.key(3)))
    assert not jnp.allclose(plain, dropped)
    np.testing.assert_array_equal(dropped, again)


@pytest.mark.parametrize("name,cell", cell_zoo(), ids=[n for n, _ in cell_zoo()])
def test_vmap_of_unbatched_step_equals_batched_step(name, cell, key):
    params = init_f64(cell, key, I)
    carry = jax.tree.map(lambda c: c + jax.random.normal(key, c.shape, c.dtype),
                         cell.initial_carry(params, (B,)))
    x = jax.random.normal(jax.random.key(1), (B, I), jnp.float64)
    batched = cell.step(params, carry, x)
    mapped = jax.vmap(cell.step, in_axes=(None, 0, 0))(params, carry, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12), batched, mapped)


def test_esn_spectral_radius_and_no_gradient(key):
    cell = cells.esn(50, spectral_radius=0.95, leak_rate=0.5, density=0.2)
    params = cell.init(key, I)
    assert abs(cells.spectral_radius(params["fixed"]["w"]) - 0.95) <= 1e-6
    model = cells.with_readout(cell, 1)
    p = to_f64(model.init(key, I))
    batch = jbptt.Batch(jax.random.normal(key, (B, T, I), jnp.float64), jnp.ones((B, T, 1)))
    _, grads = jbptt.reference_gradient(model, losses.mse, p, batch)
    assert all(jnp.all(g == 0) for g in jax.tree.leaves(grads["core"]["fixed"]))
    assert jnp.any(grads["readout"]["w"] != 0)
    mask = cells.trainable_mask(p)
    assert not any(jax.tree.leaves(mask["core"])) and all(jax.tree.leaves(mask["readout"]))


def test_initialisers(key):
    q = cells.orthogonal(key, (6, 6), jnp.float64)
    np.testing.assert_allclose(q @ q.T, np.eye(6), atol=1e-12)
    np.testing.assert_array_equal(cells.identity(key, (4, 4)), np.eye(4))
    w = cells.scale_to_spectral_radius(jax.random.normal(key, (10, 10), jnp.float64), 1.3)
    assert abs(cells.spectral_radius(w) - 1.3) < 1e-9
    irnn = cells.elman(5, activation="relu", recurrent_init="identity").init(key, 2)
    np.testing.assert_array_equal(irnn["w_h"], np.eye(5))
    with pytest.raises(ValueError, match="unknown initialiser 'nope'"):
        cells.elman(3, recurrent_init="nope")
    with pytest.raises(ValueError, match="square"):
        cells.identity(key, (3, 4))


def test_lstm_gate_layout_and_forget_bias(key):
    params = cells.lstm(4, forget_bias=2.0).init(key, 3)
    assert params["w_x"].shape == (3, 16) and params["w_h"].shape == (4, 16)
    np.testing.assert_array_equal(params["b"], np.r_[np.zeros(4), 2 * np.ones(4), np.zeros(8)])


def test_lru_eigenvalues_are_stable_for_any_parameters(key):
    cell = cells.diagonal_linear(16, r_min=0.5, r_max=0.99)
    params = cell.init(key, 2)
    mag = jnp.exp(-jnp.exp(params["nu"]))
    assert jnp.all((mag >= 0.5 - 1e-6) & (mag <= 0.99 + 1e-6))
    wild = dict(params, nu=params["nu"] - 50.0)  # even extreme nu keeps |lambda| <= 1
    assert jnp.all(jnp.exp(-jnp.exp(wild["nu"])) <= 1.0)


@pytest.mark.parametrize("module", [
    nn.LSTMCell(features=5, param_dtype=jnp.float64),
    nn.GRUCell(features=5, param_dtype=jnp.float64),
    nn.OptimizedLSTMCell(features=5, param_dtype=jnp.float64),
    nn.SimpleCell(features=5, param_dtype=jnp.float64),
], ids=["LSTMCell", "GRUCell", "OptimizedLSTMCell", "SimpleCell"])
def test_from_flax_equals_flax_rnn(module, key):
    cell = cells.from_flax(module)
    params = cell.init(key, I)
    xs = jax.random.normal(jax.random.key(1), (B, 7, I), jnp.float64)
    seq_lengths = jnp.array([7, 4])
    carry, ys = unroll(cell, params, xs, seq_lengths=seq_lengths)
    rnn = nn.RNN(module, return_carry=True)
    ref_carry, ref_ys = rnn.apply({"params": {"cell": params["params"]}}, xs, seq_lengths=seq_lengths)
    mask = jbptt.unroll.sequence_mask(seq_lengths, 7)[..., None]
    np.testing.assert_allclose(ys, jnp.where(mask, ref_ys, 0.0), rtol=1e-12, atol=1e-12)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12), carry, ref_carry)


def test_learned_initial_carry_is_broadcast(key):
    cell = cells.learned_initial_carry(cells.lstm(3))
    params = cell.init(key, 2)
    params["carry0"] = (jnp.arange(3.0), -jnp.arange(3.0))
    h, c = cell.initial_carry(params, (4, 2))
    assert h.shape == (4, 2, 3)
    np.testing.assert_array_equal(h[3, 1], jnp.arange(3.0))
    np.testing.assert_array_equal(c[0, 0], -jnp.arange(3.0))
