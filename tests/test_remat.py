"""Remat schedules: gradients equal plain BPTT, evaluation counts equal predictions, the plan is optimal, memory
shrinks as promised. float64 on random inputs; the reference is the plain cell's BPTT."""

import functools
import heapq
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbptt import cells, fused, losses, remat
from jbptt.batch import Batch
from jbptt.estimators.bptt import bptt, loss_and_outputs, reference_gradient
from jbptt.remat import planner
from jbptt.unroll import Scan, unroll

T = 13
F64 = jnp.float64
# Compile options of every program here: XLA's backend (LLVM) optimisations change neither the values, the temp
# memory nor the dot count these tests check, and compiling dominates their cost.


def _compiled(f, *args):
    """``jax.jit(f)`` lowered for ``args`` (positional arrays) and compiled."""
    return jax.jit(f).lower(*args).compile()


def _jit(f):
    return lambda *args: _compiled(f, *args)(*args)


CELLS = {  # fused cells: the segmented schedules run their fused paths on the segments
    "elman": lambda: cells.with_readout(fused.elman(5, dtype=F64), 2),
    "lstm": lambda: cells.with_readout(fused.lstm(4, dtype=F64), 2),
    "stack": lambda: cells.with_readout(cells.stack([fused.gru(4, dtype=F64), fused.elman(3, dtype=F64)]), 2),
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


# Random problems are drawn with numpy: eager jax.random calls would each compile a small program.


def _normal(seed, shape, dtype=F64):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(dtype))


def _params(cell, input_size, seed=0):
    """Random parameters of ``cell``'s structure (every leaf, biases too, so every gradient entry is exercised):
    normal with variance 1 / fan-in for matrices, 0.1^2 for vectors, in the leaf's dtype."""
    shapes = jax.eval_shape(lambda key: cell.init(key, input_size), jax.random.key(0))
    leaves, tree = jax.tree.flatten(shapes)
    rng = np.random.default_rng(seed)
    scale = lambda s: 1 / math.sqrt(s.shape[0]) if len(s.shape) == 2 else 0.1
    return jax.tree.unflatten(tree, [jnp.asarray((scale(s) * rng.normal(size=s.shape)).astype(s.dtype))
                                     for s in leaves])


def _batch(seed, B=3, I=3, O=2, ragged=True, n=T, dtype=F64):
    rng = np.random.default_rng(seed)
    xs, ys = (jnp.asarray(rng.normal(size=(B, n, d)).astype(dtype)) for d in (I, O))
    if not ragged:
        return Batch(xs, ys)
    return Batch(xs, ys, seq_lengths=jnp.asarray(np.array([n, 9, 4][:B])), resets=jnp.asarray(rng.random((B, n)) < 0.2))


