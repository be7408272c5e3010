"""Losses, masks, and the BPTT estimator.

Programs are compiled with the cheap code generation tests/conftest.py asks XLA for, since compilation dominates
these tests.
"""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbptt
from jbptt import cells, losses
from jbptt.testing import init_f64


def test_cross_entropy_and_mse():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    labels = jnp.array([0, 2])
    ref = -jax.nn.log_softmax(logits)[jnp.arange(2), labels]
    np.testing.assert_allclose(losses.cross_entropy(logits, labels), ref, rtol=1e-12)
    np.testing.assert_allclose(losses.mse(jnp.ones((2, 3)), jnp.zeros((2, 3))), [1.0, 1.0])
    with pytest.raises(ValueError, match="unknown loss 'l1'"):
        losses.get_loss("l1")


def test_weights_average_over_valid_steps_only():
    values = jnp.arange(12.0).reshape(3, 4)
    w = losses.loss_weights(3, 4, seq_lengths=jnp.array([4, 2, 0]))
    assert float(losses.weighted_mean(values, w)) == pytest.approx((0 + 1 + 2 + 3 + 4 + 5) / 6)
    assert float(losses.weighted_mean(values, jnp.zeros((3, 4)))) == 0.0
    fw = losses.final_step_weights(3, 4, jnp.array([4, 2, 1]))
    np.testing.assert_array_equal(fw, [[0, 0, 0, 1], [0, 1, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(losses.final_step(values[..., None], jnp.array([4, 2, 1]))[:, 0], [3, 5, 8])
    sw = losses.step_weights(2, 5, [1, 4], [0.5, 2.0])
    np.testing.assert_array_equal(sw[1], [0, 0.5, 0, 0, 2.0])


def test_bptt_estimator_equals_reference_and_masks_steps(key):
    cell = cells.with_readout(cells.lstm(4), 3)
    params = init_f64(cell, key, 2)
    xs = jax.random.normal(jax.random.key(1), (3, 6, 2), jnp.float64)
    labels = jax.random.randint(jax.random.key(2), (3, 6), 0, 3)
    mask = losses.final_step_weights(3, 6, jnp.array([6, 4, 2]), jnp.float64)
    batch = jbptt.Batch(xs, labels, mask=mask, seq_lengths=jnp.array([6, 4, 2]))
    est = jbptt.make_estimator("bptt", cell, losses.cross_entropy)
    (loss, grads, _), (ref_loss, ref_grads), (_, ys) = jax.jit(lambda p, b: (
        est.update(p, est.init(p, None), b), jbptt.reference_gradient(cell, losses.cross_entropy, p, b),
        jbptt.unroll.unroll(cell, p, b.inputs, seq_lengths=b.seq_lengths)))(params, batch)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-12)
    # the loss only sees each sequence's last valid output
    manual = jnp.mean(losses.cross_entropy(losses.final_step(ys, batch.seq_lengths), labels[jnp.arange(3),
                                                                                             jnp.array([5, 3, 1])]))
    assert float(loss) == pytest.approx(float(manual), rel=1e-12)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), grads, ref_grads)


def test_stateful_bptt_carries_the_final_state(key):
    cell = cells.with_readout(cells.gru(3), 1)
    params = init_f64(cell, key, 2)
    xs = jax.random.normal(jax.random.key(1), (2, 8, 2), jnp.float64)
    est = jbptt.estimators.bptt.bptt(cell, losses.mse, stateful=True)
    state = est.init(params, cell.initial_carry(params, (2,)))
    update = jax.jit(est.update)
    _, _, state = update(params, state, jbptt.Batch(xs[:, :4], jnp.zeros((2, 4, 1))))
    _, _, state = update(params, state, jbptt.Batch(xs[:, 4:], jnp.zeros((2, 4, 1))))
    whole, _ = jax.jit(lambda p: jbptt.unroll.unroll(cell, p, xs))(params)
    np.testing.assert_allclose(state.carry, whole, rtol=1e-12)
    with pytest.raises(ValueError, match="unknown estimator 'nope'"):
        jbptt.make_estimator("nope", cell, losses.mse)


def test_train_step_reduces_loss(key):
    cell = cells.with_readout(cells.lstm(8), 1)
    params = cell.init(key, 1)
    xs = jax.random.normal(jax.random.key(1), (16, 10, 1))
    batch = jbptt.Batch(xs, jnp.cumsum(xs, axis=1) / 3.0)
    est = jbptt.estimators.bptt.bptt(cell, losses.mse)
    opt = optax.adam(1e-2)
    state = jbptt.train.init_train_state(est, opt, params, None)
    step = jax.jit(jbptt.train.make_train_step(est, opt))
    state, first = step(state, batch)
    for _ in range(50):
        state, metrics = step(state, batch)
    assert float(metrics["loss"]) < 0.5 * float(first["loss"])
    assert int(state.step) == 51
