"""Approximate online estimators against exact RTRL and BPTT: SnAp-1/2, UORO, e-prop, RFLO (float64, random)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbptt
from jbptt import cells, losses
from jbptt.diagnostics import relative_error
from jbptt.estimators.rtrl import rtrl
from tests.test_rtrl import TOL, gradient, random_problem, reference

ELMAN = cells.with_readout(cells.elman(5), 2)
LSTM = cells.with_readout(cells.lstm(3), 2)


def estimate(name, cell, params, batch, **options):
    return gradient(jbptt.make_estimator(name, cell, losses.mse, **options), cell, params, batch)[1]


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
    params, batch = random_problem(cell, key, resets=True)
    g_rtrl = gradient(rtrl(cell, losses.mse), cell, params, batch)[1]
    assert float(relative_error(estimate("snap1", cell, params, batch), g_rtrl)) <= TOL


def test_snap2_equals_rtrl_on_dense_elman_and_snap1_does_not(key):
    params, batch = random_problem(ELMAN, key, lengths=True)
    g_rtrl = gradient(rtrl(ELMAN, losses.mse), ELMAN, params, batch)[1]
    assert float(relative_error(estimate("snap2", ELMAN, params, batch), g_rtrl)) <= TOL
    assert float(relative_error(estimate("snap1", ELMAN, params, batch), g_rtrl)) > 1e-3


@pytest.mark.slow
def test_snap_n1_masked_equals_snap1_compressed_on_indrnn(key):
    """The masked dense SnAp-1 and the compressed SnAp-1 are the same algorithm (element-wise cell: both exact)."""
    cell = DIAGONAL[0][1]
    params, batch = random_problem(cell, key)
    g1 = estimate("snap1", cell, params, batch)
    assert float(relative_error(estimate("snap", cell, params, batch, n=1), g1)) <= TOL


@pytest.mark.parametrize("name,cell", [
    ("uoro", cells.with_readout(cells.learned_initial_carry(cells.elman(3)), 2)),
    ("kfrtrl", cells.with_readout(cells.elman(3), 2)),
], ids=["uoro", "kfrtrl"])
def test_stochastic_estimators_are_unbiased(name, cell, key):
    """The mean of K independent estimates converges to BPTT: ||mean - g||^2 is compared with its expected
    value tr(Cov)/K estimated from the sample variance (E[ratio] = 1; a biased estimator fails because its bias
    does not shrink with K: scaling UORO's rank-one trace by 0.9 gives a ratio of ~11 here)."""
    params, batch = random_problem(cell, key, B=1, T=6, I=2)
    g_ref = jnp.concatenate([a.ravel() for a in jax.tree.leaves(reference(cell, losses.mse, params, batch)[1])])
    est = jbptt.make_estimator(name, cell, losses.mse)
    carry = cell.initial_carry(params, (1,))
    est.update(params, est.init(params, carry), batch)  # eager once: runs the estimator's own checks

    @jax.jit
    def many(keys):
        one = lambda k: est.update(params, est.init(params, carry, k), batch)[1]
        flat = lambda g: jnp.concatenate([a.ravel() for a in jax.tree.leaves(g)])
        return jax.vmap(lambda k: flat(one(k)))(keys)

    K = 4000
    samples = many(jax.random.split(key, K))
    mean = samples.mean(0)
    expected_sq = jnp.sum(samples.var(0, ddof=1)) / K
    ratio = float(jnp.sum((mean - g_ref) ** 2) / expected_sq)
    assert ratio < 3.0, ratio
    assert float(jnp.linalg.norm(samples[0] - g_ref) / jnp.linalg.norm(g_ref)) > 0.05  # one estimate is noisy


def test_kfrtrl_refuses_cells_that_do_not_factorise(key):
    for cell, match in [(cells.lstm(3), "single-component"), (cells.indrnn(3), "factorises")]:
        params, batch = random_problem(cell, key)
        est = jbptt.make_estimator("kfrtrl", cell, losses.mse)
        with pytest.raises(ValueError, match=match):
            est.update(params, est.init(params, cell.initial_carry(params, (2,))), batch)


@pytest.mark.parametrize("name,cell,options", [
    ("eprop", ELMAN, {}),
    ("eprop", LSTM, {}),
    ("rflo", ELMAN, {"feedback": "symmetric"}),
    pytest.param("rflo", ELMAN, {"feedback": "symmetric", "leak": 0.3}, marks=pytest.mark.slow),
], ids=["eprop_elman", "eprop_lstm", "rflo_elman", "rflo_leaky"])
def test_local_rules_equal_bptt_for_one_step_and_differ_over_many(name, cell, options, key):
    params, batch = random_problem(cell, key, T=1)
    g_ref = reference(cell, losses.mse, params, batch)[1]
    assert float(relative_error(estimate(name, cell, params, batch, **options), g_ref)) <= TOL
    params, batch = random_problem(cell, key, T=12)
    g_ref = reference(cell, losses.mse, params, batch)[1]
    assert float(relative_error(estimate(name, cell, params, batch, **options), g_ref)) > 1e-3


def test_rflo_random_feedback_only_changes_the_recurrent_part(key):
    """With random feedback the readout gradient stays exact and the recurrent gradient changes."""
    params, batch = random_problem(ELMAN, key, T=1)
    g_ref = reference(ELMAN, losses.mse, params, batch)[1]
    g = estimate("rflo", ELMAN, params, batch)
    assert float(relative_error(g["readout"], g_ref["readout"])) <= TOL
    assert float(relative_error(g["core"], g_ref["core"])) > 1e-2


def test_eprop_keeps_the_lstm_cell_state_trace(key):
    """e-prop on an LSTM carries the eligibility through c (the forget gate): with it the estimate is closer to
    BPTT than with no internal component (``internal=()``, the purely immediate rule)."""
    params, batch = random_problem(LSTM, key, T=12)
    g_ref = reference(LSTM, losses.mse, params, batch)[1]
    err_c = float(relative_error(estimate("eprop", LSTM, params, batch), g_ref))
    err_none = float(relative_error(estimate("eprop", LSTM, params, batch, internal=()), g_ref))
    assert err_c < err_none


def test_eprop_rejects_a_cell_whose_output_is_not_a_readout_of_h(key):
    cell = cells.diagonal_linear(3, 2)
    params, batch = random_problem(cell, key)
    est = jbptt.make_estimator("eprop", cell, losses.mse)
    with pytest.raises(ValueError, match="readout"):
        est.update(params, est.init(params, cell.initial_carry(params, (2,))), batch)


def test_online_estimators_run_stateful_under_jit(key):
    """Every online estimator continues from its state across segments under jit, with finite gradients."""
    params, batch = random_problem(ELMAN, key, T=8)
    for name in ("snap1", "uoro", "rflo"):
        est = jbptt.make_estimator(name, ELMAN, losses.mse, stateful=True)
        state = est.init(params, ELMAN.initial_carry(params, (2,)))
        upd = jax.jit(est.update)
        _, g1, state = upd(params, state, batch)
        _, g2, state = upd(params, state, batch)
        assert np.all(np.isfinite(np.concatenate([np.ravel(a) for a in jax.tree.leaves((g1, g2))])))
