"""Remat schedules: gradients equal plain BPTT, evaluation counts equal predictions, the plan is optimal."""

import heapq
import math

import jax
import jax.numpy as jnp
import pytest

from jbptt import cells, losses, remat
from jbptt.batch import Batch
from jbptt.estimators.bptt import bptt, loss_and_outputs, reference_gradient

T = 13


def _cells():
    return {
        "elman": cells.with_readout(cells.elman(5, dtype=jnp.float64), 2),
        "lstm": cells.with_readout(cells.lstm(4, dtype=jnp.float64), 2),
        "stack": cells.with_readout(cells.stack([cells.gru(4, dtype=jnp.float64),
                                                 cells.elman(3, dtype=jnp.float64)]), 2),
    }


def _policies():
    return {
        "none": remat.none(),
        "per_step": remat.per_step(),
        "per_step_dots": remat.per_step("dots_saveable"),
        "every_k": remat.every_k(4),
        "sqrt": remat.sqrt(),
        "nested": remat.nested(3, k=2),
        "nested_nl": remat.nested(3, k=2, policy="nonlinearities"),
        "sqrt_nl": remat.sqrt("nonlinearities"),
        "binomial": remat.binomial(3),
        "plan": remat.plan(T, 5, alpha=2.0).scan,
    }


def _batch(key, B=3, I=3, O=2, ragged=True):
    k1, k2, k3 = jax.random.split(key, 3)
    xs = jax.random.normal(k1, (B, T, I), jnp.float64)
    ys = jax.random.normal(k2, (B, T, O), jnp.float64)
    if not ragged:
        return Batch(xs, ys)
    resets = jax.random.bernoulli(k3, 0.2, (B, T))
    return Batch(xs, ys, seq_lengths=jnp.array([T, 9, 4][:B]), resets=resets)


def _max_err(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                               jax.tree_util.tree_leaves(b), strict=True))


def _check_gradients(cell_name, key, ragged):
    cell = _cells()[cell_name]
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(key, p.shape, p.dtype),
                          cell.init(jax.random.key(1), 3))  # random biases too
    batch = _batch(jax.random.key(2 + ragged), ragged=ragged)
    loss0, g0 = reference_gradient(cell, losses.mse, params, batch)
    # sqrt is every_k with another k, per_step_dots per_step with another policy: run on the stacked cell only;
    # the nonlinearities policy: nested_nl on elman and lstm, sqrt_nl on the stack (GRU + Elman)
    stack_only = ("sqrt", "sqrt_nl", "per_step_dots")
    policies = {k: v for k, v in _policies().items()
                if (k not in stack_only or cell_name == "stack") and (k != "nested_nl" or cell_name != "stack")}

    @jax.jit  # one compilation for all policies (faster than one each)
    def all_policies(params, batch):
        out = {}
        for name, scan in policies.items():
            est = bptt(cell, losses.mse, scan=scan)
            out[name] = est.update(params, est.init(params, None), batch)[:2]
        return out

    for name, (loss, g) in all_policies(params, batch).items():
        assert abs(float(loss - loss0)) < 1e-12, name
        assert _max_err(g, g0) < 1e-10, (cell_name, ragged, name)


@pytest.mark.parametrize("cell_name", ["elman", "lstm", "stack"])
def test_gradient_equals_plain_bptt(cell_name, key):
    """Every policy, with seq_lengths and resets (the masked path covers the plain one)."""
    _check_gradients(cell_name, key, True)


@pytest.mark.slow
@pytest.mark.parametrize("cell_name", ["elman", "lstm", "stack"])
def test_gradient_equals_plain_bptt_unmasked(cell_name, key):
    _check_gradients(cell_name, key, False)


@pytest.mark.parametrize("name", ["every_k", "binomial", "plan"])
def test_reverse_and_input_gradient(name, key):
    """reverse=True and gradients w.r.t. the inputs and the initial carry (differentiated xs path)."""
    cell = _cells()["elman"]
    params = cell.init(key, 3)
    batch = _batch(jax.random.key(3), ragged=False)
    scan = _policies()[name]

    def loss(p, xs, h0, scan):
        from jbptt.unroll import unroll
        c, ys = unroll(cell, p, xs, h0, reverse=True, scan=scan)
        return jnp.sum(ys ** 2) + jnp.sum(jnp.sin(c))

    h0 = jax.random.normal(jax.random.key(4), (3, 5), jnp.float64)
    g0 = jax.grad(loss, argnums=(0, 1, 2))(params, batch.inputs, h0, None)
    g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(params, batch.inputs, h0, scan)
    assert _max_err(g, g0) < 1e-10


