"""Bad input to the Python API gets one clear ValueError naming the shapes (issue 14's API faults)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbptt
from jbptt import cells, losses
from jbptt.unroll import unroll

B, T, I = 3, 6, 2


@pytest.fixture(scope="module")
def model():
    cell = cells.with_readout(cells.elman(4), 1)
    params = cell.init(jax.random.key(0), I)
    xs = jnp.asarray(np.random.default_rng(0).standard_normal((B, T, I)))
    return cell, params, xs


def test_targets_of_another_shape_are_refused(model):
    cell, params, xs = model
    batch = jbptt.Batch(xs, jnp.zeros((B, T, 2)))  # a 1-output model, 2-wide targets: used to broadcast silently
    with pytest.raises(ValueError, match=r"mse: predictions have shape \(3, 6, 1\) but targets have shape \(3, 6, 2\)"):
        jbptt.reference_gradient(cell, losses.mse, params, batch)
    with pytest.raises(ValueError, match="binary_cross_entropy"):
        losses.binary_cross_entropy(jnp.zeros((2, 1)), jnp.zeros((2, 3)))


def test_a_carry_of_another_batch_size_is_refused(model):
    cell, params, xs = model
    with pytest.raises(ValueError, match=r"carry \(leaf shapes \[\(5, 4\)\]\) must have the batch size B = 3"):
        unroll(cell, params, xs, cell.initial_carry(params, (5,)))


def test_time_major_inputs_and_wrong_input_sizes_are_named(model):
    cell, params, xs = model
    carry = cell.initial_carry(params, (B,))
    with pytest.raises(ValueError, match="carry .* must have the batch size B = 6"):
        unroll(cell, params, jnp.swapaxes(xs, 0, 1), carry)  # time-major [T, B, I] with a [B] carry
    with pytest.raises(ValueError, match=r"does not accept one time step of xs \(leaf shapes \[\(3, 5\)\]"):
        unroll(cell, params, jnp.zeros((B, T, 5)))  # input size 5 for a cell initialised with 2
    with pytest.raises(ValueError, match="does not accept"):  # the same under jit (checked at trace time)
        jax.jit(lambda p, x: unroll(cell, p, x))(params, jnp.zeros((B, T, 5)))


def test_seq_lengths_outside_the_sequence_are_refused_where_concrete(model):
    cell, params, xs = model
    for bad in ([T + 1, 2, 3], [-1, 2, 3]):
        with pytest.raises(ValueError, match=r"seq_lengths must lie in \[0, T = 6\]"):
            unroll(cell, params, xs, seq_lengths=jnp.array(bad))
    with pytest.raises(ValueError, match=r"seq_lengths must have shape \[B\]"):
        unroll(cell, params, xs, seq_lengths=jnp.array([1, 2]))
    # Under jit the lengths are traced: documented clamping, no error.
    _, ys = jax.jit(lambda p, x, n: unroll(cell, p, x, seq_lengths=n))(params, xs, jnp.array([T + 3, 2, 3]))
    _, ref = unroll(cell, params, xs, seq_lengths=jnp.array([T, 2, 3]))
    np.testing.assert_allclose(ys, ref, atol=1e-12)


@pytest.mark.parametrize("factory", [cells.lstm, cells.gru, cells.elman, cells.indrnn, cells.esn,
                                     cells.diagonal_linear])
def test_a_zero_state_size_is_one_clear_error(factory):
    with pytest.raises(ValueError, match="the state size must be a positive int, got 0"):
        factory(0)
