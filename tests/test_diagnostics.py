"""Gradient-flow diagnostics on a linear RNN with recurrent matrix a*I, where everything is known in closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbptt
from jbptt import cells, diagnostics, losses
from jbptt.testing import to_f64

T, H = 12, 5


def linear_rnn(a):
    return cells.with_readout(cells.elman(H, activation="identity", recurrent_init="identity",
                                          recurrent_scale=a, dtype=jnp.float64), 1)


@pytest.mark.parametrize("a", [0.7, 1.2])
def test_state_gradient_profile_decays_as_a_power(a, key):
    cell = linear_rnn(a)
    params = to_f64(cell.init(key, 2))
    xs = jax.random.normal(jax.random.key(1), (3, T, 2), jnp.float64)
    batch = jbptt.Batch(xs, jnp.ones((3, T, 1)), mask=losses.final_step_weights(3, T, dtype=jnp.float64))
    profile = diagnostics.state_gradient_norms(cell, losses.mse, params, batch)
    assert profile.shape == (T,)
    # dL/dh_{t-1} = a^(T-t) dL/dh_{T-1} for the carry entering step t
    expected = profile[-1] * a ** (T - 1 - jnp.arange(T))
    np.testing.assert_allclose(profile, expected, rtol=1e-10)


def test_jacobian_norms_and_singular_values(key):
    a = 0.9
    cell = linear_rnn(a)
    params = to_f64(cell.init(key, 2))
    xs = jax.random.normal(jax.random.key(1), (2, T, 2), jnp.float64)
    sv = diagnostics.jacobian_singular_values(cell, params, xs)
    np.testing.assert_allclose(sv, a * jnp.ones((2, T, H)), rtol=1e-12)
    norms = diagnostics.final_state_jacobian_norms(cell, params, xs)
    np.testing.assert_allclose(norms, np.sqrt(H) * a ** (T - jnp.arange(T))[None].repeat(2, 0), rtol=1e-10)


def test_step_jacobians_match_autodiff_for_lstm(key):
    cell = cells.lstm(3)
    params = to_f64(cell.init(key, 2))
    xs = jax.random.normal(jax.random.key(1), (1, 4, 2), jnp.float64)
    jacs = diagnostics.step_jacobians(cell, params, xs)
    assert jacs.shape == (1, 4, 6, 6)
    carry = jbptt.unroll.unroll(cell, params, xs[:, :2])[0]
    carry = jax.tree.map(lambda c: c[0], carry)
    direct = jax.jacfwd(lambda c: jnp.concatenate(cell.step(params, (c[:3], c[3:]), xs[0, 2])[0]))(
        jnp.concatenate(carry))
    np.testing.assert_allclose(jacs[0, 2], direct, rtol=1e-12)


def test_alignment_metrics():
    a = {"w": jnp.array([1.0, 0.0])}
    b = {"w": jnp.array([1.0, 1.0])}
    assert float(diagnostics.cosine_similarity(a, b)) == pytest.approx(1 / np.sqrt(2))
    assert float(diagnostics.relative_error(a, b)) == pytest.approx(1 / np.sqrt(2))
    assert float(diagnostics.global_norm(b)) == pytest.approx(np.sqrt(2))