def test_executor_under_vmap_and_scan_policies_under_jvp(key):
    cell = _cells()["lstm"]
    params = cell.init(key, 3)
    batch = _batch(jax.random.key(5), ragged=False)

    def per_example(p, x, y, scan):
        return loss_and_outputs(cell, losses.mse, p, Batch(x[None], y[None]), scan=scan)[0]

    grad = jax.grad(per_example)
    g0 = jax.vmap(grad, (None, 0, 0, None))(params, batch.inputs, batch.targets, None)
    for name in ("plan",):
        g = jax.vmap(grad, (None, 0, 0, None))(params, batch.inputs, batch.targets, _policies()[name])
        assert _max_err(g, g0) < 1e-10, name
    tangent = jax.tree.map(jnp.ones_like, params)
    f = lambda p, scan: loss_and_outputs(cell, losses.mse, p, batch, scan=scan)[0]
    _, t0 = jax.jvp(lambda p: f(p, None), (params,), (tangent,))
    for name in ("nested",):
        scan = _policies()[name]
        _, t = jax.jvp(lambda p, scan=scan: f(p, scan), (params,), (tangent,))
        assert abs(float(t - t0)) < 1e-10, name


# ------------------------------------------------------------------------------------------------------------
# Counting cell evaluations in the compiled program.


def _count(cell, params, batch, scan):
    counter = [0]
    counting = remat.counting_cell(cell, counter)
    f = jax.jit(jax.grad(lambda p: loss_and_outputs(counting, losses.mse, p, batch, scan=scan)[0]))
    jax.block_until_ready(f(params))
    jax.effects_barrier()
    return counter[0]


def test_counted_evaluations_match_predictions(key):
    cell = cells.with_readout(cells.elman(3, dtype=jnp.float64, fused=None), 1)  # per-step scan in every segment
    params = cell.init(key, 2)
    n = 29
    batch = Batch(jax.random.normal(key, (1, n, 2), jnp.float64), jnp.zeros((1, n, 1)))
    pl = remat.plan(n, 6, alpha=2.0)
    cases = [("none", remat.none(), remat.evaluations("none", n)),
             ("per_step", remat.per_step(), remat.evaluations("per_step", n)),
             ("every_k", remat.every_k(5), remat.evaluations("every_k", n, k=5)),
             ("sqrt", remat.sqrt(), remat.evaluations("sqrt", n)),
             ("sqrt_nl", remat.sqrt("nonlinearities"),
              remat.evaluations("sqrt", n, checkpoint_policy="nonlinearities")),
             ("nested", remat.nested(3), remat.evaluations("nested", n, levels=3)),
             ("binomial", remat.binomial(4), remat.evaluations("binomial", n, slots=4)),
             ("plan", pl.scan, pl.evaluations)]
    for name, scan, predicted in cases:
        assert _count(cell, params, batch, scan) == predicted, name
    assert pl.evaluations == remat.evaluations("plan", n, budget=6, alpha=2.0)
    assert n < pl.evaluations <= remat.revolve_evaluations(n, 6)  # internal-state runs never cost more


def _revolve_minimum(l, s):
    """Griewank & Walther (2000): with beta(s, r) = C(s + r, s) and r the repetition number
    (beta(s, r - 1) < l <= beta(s, r)), the minimal number of forward steps is r l - beta(s + 1, r - 1);
    reversing also evaluates each step once more (its "youturn")."""
    r = 0
    while math.comb(s + r, s) < l:
        r += 1
    return r * l - math.comb(s + 1 + r - 1, s + 1) + l


def test_binomial_10_slots_t1024_uses_revolves_minimum(key):
    cell = cells.with_readout(cells.elman(2, dtype=jnp.float64), 1)
    params = cell.init(key, 1)
    n = 1024
    batch = Batch(jax.random.normal(key, (1, n, 1), jnp.float64), jnp.zeros((1, n, 1)))
    expected = _revolve_minimum(n, 10)
    assert _count(cell, params, batch, remat.binomial(10)) == expected


def test_hidden_only_dp_equals_revolve_formula():
    dp = remat._dp(40, 5, (1,))
    for s in range(1, 6):
        for l in range(1, 41):
            assert l + dp.F[0, l, s] == _revolve_minimum(l, s), (l, s)
            assert dp.R[0, l, s] == _revolve_minimum(l, s), (l, s)


# ------------------------------------------------------------------------------------------------------------
# Planner optimality: exhaustive search over all action sequences of the machine the executor runs.


