"""SnAp-n stored sparse (float64, random problems): exact where the pattern is full, a masked-dense brute force
elsewhere, and the approximation it is on sparse recurrent cells.

Each problem's estimators are compiled as one program, with the cheap code generation tests/conftest.py asks for.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbptt
from jbptt import cells, losses
from jbptt.estimators.bptt import reference_gradient
from jbptt.estimators.online import flat_step, split_segment
from jbptt.estimators.snap import snap_pattern
from jbptt.testing import random_problem

TOL = 1e-10


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree.leaves(tree)])


def rel(a, b):
    return float(np.linalg.norm(flat(a) - flat(b)) / np.linalg.norm(flat(b)))


def dense_pattern(state, P: int, n: int) -> np.ndarray:
    """The ``[P, n]`` boolean pattern the stored-sparse layout of ``state`` covers."""
    lay = jax.tree.map(np.asarray, state.pattern)
    out = np.zeros((P + 1, n + 1), bool)
    out[lay.rows[:, :, None], lay.units[:, None, :]] = True
    return out[:P, :n]


def masked_dense_snap(cell, params, batch, pattern):
    """Brute-force SnAp with a dense ``[P, n]`` influence and dense Jacobians: ``J = (D J + M) * pattern``, the
    gradient of step ``t`` ``dl/dtheta|_immediate + J_{t-1} dl/ds_{t-1}`` (no lengths / resets / mask)."""
    fs = flat_step(cell, params)
    theta, pat = fs.theta, jnp.asarray(pattern, fs.theta.dtype)
    B, T = batch.inputs.shape[:2]

    def example(xs, targets):
        def step(carry, inp):
            s, J, g = carry
            x, target = inp
            f = lambda th, ss: fs.step(th, ss, x)
            loss = lambda th, ss: losses.mse(f(th, ss)[1], target) / (B * T)
            gth, gs = jax.grad(loss, argnums=(0, 1))(theta, s)
            M = jax.jacfwd(lambda th: f(th, s)[0])(theta)  # [n, P]
            D = jax.jacfwd(lambda ss: f(theta, ss)[0])(s)  # [n, n]
            return (f(theta, s)[0], (J @ D.T + M.T) * pat, g + gth + J @ gs), None

        J0 = jax.jacfwd(fs.carry0)(theta).T * pat
        (_, _, g), _ = jax.lax.scan(step, (fs.carry0(theta), J0, jnp.zeros_like(theta)), (xs, targets))
        return g

    g = jax.vmap(example)(batch.inputs, batch.targets).sum(0)
    return fs.grads(g)


def run(cell, params, batch, *specs, reference=False, brute=False):
    """Gradients of estimators ``(name, options)`` from fresh states (one jitted program), then optionally the
    plain BPTT reference and the masked-dense brute force at the first estimator's pattern; plus that state."""
    ests = [jbptt.make_estimator(name, cell, losses.mse, **opts) for name, opts in specs]
    carry = cell.initial_carry(params, (batch.inputs.shape[0],))
    states = [est.init(params, carry, inputs=batch.inputs) for est in ests]
    out = list(jax.jit(lambda p, b, ss: [e.update(p, s, b)[1] for e, s in zip(ests, ss, strict=True)])(
        params, batch, states))
    if reference:
        out.append(jax.jit(lambda p, b: reference_gradient(cell, losses.mse, p, b)[1])(params, batch))
    if brute:
        fs = flat_step(cell, params)
        pat = dense_pattern(states[0], fs.P, fs.n)
        out.append(jax.jit(lambda p, b: masked_dense_snap(cell, p, b, pat))(params, batch))
    return out, states


def test_snap2_is_exact_rtrl_on_a_dense_elman_with_readout_and_learned_carry(key):
    cell = cells.learned_initial_carry(cells.with_readout(cells.elman(4), 2))
    _, params, batch = random_problem(cell, key, B=2, T=6, input_size=3, output_size=2, lengths=True, resets=True)
    (g_snap, g_rtrl), (state, _) = run(cell, params, batch, ("snap2", {}), ("rtrl", {}))
    assert rel(g_snap, g_rtrl) <= TOL
    fs = flat_step(cell, params)
    P_s, K = int(np.sum(np.asarray(state.pattern.rows) < fs.P)), state.trace.shape[-1]
    assert K == fs.n and P_s == fs.P - (4 * 2 + 2)  # full pattern; the readout carries no influence


SPARSE = [pytest.param(cells.sparse_elman(8, density=0.25, seed=1), id="elman"),
          pytest.param(cells.sparse_lstm(6, density=0.2, seed=2), id="lstm", marks=pytest.mark.slow),
          pytest.param(cells.sparse_gru(6, density=0.2, seed=3), id="gru", marks=pytest.mark.slow)]


@pytest.mark.parametrize("cell", SPARSE)
def test_snap2_on_sparse_cells_is_the_masked_dense_brute_force_and_not_bptt(cell, key):
    model, params, batch = random_problem(cell, key, B=2, T=6, input_size=2, output_size=2)
    (g_snap, g_ref, g_brute), (state,) = run(model, params, batch, ("snap2", {}), reference=True, brute=True)
    assert rel(g_snap, g_brute) <= TOL
    assert rel(g_snap, g_ref) > 1e-6  # an approximation on a sparse net: this assertion can fail
    fs = flat_step(model, params)
    P_s, K = int(np.sum(np.asarray(state.pattern.rows) < fs.P)), state.trace.shape[-1]
    assert K < fs.n and P_s < fs.P  # stored sparse: fewer entries per parameter; the readout has none
    x0 = batch.inputs[0, 0]
    expect = np.asarray(snap_pattern(fs, fs.theta, x0, 2, jax.random.fold_in(jax.random.key(0), 7)))
    assert np.array_equal(dense_pattern(state, fs.P, fs.n), expect)