def _max_err(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


@pytest.fixture(scope="module")
def problem():
    """``problem(name) -> (cell, params)`` for a cell of :data:`CELLS` (input size 3), built once per module."""
    return functools.cache(lambda name: (CELLS[name](), _params(CELLS[name](), 3)))


# ------------------------------------------------------------------------------------------------------------
# Gradients equal plain BPTT.

# Every policy on every cell (the slow tests) and, in the default run, a cover of it: each policy on at least one
# cell, and every fused cell under a segmented schedule (every_k/sqrt: two levels and a one-step remainder, as
# nested's), whose segments run its fused path. The stack's carry is a tuple over (GRU, Elman) layers, the LSTM's a
# tuple (h, c).
COVER = {"elman": ("none", "per_step", "per_step_dots", "every_k", "nested", "sqrt_nl", "binomial"),
         "lstm": ("every_k", "nested_nl", "plan"), "stack": ("sqrt", "nested")}


def test_cover_runs_every_policy():
    assert {p for names in COVER.values() for p in names} == set(_policies())


def _check_gradients(cell, params, names, ragged):
    batch = _batch(2 + ragged, ragged=ragged)
    policies = {name: scan for name, scan in _policies().items() if name in names}

    def all_policies(params, batch):  # the reference and every policy in one compiled program
        out = {"reference": reference_gradient(cell, losses.mse, params, batch)}
        for name, scan in policies.items():  # the BPTT estimator: a reverse-mode-only unroll
            est = bptt(cell, losses.mse, scan=scan)
            out[name] = est.update(params, est.init(params, None), batch)[:2]
        return out

    out = _jit(all_policies)(params, batch)
    loss0, g0 = out.pop("reference")
    assert set(out) == set(names)
    for name, (loss, g) in out.items():
        assert abs(float(loss) - float(loss0)) < 1e-12, name
        assert _max_err(g, g0) < 1e-10, (ragged, name)


@pytest.mark.parametrize("cell_name", [pytest.param("elman", marks=pytest.mark.slow), "lstm",
                                       pytest.param("stack", marks=pytest.mark.slow)])
def test_gradient_equals_plain_bptt(cell_name, problem):
    """The policies of :data:`COVER`, with seq_lengths and resets (the masked path covers the plain one)."""
    _check_gradients(*problem(cell_name), COVER[cell_name], True)


@pytest.mark.slow
@pytest.mark.parametrize("ragged", [True, False])
@pytest.mark.parametrize("cell_name", ["elman", "lstm", "stack"])
def test_gradient_equals_plain_bptt_every_policy(cell_name, ragged, problem):
    """Every policy on every cell, with and without seq_lengths and resets."""
    _check_gradients(*problem(cell_name), tuple(_policies()), ragged)


# (readout, activation, reverse, schedule) for the unroll-level check: in the default run every pair of the first
# three options and every schedule kind once (every_k and nested run the Elman layer on their segments, binomial and
# plan the executor), in the slow test all 40 cases
SCHEDULES = {"every_k": remat.every_k(4), "sqrt": remat.sqrt(), "nested": remat.nested(3, k=2),
             "binomial": remat.binomial(3), "plan": remat.plan(T, 5, alpha=2.0).scan}
UNROLL_CASES = [(True, "tanh", False, "nested"), (True, "relu", True, "every_k"), (False, "tanh", True, "plan"),
                (False, "relu", False, "binomial")]
ALL_UNROLL_CASES = [(r, a, rev, name) for r in (False, True) for a in ("tanh", "relu") for rev in (False, True)
                    for name in SCHEDULES]


def _check_unroll_gradients(cases):
    """Through :func:`jbptt.unroll.unroll` in a reverse-mode-only unroll (with seq_lengths, resets, ``reverse``, a
    loss on the outputs and the final carry), the gradients w.r.t. params, inputs (the executor's differentiated
    xs path) and the initial carry under each case's schedule equal jax.grad of the plain cell's scan (float64,
    1e-10). The cell is the fused Elman cell, with the readout inside its loop or without one, tanh or relu: the
    segmented schedules run its carry-only layer on their segments. ``cases``: (readout, activation, reverse,
    schedule) tuples, all checked in one compiled program."""
    batch = _batch(7)
    h0 = _normal(8, (3, 5))

    def loss(p, xs, h0, cell, scan, reverse):
        c, ys = unroll(cell, p, xs, h0, seq_lengths=batch.seq_lengths, resets=batch.resets, reverse=reverse,
                       scan=scan, reverse_mode_only=True)
        return jnp.sum(jnp.tanh(ys) * jnp.cos(jnp.arange(ys.size).reshape(ys.shape))) + jnp.sum(jnp.sin(c))

    problems = {}  # (readout, activation) -> (cell, params)
    for readout, activation, _, _ in cases:
        if (readout, activation) not in problems:
            core = fused.elman(5, activation=activation, dtype=F64)
            cell = cells.with_readout(core, 2) if readout else core
            assert cell.fused is not None and cells.plain(cell).fused is None
            problems[readout, activation] = cell, _params(cell, 3, seed=len(problems))
    references = sorted({(r, a, rev) for r, a, rev, _ in cases})

    def all_grads(all_params, xs, h0):
        grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
        cell = lambda r, a: problems[r, a][0]
        return ({(r, a, rev): grad(all_params[r, a], xs, h0, cells.plain(cell(r, a)), None, rev)
                 for r, a, rev in references},
                [grad(all_params[r, a], xs, h0, cell(r, a), SCHEDULES[name], rev) for r, a, rev, name in cases])

    all_params = {key: p for key, (_, p) in problems.items()}
    refs, got = _jit(all_grads)(all_params, batch.inputs, h0)
    for (r, a, rev, name), g in zip(cases, got, strict=True):
        assert _max_err(g, refs[r, a, rev]) < 1e-10, (r, a, rev, name)


def test_unroll_gradients_equal_plain():
    """:func:`_check_unroll_gradients` over :data:`UNROLL_CASES` (sqrt is every_k(4) at T=13: it runs in the slow
    test, and on the Elman layer in the vmap, counting and memory tests below)."""
    _check_unroll_gradients(UNROLL_CASES)


@pytest.mark.slow
def test_unroll_gradients_equal_plain_every_case():
    """Every schedule with every (readout, activation, reverse) option."""
    _check_unroll_gradients(ALL_UNROLL_CASES)


def test_executor_under_vmap_and_scan_policies_under_jvp(problem):
    """Per-example gradients (vmap of grad) through the plan executor, and forward mode through nested (the fused
    LSTM runs its jvp-capable path on the segments), equal the plain cell's."""
    cell, params = problem("lstm")
    batch = _batch(5, ragged=False)
    tangent = _params(cell, 3, seed=6)

    def per_example(c, scan, params, xs, ys):
        grad = jax.grad(lambda p, x, y: loss_and_outputs(c, losses.mse, p, Batch(x[None], y[None]), scan=scan)[0])
        return jax.vmap(grad, (None, 0, 0))(params, xs, ys)

    def jvp(c, scan, params, tangent):
        f = lambda p: loss_and_outputs(c, losses.mse, p, batch, scan=scan)[0]
        return jax.jvp(f, (params,), (tangent,))[1]

    def both(params, xs, ys, tangent):
        return ((per_example(cells.plain(cell), None, params, xs, ys),
                 per_example(cell, _policies()["plan"], params, xs, ys)),
                (jvp(cells.plain(cell), None, params, tangent), jvp(cell, _policies()["nested"], params, tangent)))

    (g0, g), (t0, t) = _jit(both)(params, batch.inputs, batch.targets, tangent)
    assert _max_err(g, g0) < 1e-10
    assert abs(float(t) - float(t0)) < 1e-10


# ------------------------------------------------------------------------------------------------------------
# Counting cell evaluations in the compiled program.


def _counts(cases: dict) -> dict:
    """Cell evaluations of one gradient per case, counted in one compiled program. ``cases``: name -> ``(cell,
    params, batch, scan, reverse_mode_only)``."""
    counters = {name: [0] for name in cases}

    def grads(all_params):
        out = {}
        for name, (cell, _, batch, scan, rmo) in cases.items():
            counting = remat.counting_cell(cell, counters[name])
            f = lambda p, c=counting, b=batch, s=scan, r=rmo: loss_and_outputs(c, losses.mse, p, b, scan=s,
                                                                               reverse_mode_only=r)[0]
            out[name] = jax.grad(f)(all_params[name])
        return out

    jax.block_until_ready(_jit(grads)({name: case[1] for name, case in cases.items()}))
    jax.effects_barrier()
    return {name: c[0] for name, c in counters.items()}


def test_counted_evaluations_match_predictions():
    """Counted in the compiled program: a plain Elman cell (the per-step scan in every segment) under every policy,
    and the fused Elman cell in a reverse-mode-only unroll (its carry-only layer on the segments) under the
    segmented ones. With the layer on the segments the count equals the per-step scan's prediction (the layer's
    backward pass replays nothing); a checkpoint policy selects the per-step scan, whose replay is counted."""
    n = 29
    plain = cells.with_readout(cells.elman(3, dtype=F64), 1)
    layer = cells.with_readout(fused.elman(3, dtype=F64), 1)
    params, batch = _params(plain, 2), _batch(1, B=1, I=2, O=1, ragged=False, n=n)
    pl = remat.plan(n, 6, alpha=2.0)
    nl = "nonlinearities"
    cases = {  # name -> (cell, scan, reverse_mode_only, predicted)
        "none": (plain, remat.none(), False, remat.evaluations("none", n)),
        "per_step": (plain, remat.per_step(), False, remat.evaluations("per_step", n)),
        "every_k": (plain, remat.every_k(5), False, remat.evaluations("every_k", n, k=5)),
        "sqrt": (plain, remat.sqrt(), False, remat.evaluations("sqrt", n)),
        "sqrt_nl": (plain, remat.sqrt(nl), False, remat.evaluations("sqrt", n, checkpoint_policy=nl)),
        "nested": (plain, remat.nested(3), False, remat.evaluations("nested", n, levels=3)),
        "binomial": (plain, remat.binomial(4), False, remat.evaluations("binomial", n, slots=4)),
        "plan": (plain, pl.scan, False, pl.evaluations),
        "layer_every_k": (layer, remat.every_k(5), True, remat.evaluations("every_k", n, k=5)),
        "layer_sqrt": (layer, remat.sqrt(), True, remat.evaluations("sqrt", n)),
        "layer_sqrt_nl": (layer, remat.sqrt(nl), True, remat.evaluations("sqrt", n, checkpoint_policy=nl)),
        "layer_nested": (layer, remat.nested(3), True, remat.evaluations("nested", n, levels=3)),
    }
    counted = _counts({name: (cell, params, batch, scan, rmo) for name, (cell, scan, rmo, _) in cases.items()})
    assert counted == {name: case[-1] for name, case in cases.items()}
    assert pl.evaluations == remat.evaluations("plan", n, budget=6, alpha=2.0)
    assert n < pl.evaluations <= remat.revolve_evaluations(n, 6)  # internal-state runs never cost more
    k = math.ceil(math.sqrt(n))  # 6: four checkpointed segments of 6 steps are recomputed, the last 5 are not
    assert remat.evaluations("sqrt", n) == n + k * (n // k)


def test_evaluations_rejects_unknown_policies_and_options():
    with pytest.raises(ValueError, match="unknown remat policy"):
        remat.evaluations("revolve", 10)
    with pytest.raises(TypeError):
        remat.evaluations("binomial", 10, levels=3)
    assert set(remat.cost.EVALUATIONS) == set(remat.POLICIES)


def _revolve_minimum(l, s):
    """Griewank & Walther (2000): with beta(s, r) = C(s + r, s) and r the repetition number
    (beta(s, r - 1) < l <= beta(s, r)), the minimal number of forward steps is r l - beta(s + 1, r - 1);
    reversing also evaluates each step once more (its "youturn")."""
    r = 0
    while math.comb(s + r, s) < l:
        r += 1
    return r * l - math.comb(s + 1 + r - 1, s + 1) + l


def test_binomial_10_slots_t1024_uses_revolves_minimum():
    cell = cells.with_readout(cells.elman(2, dtype=F64), 1)
    n = 1024
    params, batch = _params(cell, 1), _batch(1, B=1, I=1, O=1, ragged=False, n=n)
    expected = _revolve_minimum(n, 10)
    assert remat.revolve_evaluations(n, 10) == expected
    assert _counts({"binomial": (cell, params, batch, remat.binomial(10), False)}) == {"binomial": expected}


def test_hidden_only_dp_equals_revolve_formula():
    dp = planner._dp(40, 5, (1,))
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
    the next step to be reversed from the carry in hand (L evaluations); at most S snapshots at any time and
    L <= cap.
    """
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
            if 1 <= L <= cap:  # keep the last L steps' residuals, reverse them: free
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
                if L <= cap:
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
# Memory (XLA temp bytes are deterministic; float32 as in training).


def _memory(cell, params, batch, scan, reverse_mode_only=False) -> tuple[int, int]:
    """XLA temp bytes and the number of dot ops of the compiled gradient of the loss under ``scan``."""
    f = jax.grad(lambda p: loss_and_outputs(cell, losses.mse, p, batch, scan=scan,
                                            reverse_mode_only=reverse_mode_only)[0])
    c = _compiled(f, params)
    return c.memory_analysis().temp_size_in_bytes, c.as_text().count(" dot(")


MEMORY_SCANS = {"none": remat.none, "sqrt": remat.sqrt, "sqrt_nl": lambda: remat.sqrt("nonlinearities"),
                "per_step_nl": lambda: remat.per_step("nonlinearities"), "binomial16": lambda: remat.binomial(16),
                "binomial4": lambda: remat.binomial(4), **{f"plan{u}": lambda u=u: remat.plan(64, u, alpha=3.0).scan
                                                           for u in (40, 16, 6)}}


@pytest.fixture(scope="module")
def elman_memory():
    """``elman_memory(name) -> (temp bytes, dot ops)`` of a plain Elman tanh cell's gradient (float32, B=8, H=32,
    T=64) under ``MEMORY_SCANS[name]``, each compiled once per module."""
    cell = cells.with_readout(cells.elman(32, dtype=jnp.float32), 1)  # plain: scan the step
    params, batch = _params(cell, 1), _batch(1, B=8, I=1, O=1, ragged=False, n=64, dtype=np.float32)
    return functools.cache(lambda name: _memory(cell, params, batch, MEMORY_SCANS[name]()))


def test_temp_memory_monotone_as_budget_shrinks(elman_memory):
    temp = lambda name: elman_memory(name)[0]
    plain = temp("none")
    mems = [temp(f"plan{u}") for u in (40, 16, 6)]
    assert all(a >= b for a, b in zip(mems, mems[1:], strict=False)), mems
    assert mems[-1] < 0.25 * plain
    slots = [temp(f"binomial{s}") for s in (16, 4)]
    assert all(a >= b for a, b in zip(slots, slots[1:], strict=False)), slots
    assert temp("sqrt") < plain


def test_nonlinearity_policy_saves_memory_without_recomputing_matrix_products(elman_memory):
    """Inside sqrt segments, saving tanh outputs keeps 2 carries a step instead of 3, and the compiled program
    has no more dot ops than the policy-free one (only elementwise work is replayed)."""
    for plain, with_policy in [("sqrt", "sqrt_nl"), ("none", "per_step_nl")]:
        (m0, d0), (m1, d1) = elman_memory(plain), elman_memory(with_policy)
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
    with pytest.raises(ValueError, match="takes no options"):
        remat.scan_from_config({"policy": "none", "k": 3})
    with pytest.raises(ValueError, match="unknown checkpoint policy"):
        remat.per_step("no_such_policy")
    with pytest.raises(ValueError, match="planned for T=5"):
        remat.plan(5, 3).scan(lambda c, x: (c, x), jnp.zeros(2), jnp.zeros((6, 2)))


def test_plan_budget_in_bytes_and_tiny_sequences(problem):
    by_units = remat.plan(40, 12, alpha=2.5)
    by_bytes = remat.plan(40, 12 * 4096, carry_bytes=4096, internal_bytes=2.5 * 4096)
    assert by_bytes.evaluations == by_units.evaluations and by_bytes.schedule.slots == by_units.schedule.slots
    with pytest.raises(ValueError, match="at least one carry"):
        remat.plan(10, 100, carry_bytes=4096)
    cell, params = problem("elman")
    batches = [_batch(n, B=2, ragged=False, n=n) for n in (1, 2)]
    scans = (remat.plan(1, 1).scan, remat.binomial(1))

    def grads(params, batches):
        return [(reference_gradient(cell, losses.mse, params, b)[1],
                 jax.grad(lambda p, s=s, b=b: loss_and_outputs(cell, losses.mse, p, b, scan=s)[0])(params))
                for s, b in zip(scans, batches, strict=True)]

    for n, (g0, g) in zip((1, 2), _jit(grads)(params, batches), strict=True):
        assert _max_err(g, g0) < 1e-10, n


# ------------------------------------------------------------------------------------------------------------
# Fused layers inside the segments (Elman in a reverse-mode-only unroll: a custom VJP that stores only the
# carries, "alpha = 1").


def test_segmented_schedules_are_scans_with_a_sequence():
    """Without a checkpoint policy every_k/sqrt/nested carry a ``sequence`` (a fused cell runs on the segments);
    with one they are plain scan functions (the step is scanned); the other policies never have one."""
    for scan in (remat.every_k(4), remat.sqrt(), remat.nested(3)):
        assert isinstance(scan, Scan) and scan.sequence is not None
    for scan in (remat.sqrt("nonlinearities"), remat.nested(2, policy="dots_saveable"), remat.none(),
                 remat.per_step(), remat.binomial(3), remat.plan(T, 5).scan):
        assert not isinstance(scan, Scan)


def test_layer_segments_under_vmap():
    """Per-example gradients (vmap of grad) through sqrt with the Elman layer equal plain BPTT's (1e-10)."""
    cell = cells.with_readout(fused.elman(4, dtype=F64), 1)
    params = _params(cell, 2)
    x, y = _normal(1, (3, 1, 11, 2)), _normal(2, (3, 1, 11, 1))

    def per_example(c, scan):
        loss = lambda p, x, y: loss_and_outputs(c, losses.mse, p, Batch(x, y), scan=scan, reverse_mode_only=True)[0]
        return _jit(jax.vmap(jax.grad(loss), (None, 0, 0)))(params, x, y)

    assert _max_err(per_example(cell, remat.sqrt()), per_example(cells.plain(cell), None)) < 1e-10


def test_layer_segments_keep_one_carry_per_step():
    """sqrt with the Elman layer (reverse-mode-only unroll, readout inside the loop) keeps about T/k + k carries:
    the outer checkpoints and one segment's carries, nothing per step beyond the carry, and less than sqrt over the
    per-step scan."""
    n, Bm, Hm = 256, 16, 64
    batch = _batch(1, B=Bm, I=2, O=1, ragged=False, n=n, dtype=np.float32)
    layer_cell = cells.with_readout(fused.elman(Hm), 1)
    params = _params(layer_cell, 2)
    step_cell = cells.plain(layer_cell)
    layer = _memory(layer_cell, params, batch, remat.sqrt(), reverse_mode_only=True)[0]
    scanned, plain = _memory(step_cell, params, batch, remat.sqrt())[0], _memory(step_cell, params, batch, None)[0]
    carry = Bm * Hm * 4
    k = math.ceil(math.sqrt(n))
    fixed = 8 * n * Bm * 4  # [T, B, I + O]-sized inputs, targets, outputs and their transposes
    assert layer <= (n // k + k + 4) * carry + fixed, (layer / carry)
    assert layer < 0.8 * scanned < 0.1 * plain