def _brute_force(n, S, cap):
    """Fewest cell evaluations over ALL schedules of the executor's machine with ``S`` carry slots and runs of
    at most ``cap`` steps, found by Dijkstra over the machine's states.

    Forward phase (the forward pass, T evaluations counted up front): the carry advances from 0 to n once; any
    carry can be snapshotted; at the end the last L steps' internal states may be kept. Backward phase:
    restore a snapshot, drop one, snapshot, advance one step (1 evaluation), or reverse the L steps ending at
    the next
    step to
    be reversed from the carry in hand (L evaluations); at most S snapshots at any time and L <= cap.
    """
    def run_ok(snaps, L):
        return L <= cap

    start = ("fwd", 0, frozenset([0]))
    dist, heap, tie = {start: 0}, [(0, 0, start)], 0
    while heap:
        d, _, state = heapq.heappop(heap)
        if d > dist.get(state, math.inf):
            continue
        moves = []
        if state[0] == "fwd":
            _, p, snaps = state
            if p < n and p not in snaps and len(snaps) < S:
                moves.append((0, ("fwd", p, snaps | {p})))
            if p < n - 1:
                moves.append((0, ("fwd", p + 1, snaps)))
            L = n - p
            if L >= 1 and run_ok(snaps, L):  # keep the last L steps' residuals, reverse them: free
                moves.append((0, ("bwd", p, None, frozenset(q for q in snaps if q < p))))
        else:
            _, b, reg, snaps = state
            if b == 0:
                return d
            for q in snaps:
                moves.append((0, ("bwd", b, q, snaps)))
                moves.append((0, ("bwd", b, reg, snaps - {q})))
            if reg is not None:
                if reg not in snaps and len(snaps) < S:
                    moves.append((0, ("bwd", b, reg, snaps | {reg})))
                if reg < b - 1:
                    moves.append((1, ("bwd", b, reg + 1, snaps)))
                L = b - reg
                if run_ok(snaps, L):
                    moves.append((L, ("bwd", reg, None, frozenset(q for q in snaps if q < reg))))
        for cost, nxt in moves:
            if d + cost < dist.get(nxt, math.inf):
                dist[nxt] = d + cost
                tie += 1
                heapq.heappush(heap, (d + cost, tie, nxt))
    return math.inf


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.5])
def test_plan_is_optimal_against_brute_force(alpha):
    """plan(n, units) equals the best brute-force schedule over every (slots, run cap) fitting the budget."""
    for n in range(1, 10):
        for units in (1, 2, 3, 4, 5.5):
            fits = [(S, cap) for S in range(1, n + 1) for cap in range(1, n + 1)
                    if S + (cap - 1) * alpha <= units + 1e-9]
            expected = n + min(_brute_force(n, S, cap) for S, cap in fits)
            pl = remat.plan(n, units, alpha=alpha)
            assert pl.evaluations == expected, (n, units, alpha)
            assert pl.peak_units <= units + 1e-9


def test_binomial_is_the_cap_1_case():
    for n in range(1, 8):
        for S in (1, 2, 3):
            assert remat.binomial_schedule(n, S).evaluations == n + _brute_force(n, S, 1), (n, S)


def test_schedule_actions_reverse_every_step_once():
    """Simulates the action lists: every step is reversed exactly once, last first, from the right carry."""
    for sched in [remat.binomial_schedule(50, 4), remat.plan(50, 9, alpha=1.5).schedule]:
        stored = {sl: p for p, sl in sched.spine}
        reg, todo = None, sched.tail
        for op, a, n, sl in sched.actions.tolist():
            if op == 0:
                assert stored[sl] == a
                reg = a
            elif op == 1:
                assert reg == a
                reg = a + n
            elif op == 2:
                stored[sl] = reg
            else:
                L = sched.run_lengths[op - 3]
                assert reg == a and a + L == todo
                todo, reg = a, None
        assert todo == 0
    assert remat.plan(50, 9, alpha=1.5).peak_units <= 9
    assert remat.binomial_schedule(50, 4).slots == 4


# ------------------------------------------------------------------------------------------------------------
# Memory.


def _temp_bytes(cell, params, batch, scan):
    f = jax.jit(jax.grad(lambda p: loss_and_outputs(cell, losses.mse, p, batch, scan=scan)[0]))
    return f.lower(params).compile().memory_analysis().temp_size_in_bytes