def test_snap1_stored_sparse_equals_bptt_on_an_elementwise_cell(key):
    cell = cells.with_readout(cells.indrnn(4, activation="tanh"), 2)
    _, params, batch = random_problem(cell, key, B=2, T=6, input_size=3, output_size=2, resets=True, mask=True)
    g_n1, g_snap1, g_ref = run(cell, params, batch, ("snap", {"n": 1}), ("snap1", {}), reference=True)[0]
    assert rel(g_n1, g_ref) <= TOL and rel(g_snap1, g_ref) <= TOL


STATEFUL = [pytest.param(cells.sparse_elman(5, density=0.3), id="elman"),
            pytest.param(cells.stack([cells.sparse_elman(5, density=0.3), cells.sparse_gru(5, density=0.3, seed=4)]),
                         id="stack", marks=pytest.mark.slow)]


@pytest.mark.parametrize("core", STATEFUL)
def test_stateful_segments_sum_to_the_whole_sequence(core, key):
    """Online over segments at fixed params: the weighted sum of segment gradients is the whole batch's gradient
    (the sparse influence carries over exactly), with a readout and a learned initial carry."""
    cell = cells.learned_initial_carry(cells.with_readout(core, 2))
    _, params, batch = random_problem(cell, key, B=2, T=8, input_size=2, output_size=2)
    carry = cell.initial_carry(params, (2,))
    whole = jbptt.make_estimator("snap2", cell, losses.mse)
    online = jbptt.make_estimator("snap2", cell, losses.mse, stateful=True)
    s0, s1 = whole.init(params, carry, inputs=batch.inputs), online.init(params, carry, inputs=batch.inputs)

    @jax.jit
    def go(p, s0, s1):
        g_whole = whole.update(p, s0, batch)[1]
        total, state = jax.tree.map(jnp.zeros_like, p), s1
        for seg in split_segment(batch, 3):
            _, g, state = online.update(p, state, seg)
            w = jnp.sum(seg.weights(jnp.float64))
            total = jax.tree.map(lambda a, b, w=w: a + w * b, total, g)
        return g_whole, jax.tree.map(lambda a: a / (batch.inputs.shape[0] * batch.inputs.shape[1]), total)

    g_whole, g_seg = go(params, s0, s1)
    assert rel(g_seg, g_whole) <= TOL


def test_init_under_jit_measures_the_structural_pattern(key):
    """``init`` traced (``jit``, ``eval_shape``: the compare harness and the parallel wrapper) measures the pattern
    at a generic point; on a sparse cell it is the eager one, and so are the gradients."""
    model, params, batch = random_problem(cells.sparse_elman(8, density=0.25, seed=1), key, B=2, T=4)
    est = jbptt.make_estimator("snap2", model, losses.mse)
    carry = model.initial_carry(params, (2,))
    eager = est.init(params, carry, inputs=batch.inputs)
    traced = jax.jit(lambda p, c, x: est.init(p, c, inputs=x))(params, carry, batch.inputs)
    shapes = jax.eval_shape(lambda p, c, x: est.init(p, c, inputs=x), params, carry, batch.inputs)
    assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, eager)
    for a, b in zip(jax.tree.leaves(eager.pattern), jax.tree.leaves(traced.pattern), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    update = jax.jit(lambda s: est.update(params, s, batch)[1])
    assert rel(update(traced), update(eager)) <= TOL


def test_max_influence_bytes_counts_the_stored_entries(key):
    model, params, batch = random_problem(cells.sparse_elman(8, density=0.25, seed=1), key, B=2, T=4)
    carry = model.initial_carry(params, (2,))
    state = jbptt.make_estimator("snap2", model, losses.mse).init(params, carry, inputs=batch.inputs)
    nbytes = state.trace.size * state.trace.dtype.itemsize
    jbptt.make_estimator("snap2", model, losses.mse, max_influence_bytes=nbytes).init(params, carry,
                                                                                      inputs=batch.inputs)
    with pytest.raises(ValueError, match="stored sparse"):
        jbptt.make_estimator("snap2", model, losses.mse, max_influence_bytes=nbytes - 1).init(
            params, carry, inputs=batch.inputs)


def test_update_keeps_the_layout_and_zeros_in_the_padding(key):
    """``init`` measures the layout once; ``update`` carries it unchanged, and the padding entries of the stored
    influence (padding rows and units of a group) stay exactly zero."""
    model, params, batch = random_problem(cells.sparse_elman(8, density=0.25, seed=1), key, B=2, T=4)
    est = jbptt.make_estimator("snap2", model, losses.mse, stateful=True)
    carry = model.initial_carry(params, (2,))
    with pytest.raises(ValueError, match="inputs="):
        est.init(params, carry)
    state = est.init(params, carry, inputs=batch.inputs)
    _, _, new = jax.jit(est.update)(params, state, batch)
    for a, b in zip(jax.tree.leaves(state.pattern), jax.tree.leaves(new.pattern), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    lay = jax.tree.map(np.asarray, new.pattern)
    pad = (lay.rows[:, :, None] >= flat_step(model, params).P) | (lay.units[:, None, :] >= model.hidden_size)
    assert pad.any() and not np.any(np.asarray(new.trace)[:, pad]) and np.any(np.asarray(new.trace)[:, ~pad])
