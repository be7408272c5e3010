"""Online estimators carry influence only for the parameters that act on the state (float64, random inputs).

The split (:func:`jbptt.estimators.online.state_acting`) is read off the step's dataflow; exact RTRL stays equal to
plain BPTT, and every estimator gives the same gradient with and without it (the rows it drops are exactly zero).
SnAp-1, e-prop and RFLO run on LSTM and GRU; SnAp-1 there equals a plainly written masked dense SnAp-1.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jbptt
from jbptt import cells, losses
from jbptt.estimators.bptt import reference_gradient
from jbptt.estimators.online import state_acting, unit_rows
from jbptt.testing import random_problem

TOL = 1e-10
I = 3  # input size


def relative_error(estimate, reference):
    """``||estimate - reference|| / ||reference||`` over whole pytrees, on the host."""
    flat = lambda tree: np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree.leaves(tree)])
    return np.linalg.norm(flat(estimate) - flat(reference)) / np.linalg.norm(flat(reference))


def problem(cell, key=None, **options):
    key = jax.random.key(0) if key is None else key
    options = {"B": 2, "T": 8, "input_size": I, **options}
    _, params, batch = random_problem(cell, key, output_size=cell.output_size, **options)
    return params, batch


def size(tree):
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


READOUT = cells.with_readout(cells.elman(4), 4)  # O = N: the readout's last axis is a multiple of N
STACK = cells.with_readout(cells.learned_initial_carry(cells.stack([cells.lstm(3), cells.elman(2)])), 3)


def test_trace_rows_are_the_state_acting_params(key):
    """``Ps`` = recurrent + input + bias (+ learned initial carry) parameters, for plain, fused, sparse cells,
    stacks and an ESN (no trainable parameter acts on its state); the readout has no influence rows."""
    def n_rec(h):
        return h * h + I * h + h
    cases = [(READOUT, n_rec(4)), (cells.with_readout(jbptt.fused.cell("elman", 4), 4), n_rec(4)),
             (cells.with_readout(cells.learned_initial_carry(cells.elman(4)), 2), n_rec(4) + 4),
             (STACK, 4 * (3 * 3 + I * 3 + 3) + (2 * 2 + 3 * 2 + 2) + (3 + 3 + 2)),
             (cells.with_readout(cells.esn(4, density=0.5), 4), 0)]
    sparse = cells.with_readout(cells.CELLS["sparse_elman"](6, density=0.5), 6)
    p_sparse = sparse.init(jax.random.key(0), I)
    cases.append((sparse, size(p_sparse["core"])))
    for cell, Ps in cases:
        params, batch = problem(cell, key, B=2, T=2)
        x = jax.ShapeDtypeStruct((I,), jnp.float64)
        acting = state_acting(cell, params, x)
        trainable = jax.tree.leaves(cells.trainable_mask(params))
        P = sum(a.size for a, m in zip(jax.tree.leaves(params), trainable, strict=True) if m)
        readout = jax.tree.leaves(params["readout"])
        assert acting[-len(readout):] == (False,) * len(readout)
        carry = cell.initial_carry(params, (2,))
        n = size(carry) // 2
        for split, rows in ((True, Ps), (False, P)):
            est = jbptt.make_estimator("rtrl", cell, losses.mse, split=split)
            state = jax.eval_shape(lambda p, c, x, est=est: est.init(p, c, inputs=x), params, carry, batch.inputs)
            assert state.trace.shape == (2, rows, n)


def test_unit_rows_leave_out_a_readout_with_n_outputs():
    """The compressed layout took every leaf whose last axis is a multiple of N, so a readout ``[N, N]`` got
    rows; with the split only the recurrent, input and bias rows remain, and a state-acting leaf that does not fit
    the layout (a sparse cell's values) is an error instead of an influence silently dropped."""
    params = READOUT.init(jax.random.key(0), I)
    acting = state_acting(READOUT, params, jax.ShapeDtypeStruct((I,), jnp.float32))
    assert unit_rows(READOUT, params, acting).idx.shape == (1 + 4 + I, 4)
    assert unit_rows(READOUT, params).idx.shape == (1 + 4 + I + 4 + 1, 4)
    sparse = cells.CELLS["sparse_elman"](4, density=0.4)  # w_h_values: [6] recurrent weights, not per unit
    params = sparse.init(jax.random.key(0), I)
    acting = state_acting(sparse, params, jax.ShapeDtypeStruct((I,), jnp.float32))
    with pytest.raises(ValueError, match=r"shape \(6,\).*snap2"):
        unit_rows(sparse, params, acting)


RTRL_CASES = [
    pytest.param(READOUT, {}, id="readout"),
    pytest.param(READOUT, {"mode": "jvp"}, id="readout_jvp", marks=pytest.mark.slow),
    pytest.param(STACK, {}, id="stack_learned_carry"),
    pytest.param(cells.with_readout(cells.esn(4, density=0.5), 2), {}, id="esn"),
    pytest.param(cells.with_readout(cells.indrnn(4, activation="tanh"), 4), {"diagonal": True}, id="indrnn_diagonal"),
]


@pytest.mark.parametrize("cell,options", RTRL_CASES)
def test_split_rtrl_equals_bptt(cell, options, key):
    """Exact RTRL with the split == BPTT (lengths, resets, a loss mask), the readout's direct gradient included."""
    params, batch = problem(cell, key, lengths=True, resets=True, mask=True)
    est = jbptt.make_estimator("rtrl", cell, losses.mse, **options)

    def both(p, b):
        state = est.init(p, cell.initial_carry(p, (b.inputs.shape[0],)), inputs=b.inputs)
        return est.update(p, state, b)[:2], reference_gradient(cell, losses.mse, p, b)

    (loss, g), (loss_ref, g_ref) = jax.jit(both)(params, batch)
    assert abs(float(loss - loss_ref)) <= TOL * abs(float(loss_ref))
    assert float(relative_error(g, g_ref)) <= TOL
    assert float(relative_error(g["readout"], g_ref["readout"])) <= TOL


FAST = [("rtrl", {}), ("uoro", {}), ("kfrtrl", {}), ("rflo", {})]
OTHERS = [("rtrl", {"mode": "jvp"}), ("eprop", {})]


@pytest.mark.parametrize("specs", [FAST, pytest.param(OTHERS, marks=pytest.mark.slow)], ids=["fast", "others"])
def test_split_and_unsplit_estimators_agree(specs, key):
    """Every online estimator gives the same gradient with and without the split from the same key (the dropped
    rows are exactly zero, so even the stochastic estimates agree), while its (stateful) trace holds fewer rows;
    a check that can fail: dropping a row that acts on the state changes the gradient."""
    params, batch = problem(READOUT, key, T=4, resets=True)
    carry = READOUT.initial_carry(params, (2,))
    pairs = [[jbptt.make_estimator(name, READOUT, losses.mse, stateful=True, split=split, **options)
              for split in (True, False)] for name, options in specs]
    states = [[est.init(params, carry, key=jax.random.key(3), inputs=batch.inputs) for est in pair] for pair in pairs]

    @jax.jit
    def run(states):
        out = []
        for pair, pair_states in zip(pairs, states, strict=True):
            for est, state in zip(pair, pair_states, strict=True):
                _, g, state = est.update(params, state, batch)
                out.append((g, state.trace))
        return out

    out = run(states)
    for i, (name, _) in enumerate(specs):
        (g_split, tr_split), (g_full, tr_full) = out[2 * i], out[2 * i + 1]
        assert float(relative_error(g_split, g_full)) <= TOL, name
        assert size(tr_split) < size(tr_full), name


def test_stateful_split_needs_example_inputs(key):
    params, batch = problem(READOUT, key, T=2)
    carry = READOUT.initial_carry(params, (2,))
    with pytest.raises(ValueError, match="inputs="):
        jbptt.make_estimator("rtrl", READOUT, losses.mse, stateful=True).init(params, carry)
    jbptt.make_estimator("rtrl", READOUT, losses.mse, stateful=True, split=False).init(params, carry)
    jbptt.make_estimator("uoro", READOUT, losses.mse).init(params, carry)  # not stateful: the trace is never read


def masked_dense_snap1(cell, params, batch, units: int):
    """SnAp-1 written plainly: the dense influence ``J [P, n]`` masked to the units each parameter drives at once
    (every carry component of a unit where the immediate influence ``M`` is non-zero at one of two random points:
    jbptt's SnAp-1 keeps whole units, e.g. an LSTM output gate's ``c`` too), ``J_t = (J_{t-1} D_t^T + M_t^T) *
    mask``; the gradient of step ``t`` is the immediate one plus ``J_{t-1} dl_t/ds_{t-1}``. No resets, lengths or
    loss masks (weights ``1 / (B T)``)."""
    theta, unravel = ravel_pytree(params)
    s0, unravel_c = ravel_pytree(cell.initial_carry(params, ()))
    B, T = batch.inputs.shape[:2]

    def step(th, s, x):
        new, y = cell.step(unravel(th), unravel_c(s), x)
        return ravel_pytree(new)[0], y

    rng = np.random.default_rng(0)
    mask = sum(jnp.abs(jax.jacfwd(step)(theta + 0.1 * rng.standard_normal(theta.shape), rng.standard_normal(s0.shape),
                                        rng.standard_normal(batch.inputs.shape[2:]))[0]) for _ in range(2)).T > 0
    P, C = theta.size, s0.size // units
    mask = jnp.tile(jnp.any(mask.reshape(P, C, units), axis=1, keepdims=True), (1, C, 1)).reshape(P, -1)

    def example(xs, ys):
        def body(carry, xy):
            s, J, g = carry
            x, target = xy
            loss_y = lambda th, ss: losses.mse(step(th, ss, x)[1], target) / (B * T)
            g_th, g_s = jax.grad(loss_y, argnums=(0, 1))(theta, s)
            M, D = jax.jacfwd(lambda th, ss: step(th, ss, x)[0], argnums=(0, 1))(theta, s)
            return (step(theta, s, x)[0], jnp.where(mask, J @ D.T + M.T, 0.0), g + g_th + J @ g_s), None

        init = (s0, jnp.zeros((theta.size, s0.size)), jnp.zeros_like(theta))
        return jax.lax.scan(body, init, (xs, ys))[0][2]

    return unravel(jnp.sum(jax.vmap(example)(batch.inputs, batch.targets), axis=0))


@pytest.mark.parametrize("cell,others", [(cells.with_readout(cells.lstm(3), 3), ("rflo",)),
                                         (cells.with_readout(cells.gru(3), 2), ("eprop",))], ids=["lstm", "gru"])
def test_snap1_on_gated_cells_equals_masked_dense_snap1(cell, others, key):
    """SnAp-1 (compressed per unit) runs on LSTM and GRU and equals the masked dense reference (an approximation:
    it differs from BPTT); e-prop and RFLO run there too, with finite gradients that differ from BPTT."""
    params, batch = problem(cell, key, T=5)
    ests = [jbptt.make_estimator(n, cell, losses.mse) for n in ("snap1", *others)]

    def run(p, b):
        c = cell.initial_carry(p, (b.inputs.shape[0],))
        return ([est.update(p, est.init(p, c, inputs=b.inputs), b)[1] for est in ests],
                masked_dense_snap1(cell, p, b, 3), reference_gradient(cell, losses.mse, p, b)[1])

    gs, g_masked, g_ref = jax.jit(run)(params, batch)
    assert float(relative_error(gs[0], g_masked)) <= TOL
    for g in gs:
        assert np.all(np.isfinite(np.concatenate([np.ravel(a) for a in jax.tree.leaves(g)])))
        assert float(relative_error(g, g_ref)) > 1e-3


def test_undefined_compressed_paths_are_clear_errors(key):
    """Where an element-wise algorithm is not defined for a gated cell or a stack, ``init`` says so."""
    cases = [("kfrtrl", cells.gru(3), {}, "factorises"), ("rtrl", cells.lstm(3), {"diagonal": True}, "element-wise"),
             ("snap1", cells.stack([cells.lstm(3), cells.elman(2)]), {}, "stacks of different sizes"),
             ("eprop", cells.stack([cells.lstm(3), cells.lstm(3)]), {}, "readout")]
    for name, cell, options, match in cases:
        params, batch = problem(cell, key, T=2)
        with pytest.raises(ValueError, match=match):
            jbptt.make_estimator(name, cell, losses.mse, **options).init(params, cell.initial_carry(params, (2,)),
                                                                         inputs=batch.inputs)


@pytest.mark.parametrize("name,split", [("snap1", True), ("eprop", False),
                                        pytest.param("rflo", True, marks=pytest.mark.slow)])
def test_unit_wise_estimators_refuse_parameters_off_their_unit(name, split):
    """A sparse cell's flat recurrent values whose count is a multiple of N look unit-wise by shape but are not:
    init checks the layout on the example inputs and refuses them (before: wrong gradients, silently)."""
    cell = cells.with_readout(cells.CELLS["sparse_elman"](8, density=0.25), 2)  # w_h_values: [16], 16 % 8 == 0
    params = cell.init(jax.random.key(0), 3)
    xs = jax.random.normal(jax.random.key(1), (2, 4, 3))
    est = jbptt.make_estimator(name, cell, losses.mse, stateful=True, split=split)
    with pytest.raises(ValueError, match="drives another unit"):
        est.init(params, cell.initial_carry(params, (2,)), inputs=xs)
    dense = cells.with_readout(cells.elman(8), 2)  # a dense cell passes the same check
    p = dense.init(jax.random.key(0), 3)
    jbptt.make_estimator(name, dense, losses.mse, stateful=True, split=split).init(
        p, dense.initial_carry(p, (2,)), inputs=xs)