def test_temp_memory_monotone_as_budget_shrinks(key):
    n = 64
    cell = cells.with_readout(cells.elman(32, dtype=jnp.float32), 1)
    params = cell.init(key, 1)
    batch = Batch(jax.random.normal(key, (8, n, 1)), jnp.zeros((8, n, 1)))
    plain = _temp_bytes(cell, params, batch, None)
    mems = [_temp_bytes(cell, params, batch, remat.plan(n, u, alpha=3.0).scan) for u in (40, 16, 6)]
    assert all(a >= b for a, b in zip(mems, mems[1:], strict=False)), mems
    assert mems[-1] < 0.25 * plain
    slots = [_temp_bytes(cell, params, batch, remat.binomial(s)) for s in (16, 4)]
    assert all(a >= b for a, b in zip(slots, slots[1:], strict=False)), slots
    assert _temp_bytes(cell, params, batch, remat.sqrt()) < plain


def test_nonlinearity_policy_saves_memory_without_recomputing_matrix_products(key):
    """Inside sqrt segments, saving tanh outputs keeps 2 carries a step instead of 3, and the compiled program
    has no more dot ops than the policy-free one (only elementwise work is replayed)."""
    n = 64
    cell = cells.with_readout(cells.elman(32, dtype=jnp.float32, fused=None), 1)  # scan the step (no layer)
    params = cell.init(key, 1)
    batch = Batch(jax.random.normal(key, (8, n, 1)), jnp.zeros((8, n, 1)))

    def compiled(scan):
        f = jax.jit(jax.grad(lambda p: loss_and_outputs(cell, losses.mse, p, batch, scan=scan)[0]))
        c = f.lower(params).compile()
        return c.memory_analysis().temp_size_in_bytes, c.as_text().count(" dot(")

    for plain, with_policy in [(remat.sqrt(), remat.sqrt("nonlinearities")),
                               (remat.none(), remat.per_step("nonlinearities"))]:
        (m0, d0), (m1, d1) = compiled(plain), compiled(with_policy)
        assert d1 == d0 > 0
        assert m1 < m0


def test_scan_from_config():
    assert remat.scan_from_config(None) is None
    assert remat.scan_from_config({"policy": "none"}) is None
    for cfg in [{"policy": "sqrt"}, {"policy": "every_k", "k": 32}, {"policy": "nested", "levels": 2},
                {"policy": "binomial", "slots": 4}, {"policy": "plan", "budget": 8, "alpha": 2.0},
                {"policy": "per_step", "checkpoint_policy": "dots_saveable"},
                {"policy": "nested", "levels": 3, "checkpoint_policy": "nonlinearities"}]:
        assert callable(remat.scan_from_config(cfg))
    with pytest.raises(ValueError, match="unknown remat policy"):
        remat.scan_from_config({"policy": "revolve"})
    with pytest.raises(ValueError, match="bad options"):
        remat.scan_from_config({"policy": "sqrt", "k": 3})
    with pytest.raises(ValueError, match="unknown checkpoint policy"):
        remat.per_step("no_such_policy")
    with pytest.raises(ValueError, match="planned for T=5"):
        remat.plan(5, 3).scan(lambda c, x: (c, x), jnp.zeros(2), jnp.zeros((6, 2)))


def test_plan_budget_in_bytes_and_tiny_sequences(key):
    by_units = remat.plan(40, 12, alpha=2.5)
    by_bytes = remat.plan(40, 12 * 4096, carry_bytes=4096, internal_bytes=2.5 * 4096)
    assert by_bytes.evaluations == by_units.evaluations and by_bytes.schedule.slots == by_units.schedule.slots
    with pytest.raises(ValueError, match="at least one carry"):
        remat.plan(10, 100, carry_bytes=4096)
    cell = _cells()["elman"]
    params = cell.init(key, 3)
    for n, scan in ((1, remat.plan(1, 1).scan), (2, remat.binomial(1))):
        xs = jax.random.normal(jax.random.key(n), (2, n, 3), jnp.float64)
        batch = Batch(xs, jax.random.normal(key, (2, n, 2), jnp.float64))
        g0 = reference_gradient(cell, losses.mse, params, batch)[1]
        g = jax.grad(lambda p, s=scan, b=batch: loss_and_outputs(cell, losses.mse, p, b, scan=s)[0])(params)
        assert _max_err(g, g0) < 1e-10, n


# ------------------------------------------------------------------------------------------------------------
# Fused layers inside the segments (Elman: a custom VJP that stores only the carries, "alpha = 1").

SEGMENTED = {"every_k": remat.every_k(4), "sqrt": remat.sqrt(), "nested": remat.nested(3, k=2)}


