"""Unroll: variable lengths, resets, reverse/bidirectional, jit/vmap/jvp, compile size independent of T."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbptt
from jbptt import cells, losses
from jbptt.testing import init_f64
from jbptt.unroll import bidirectional, unroll

I, O = 3, 2
CELLS = {
    "elman": cells.elman(4),
    "lstm": cells.lstm(4),
    "lru": cells.diagonal_linear(4, 3),
    "stack": cells.stack([cells.gru(3), cells.indrnn(3, activation="tanh")]),
}


def assert_trees_close(a, b, tol=1e-10):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


def loss_of(cell, xs, targets, **kw):
    def f(p):
        carry, ys = unroll(cell, p, xs, **kw)
        return jnp.sum(losses.mse(ys, targets)), (carry, ys)

    return f


@pytest.mark.parametrize("name", CELLS)
def test_padded_batch_equals_each_sequence_alone(name, key):
    cell = cells.with_readout(CELLS[name], O)
    params = init_f64(cell, key, I)
    lengths = [6, 2, 4]
    T = max(lengths)
    xs = jax.random.normal(jax.random.key(1), (3, T, I), jnp.float64)
    targets = jax.random.normal(jax.random.key(2), (3, T, O), jnp.float64)
    mask = jbptt.unroll.sequence_mask(jnp.array(lengths), T)[..., None]
    (_, (carry, ys)), grads = jax.value_and_grad(
        loss_of(cell, xs, jnp.where(mask, targets, 0.0), seq_lengths=jnp.array(lengths)), has_aux=True)(params)
    total = jax.tree.map(jnp.zeros_like, params)
    for b, n in enumerate(lengths):
        (_, (c1, y1)), g1 = jax.value_and_grad(
            loss_of(cell, xs[b:b + 1, :n], targets[b:b + 1, :n]), has_aux=True)(params)
        np.testing.assert_allclose(ys[b, :n], y1[0], rtol=1e-10, atol=1e-10)
        np.testing.assert_array_equal(ys[b, n:], 0.0)
        assert_trees_close(jax.tree.map(lambda c, b=b: c[b], carry), jax.tree.map(lambda c: c[0], c1))
        total = jax.tree.map(jnp.add, total, g1)
    assert_trees_close(grads, total)


@pytest.mark.parametrize("name", CELLS)
def test_resets_equal_separate_episodes(name, key):
    cell = cells.with_readout(CELLS[name], O)
    params = init_f64(cell, key, I)
    T, starts = 9, [0, 3, 7]
    xs = jax.random.normal(jax.random.key(1), (1, T, I), jnp.float64)
    targets = jax.random.normal(jax.random.key(2), (1, T, O), jnp.float64)
    resets = jnp.zeros((1, T), bool).at[0, jnp.array(starts[1:])].set(True)
    (_, (carry, ys)), grads = jax.value_and_grad(loss_of(cell, xs, targets, resets=resets), has_aux=True)(params)
    total = jax.tree.map(jnp.zeros_like, params)
    for s, e in zip(starts, starts[1:] + [T], strict=True):
        (_, (c1, y1)), g1 = jax.value_and_grad(loss_of(cell, xs[:, s:e], targets[:, s:e]), has_aux=True)(params)
        np.testing.assert_allclose(ys[:, s:e], y1, rtol=1e-10, atol=1e-10)
        total = jax.tree.map(jnp.add, total, g1)
    assert_trees_close(carry, c1)
    assert_trees_close(grads, total)


def test_lengths_and_resets_together(key):
    cell = cells.lstm(3)
    params = init_f64(cell, key, I)
    xs = jax.random.normal(jax.random.key(1), (2, 6, I), jnp.float64)
    resets = jnp.zeros((2, 6), bool).at[0, 2].set(True)
    carry, ys = unroll(cell, params, xs, seq_lengths=jnp.array([5, 6]), resets=resets)
    c_alone, y_alone = unroll(cell, params, xs[:1, 2:5])
    np.testing.assert_allclose(ys[0, 2:5], y_alone[0], rtol=1e-12)
    np.testing.assert_array_equal(ys[0, 5], 0.0)
    assert_trees_close(jax.tree.map(lambda c: c[:1], carry), c_alone, 1e-12)


def test_reverse_with_lengths_and_resets(key):
    cell = cells.gru(3)
    params = init_f64(cell, key, I)
    xs = jax.random.normal(jax.random.key(1), (1, 7, I), jnp.float64)
    resets = jnp.zeros((1, 7), bool).at[0, 3].set(True)
    _, ys = unroll(cell, params, xs, seq_lengths=jnp.array([6]), resets=resets, reverse=True)
    _, first = unroll(cell, params, xs[:, :3, ::1][:, ::-1])
    _, second = unroll(cell, params, xs[:, 3:6][:, ::-1])
    np.testing.assert_allclose(ys[0, :3], first[0, ::-1], rtol=1e-12)
    np.testing.assert_allclose(ys[0, 3:6], second[0, ::-1], rtol=1e-12)
    np.testing.assert_array_equal(ys[0, 6], 0.0)


def test_bidirectional_with_lengths(key):
    layer = bidirectional(cells.lstm(3), cells.gru(2))
    params = jax.tree.map(lambda a: a.astype(jnp.float64), layer.init(key, I))
    xs = jax.random.normal(jax.random.key(1), (2, 5, I), jnp.float64)
    _, ys = layer.apply(params, xs, seq_lengths=jnp.array([5, 3]))
    assert ys.shape == (2, 5, 5)
    _, alone = layer.apply(params, xs[1:, :3])
    np.testing.assert_allclose(ys[1, :3], alone[0], rtol=1e-12)
    _, back = unroll(cells.gru(2), params["bwd"], xs[1:, :3][:, ::-1])
    np.testing.assert_allclose(ys[1, :3, 3:], back[0, ::-1], rtol=1e-12)


def test_jit_matches_eager_and_jvp_works(key):
    cell = cells.with_readout(cells.stack([cells.lstm(3), cells.elman(3)]), O)
    params = init_f64(cell, key, I)
    xs = jax.random.normal(jax.random.key(1), (2, 6, I), jnp.float64)
    eager = unroll(cell, params, xs, seq_lengths=jnp.array([6, 4]))
    jitted = jax.jit(lambda p, x: unroll(cell, p, x, seq_lengths=jnp.array([6, 4])))(params, xs)
    assert_trees_close(eager, jitted, 1e-12)

    tangent = jax.tree.map(lambda a: jax.random.normal(jax.random.key(3), a.shape, a.dtype), params)
    f = lambda p: unroll(cell, p, xs)[1]
    _, dys = jax.jvp(f, (params,), (tangent,))
    eps = 1e-6
    fd = (f(jax.tree.map(lambda p, t: p + eps * t, params, tangent))
          - f(jax.tree.map(lambda p, t: p - eps * t, params, tangent))) / (2 * eps)
    np.testing.assert_allclose(dys, fd, rtol=1e-6, atol=1e-8)


def test_unroll_factor_does_not_change_results(key):
    cell = cells.lstm(3)
    params = init_f64(cell, key, I)
    xs = jax.random.normal(jax.random.key(1), (2, 7, I), jnp.float64)
    assert_trees_close(unroll(cell, params, xs), unroll(cell, params, xs, unroll=3), 1e-12)


def test_program_size_does_not_grow_with_T(key):
    cell = cells.with_readout(cells.lstm(4), 1)
    params = cell.init(key, I)
    est = jbptt.estimators.bptt.bptt(cell, losses.mse)

    def n_eqns(T):
        batch = jbptt.Batch(jnp.zeros((2, T, I)), jnp.zeros((2, T, 1)))
        jaxpr = jax.make_jaxpr(est.update)(params, est.init(params, None), batch)
        return len(str(jaxpr).splitlines())

    assert n_eqns(10) == n_eqns(10_000)


def test_bad_shapes_get_clear_errors(key):
    cell = cells.elman(3)
    params = cell.init(key, I)
    with pytest.raises(ValueError, match=r"batch-major \[B, T, \.\.\.\]"):
        unroll(cell, params, jnp.zeros((5,)))
    with pytest.raises(ValueError, match=r"resets must have shape \[B, T\] = \(2, 4\)"):
        unroll(cell, params, jnp.zeros((2, 4, I)), resets=jnp.zeros((4, 2), bool))
