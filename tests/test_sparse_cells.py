"""Sparse recurrent cells (jbptt.cells.sparse): the dense cells with a fixed masked recurrent matrix, whose params
are only the non-zero recurrent weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbptt
from jbptt import cells, losses
from jbptt.cells.sparse import densify, sparse_pattern, to_dense_params
from jbptt.estimators.bptt import reference_gradient
from jbptt.testing import random_problem, to_f64

H, I, B = 6, 3, 2
CASES = {  # name: (sparse factory, dense factory, gate blocks)
    "elman": (cells.sparse_elman, cells.elman, 1),
    "lstm": (cells.sparse_lstm, cells.lstm, 4),
    "gru": (cells.sparse_gru, cells.gru, 3),
}


def _setup(name, density, seed=0):
    sparse_f, dense_f, gates = CASES[name]
    sp, dn = sparse_f(H, density=density, seed=seed), dense_f(H)
    rng = np.random.default_rng(7)
    params = to_f64(sp.init(jax.random.PRNGKey(1), I))
    params = jax.tree.map(lambda a: a + 0.3 * rng.standard_normal(a.shape), params)  # no zero biases
    pattern = sparse_pattern(H, density=density, seed=seed, gates=gates)
    carry = jax.tree.map(lambda c: c + 0.5 * rng.standard_normal(c.shape), sp.initial_carry(params, (B,)))
    x = jnp.asarray(rng.standard_normal((B, I)))
    return sp, dn, gates, params, pattern, carry, x


@pytest.mark.parametrize("name", sorted(CASES))
def test_sparse_equals_masked_dense_and_grads_gather(name):
    sp, dn, gates, params, pattern, carry, x = _setup(name, 0.3)
    dense = to_dense_params(params, pattern, H, gates)
    w = np.asarray(dense["w_h"])
    assert np.count_nonzero(w) == len(pattern) < w.size  # really sparse, and all values land in the matrix
    for g in range(gates):  # the diagonal of every gate block is kept
        assert np.all(np.diag(w[:, g * H:(g + 1) * H]) != 0)

    def loss(step, p):
        c, y = step(p, carry, x)
        return jnp.sum(jnp.sin(y)) + sum(jnp.sum(l ** 2) for l in jax.tree.leaves(c))

    @jax.jit
    def run(params, dense):
        return (sp.step(params, carry, x), dn.step(dense, carry, x), jax.grad(lambda p: loss(sp.step, p))(params),
                jax.grad(lambda p: loss(dn.step, p))(dense))

    out_s, out_d, g_s, g_d = run(params, dense)
    for a, b in zip(jax.tree.leaves(out_s), jax.tree.leaves(out_d), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    np.testing.assert_allclose(g_s["w_h_values"], np.asarray(g_d["w_h"]).reshape(-1)[pattern], rtol=0, atol=1e-10)
    for k in params:
        if k != "w_h_values":
            np.testing.assert_allclose(g_s[k], g_d[k], rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", sorted(CASES))
def test_density_one_is_the_dense_cell(name):
    sparse_f, dense_f, gates = CASES[name]
    sp, dn = sparse_f(H, density=1.0, seed=3), dense_f(H)
    key = jax.random.PRNGKey(4)
    p_s, p_d = to_f64(sp.init(key, I)), to_f64(dn.init(key, I))
    np.testing.assert_array_equal(p_s["w_h_values"], np.asarray(p_d["w_h"]).reshape(-1))  # same init, flat layout
    rng = np.random.default_rng(0)
    carry = jax.tree.map(lambda c: c + rng.standard_normal(c.shape), sp.initial_carry(p_s, (B,)))
    x = jnp.asarray(rng.standard_normal((B, I)))
    out_s, out_d = sp.step(p_s, carry, x), dn.step(p_d, carry, x)
    for a, b in zip(jax.tree.leaves(out_s), jax.tree.leaves(out_d), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", sorted(CASES))
def test_param_count_shrinks_with_density(name):
    sparse_f, dense_f, gates = CASES[name]
    n = 20

    def count(cell):
        return sum(a.size for a in jax.tree.leaves(jax.eval_shape(lambda k: cell.init(k, I), jax.random.PRNGKey(0))))

    p_dense, p_full = count(dense_f(n)), count(sparse_f(n, density=1.0))
    p_half, p_tenth = count(sparse_f(n, density=0.5)), count(sparse_f(n, density=0.1))
    assert p_full == p_dense
    assert p_dense - p_half == gates * n * n // 2
    assert p_dense - p_tenth == gates * (n * n - 40)  # round(0.1 * 400) = 40 kept per block, diagonal included
    assert len(sparse_pattern(n, density=0.01, gates=gates)) == gates * n  # below 1/H: only the diagonal


@pytest.mark.parametrize("name", sorted(CASES))
def test_jvp_and_vmap_of_step(name):
    sp, dn, gates, params, pattern, carry, x = _setup(name, 0.4)
    rng = np.random.default_rng(3)
    tangent = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), params)

    @jax.jit
    def check(params, tangent):
        # jvp of the sparse step == jvp of the dense step at the densified params along the densified tangent
        out_s = jax.jvp(lambda p: sp.step(p, carry, x), (params,), (tangent,))
        out_d = jax.jvp(lambda p: dn.step(p, carry, x), (to_dense_params(params, pattern, H, gates),),
                        (to_dense_params(tangent, pattern, H, gates),))
        # vmap over the batch of the unbatched step == the batched step; vmap over stacked params
        batched = sp.step(params, carry, x)
        mapped = jax.vmap(lambda c, xi: sp.step(params, c, xi))(carry, x)
        per = jax.vmap(lambda p: sp.step(p, carry, x))(jax.tree.map(lambda a, t: jnp.stack([a, t]), params, tangent))
        second = sp.step(tangent, carry, x)
        return out_s, out_d, batched, mapped, jax.tree.map(lambda a: a[1], per), second

    out_s, out_d, batched, mapped, per, second = check(params, tangent)
    for a, b in [(out_s, out_d), (batched, mapped), (per, second)]:
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(u, v, rtol=0, atol=1e-12)


def test_exact_rtrl_equals_bptt_on_sparse_elman():
    cell, params, batch = random_problem(cells.sparse_elman(5, density=0.3, seed=2), jax.random.PRNGKey(5),
                                         B=2, T=5, input_size=2, output_size=2)
    carry = cell.initial_carry(params, (2,))
    est = jbptt.make_estimator("rtrl", cell, losses.mse)
    state = est.init(params, carry, inputs=batch.inputs)
    loss, grads, _ = est.update(params, state, batch)
    ref_loss, ref_grads = reference_gradient(cell, losses.mse, params, batch, carry)
    np.testing.assert_allclose(loss, ref_loss, rtol=0, atol=1e-10)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
    assert len(sparse_pattern(5, density=0.3, seed=2)) in [np.size(a) for a in jax.tree.leaves(params)]


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), "dense", None])
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_density_raises(name, bad):
    with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\]"):
        CASES[name][0](4, density=bad)


def test_pattern_is_fixed_by_seed():
    a, b = sparse_pattern(16, density=0.2, seed=1), sparse_pattern(16, density=0.2, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, sparse_pattern(16, density=0.2, seed=2))
    assert np.all(np.diff(a) > 0)  # sorted and unique
    w = densify(jnp.arange(1.0, len(a) + 1), a, 16)
    assert w.shape == (16, 16) and np.count_nonzero(np.asarray(w)) == len(a)


def test_a_config_builds_a_sparse_cell_by_name():
    """``model.cell: sparse_elman`` with ``options.density`` builds through the experiment layer (jbptt.cells.CELLS),
    with fewer parameters than the dense cell; a bad density is a config-time error."""
    from jbptt.experiment.build import build_model
    from jbptt.experiment.config import parse_config

    def n_params(cell, density=None):
        model = {"cell": cell, "hidden": 16} | ({"options": {"density": density}} if density else {})
        built = build_model(parse_config({"task": {"name": "adding", "options": {"length": 8}}, "model": model}))
        params = built.cell.init(jax.random.key(0), built.task.input_size)
        return sum(a.size for a in jax.tree.leaves(params))

    assert n_params("sparse_elman", 0.25) < n_params("elman") - 16 * 16 // 2
    with pytest.raises(Exception, match="density"):
        n_params("sparse_elman", 2.0)