@pytest.mark.parametrize("readout", [False, True])
def test_layer_segments_equal_plain_bptt(readout, key):
    """Segmented schedules that run the Elman layer on their segments (with the readout inside its loop, or
    without one; tanh and relu; seq_lengths, resets, reverse; gradients w.r.t. params, inputs and the initial
    carry, and a loss on the final carry) equal plain BPTT of the per-step cell (float64, 1e-10)."""
    from jbptt.unroll import unroll

    batch = _batch(jax.random.key(7))
    h0 = jax.random.normal(jax.random.key(8), (3, 5), jnp.float64)

    def loss(p, xs, h0, cell, scan, reverse):
        c, ys = unroll(cell, p, xs, h0, seq_lengths=batch.seq_lengths, resets=batch.resets, reverse=reverse,
                       scan=scan)
        return jnp.sum(jnp.tanh(ys) * jnp.cos(jnp.arange(ys.size).reshape(ys.shape))) + jnp.sum(jnp.sin(c))

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=(3, 4, 5))
    for activation in ("tanh", "relu"):
        def build(fused, activation=activation):
            core = cells.elman(5, activation=activation, dtype=jnp.float64, fused=fused)
            return cells.with_readout(core, 2) if readout else core

        cell, plain = build("reverse"), build(None)
        assert cells.layer_of(cell).segment is not None and cells.layer_of(cell).apply is None
        params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(key, p.shape, p.dtype), plain.init(key, 3))
        for reverse in (False, True):
            ref = grad(params, batch.inputs, h0, plain, None, reverse)
            for name, scan in SEGMENTED.items():
                got = grad(params, batch.inputs, h0, cell, scan, reverse)
                assert _max_err(got, ref) < 1e-10, (activation, reverse, name)


def test_layer_segments_under_vmap(key):
    """Per-example gradients (vmap of grad) through sqrt with the Elman layer equal plain BPTT's (1e-10)."""
    cell, plain = (cells.with_readout(cells.elman(4, dtype=jnp.float64, fused=f), 1) for f in ("reverse", None))
    params = cell.init(key, 2)
    x = jax.random.normal(jax.random.key(1), (3, 1, 11, 2), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (3, 1, 11, 1), jnp.float64)

    def per_example(c, scan):
        loss = lambda p, x, y: loss_and_outputs(c, losses.mse, p, Batch(x, y), scan=scan)[0]
        return jax.vmap(jax.grad(loss), (None, 0, 0))(params, x, y)

    assert _max_err(per_example(cell, remat.sqrt()), per_example(plain, None)) < 1e-10


def test_layer_segments_counted_evaluations(key):
    """With the layer on the segments the counted evaluations equal the per-step scan's prediction (the layer's
    backward pass replays nothing); a checkpoint policy selects the per-step scan, whose replay is counted."""
    cell = cells.with_readout(cells.elman(3, dtype=jnp.float64), 1)
    params = cell.init(key, 2)
    n = 29
    batch = Batch(jax.random.normal(key, (1, n, 2), jnp.float64), jnp.zeros((1, n, 1), jnp.float64))
    assert hasattr(remat.sqrt(), "run_layer") and not hasattr(remat.sqrt("nonlinearities"), "run_layer")
    cases = [("every_k", remat.every_k(5), {"k": 5}), ("sqrt", remat.sqrt(), {}),
             ("sqrt", remat.sqrt("nonlinearities"), {"checkpoint_policy": "nonlinearities"}),
             ("nested", remat.nested(3), {"levels": 3})]
    for name, scan, kw in cases:
        assert _count(cell, params, batch, scan) == remat.evaluations(name, n, **kw), (name, kw)
    k = math.ceil(math.sqrt(n))  # 6: four checkpointed segments of 6 steps are recomputed, the last 5 are not
    assert remat.evaluations("sqrt", n) == n + k * (n // k)


def test_layer_segments_keep_one_carry_per_step(key):
    """sqrt with the Elman layer (readout inside the loop) keeps about T/k + k carries: the outer checkpoints and
    one segment's carries, nothing per step beyond the carry, and less than sqrt over the per-step scan."""
    n, Bm, Hm = 256, 16, 64
    batch = Batch(jax.random.normal(key, (Bm, n, 2), jnp.float32), jnp.zeros((Bm, n, 1), jnp.float32))

    def temp(fused, scan):
        cell = cells.with_readout(cells.elman(Hm, fused=fused), 1)
        return _temp_bytes(cell, cell.init(key, 2), batch, scan)

    carry = Bm * Hm * 4
    layer, scanned, plain = temp("reverse", remat.sqrt()), temp(None, remat.sqrt()), temp(None, None)
    k = math.ceil(math.sqrt(n))
    fixed = 8 * n * Bm * 4  # [T, B, I + O]-sized inputs, targets, outputs and their transposes
    assert layer <= (n // k + k + 4) * carry + fixed, (layer / carry)
    assert layer < 0.8 * scanned < 0.1 * plain
