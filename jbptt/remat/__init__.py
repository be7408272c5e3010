"""Checkpoint (rematerialisation) schedules for differentiating an unrolled scan.

Every policy is a drop-in replacement for ``lax.scan``, ``scan(body, init, xs, reverse=False, unroll=1) ->
(carry, ys)`` with time-major ``xs`` leaves ``[T, ...]``, so it plugs into :func:`jbptt.unroll.unroll` and
:func:`jbptt.estimators.bptt.bptt` (``scan=``) and into truncated BPTT. None changes the gradient; they trade cell
evaluations (forward recomputation) for memory:

============  ====================================================  =====================================
policy        what the gradient keeps                               cell evaluations per gradient
============  ====================================================  =====================================
``none``      every step's residuals (plain ``lax.scan``)           ``T``
``per_step``  each step's carry (+ what a checkpoint policy saves)  ``2T``
``every_k``   a carry every ``k`` steps + one segment's residuals   ``T + k * floor(T / k)``
``nested``    ``d`` levels of ``every_k``                           about ``d T``
``binomial``  ``s`` carries on Griewank's revolve schedule          revolve's minimum
``plan``      carries + runs of full internal states (Gruslys DP)   the minimum within a memory budget
============  ====================================================  =====================================

``every_k``, ``sqrt`` and ``nested`` run a cell's fused whole-sequence layer (:class:`jbptt.cells.Layer`) on
their innermost segments when the cell has one and no checkpoint ``policy`` is given: for an Elman cell that is
:func:`jbptt.fused.elman_layer`, whose custom VJP stores one carry per step and recomputes nothing in its backward
pass, so ``sqrt`` keeps about ``T/k + k`` carries at ``2T`` evaluations (JAX's own rule keeps 3 carries per tanh
step). With a checkpoint ``policy`` they scan the cell's step with it; ``"nonlinearities"``
(:func:`save_nonlinearity_outputs`) cuts a tanh step's residuals from 3 carries to 2 with no matrix product
recomputed.

``none``, ``per_step``, ``every_k`` and ``nested`` are ``lax.scan`` + ``jax.checkpoint`` only, so they are safe
under ``jit``, ``grad``, ``vmap`` and ``jvp`` (forward mode not through the Elman layer on the segments, a
``custom_vjp``: use ``cells.elman(..., fused=None)`` for that). ``binomial`` and ``plan`` run a :class:`Schedule`
computed in Python before tracing, with a ``jax.custom_vjp`` executor whose compiled size does not grow with ``T``:
the forward pass is one ``lax.scan`` storing the schedule's carries (and the last run's residuals); the backward
pass is a ``lax.while_loop`` over the schedule's actions (restore a carry, advance ``n`` steps, snapshot, reverse a
run of ``L`` steps with JAX's own residuals: one ``lax.switch`` branch per distinct run length). They are safe under
``jit``, ``grad`` and ``vmap``, not forward mode (as any ``custom_vjp``).

Cost model (used by the DP, checked by counting evaluations in the compiled program): memory is counted in
carry units; the executor keeps a fixed buffer of ``slots`` carries and the residuals of one run at a time, so
a schedule needs ``slots + (longest run - 1) * alpha`` units, ``alpha`` being a step's residuals over a carry
(:func:`residual_bytes`). With runs of one step (``binomial``) this is Griewank & Walther's model and the
count is revolve's ``t(T, s) + T`` (forward steps plus one evaluation per reversed step).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jbptt.cells import Cell
from jbptt.unroll import Scan

ScanFn = Callable[..., tuple[Any, Any]]

__all__ = [
    "POLICIES", "Plan", "Schedule", "binomial", "binomial_schedule", "checkpoint_policy", "counting_cell", "every_k",
    "evaluations", "nested", "none", "per_step", "plan", "residual_bytes", "revolve_evaluations",
    "save_nonlinearity_outputs", "scan_from_config", "schedule_scan", "sqrt",
]


# ----------------------------------------------------------------------------------------------------------
# Helpers.


def _length(xs) -> int:
    leaves = jax.tree_util.tree_leaves(xs)
    if not leaves:
        raise ValueError("remat scan: xs has no arrays (a scan with length= only is not supported)")
    return int(jnp.shape(leaves[0])[0])


def _flip(tree):
    return jax.tree.map(lambda a: jnp.flip(a, 0), tree)


def _forward_only(scan_impl):
    """Adds ``reverse=`` to a forward-only scan implementation ``scan_impl(body, init, xs, unroll)``."""

    @functools.wraps(scan_impl)
    def scan(body, init, xs, reverse: bool = False, unroll: int = 1):
        if reverse:
            carry, ys = scan_impl(body, init, _flip(xs), unroll)
            return carry, _flip(ys)
        return scan_impl(body, init, xs, unroll)

    return scan


def _slice(xs, start: int, stop: int):
    return jax.tree.map(lambda a: a[start:stop], xs)


def _concat(parts):
    parts = [p for p in parts if p is not None]
    if len(parts) == 1:
        return parts[0]
    return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *parts)


_OUTPUT_DERIVATIVE_PRIMITIVES = (lax.tanh_p, lax.logistic_p, lax.exp_p)


def save_nonlinearity_outputs(prim, *_, **__) -> bool:
    """A ``jax.checkpoint`` policy that saves the outputs of ``tanh``, ``logistic`` and ``exp``: their
    derivatives are functions of their outputs, so the backward pass recomputes only elementwise ops, never the
    matrix products that fed them. For an Elman tanh step a step keeps 2 carries (its input carry and the tanh
    output) instead of the plain scan's 3 (JAX's tanh rule also keeps ``1 - tanh``). Name: ``"nonlinearities"``.
    """
    return prim in _OUTPUT_DERIVATIVE_PRIMITIVES


_OWN_POLICIES = {"nonlinearities": save_nonlinearity_outputs}


def checkpoint_policy(name: str | Callable | None):
    """Resolves a ``jax.checkpoint_policies`` name (e.g. ``"dots_saveable"``) or ``"nonlinearities"``
    (:func:`save_nonlinearity_outputs`), or passes a callable (or ``None``) through."""
    if name is None or callable(name):
        return name
    if name in _OWN_POLICIES:
        return _OWN_POLICIES[name]
    policy = getattr(jax.checkpoint_policies, name, None)
    if policy is None or name.startswith("_"):
        names = [n for n in dir(jax.checkpoint_policies) if not n.startswith("_")] + sorted(_OWN_POLICIES)
        raise ValueError(f"unknown checkpoint policy {name!r}; choose from {names}")
    return policy


def _checkpointed_step(body, policy):
    """``body`` itself when ``policy`` is ``None``, else ``jax.checkpoint(body, policy=policy)``: the innermost
    steps of a segmented scan then keep only what the policy saves (plus each step's input carry)."""
    if policy is None:
        return body
    return jax.checkpoint(body, policy=policy, prevent_cse=False)


# ----------------------------------------------------------------------------------------------------------
# Scan-structured policies (lax.scan + jax.checkpoint only).


def none() -> ScanFn:
    """The plain ``lax.scan`` (stores every step's residuals)."""
    return lax.scan


def per_step(policy: str | Callable | None = None) -> ScanFn:
    """``lax.scan`` of ``jax.checkpoint(body)``: stores only each step's carry and what ``policy`` saves.

    Args:
      policy: a ``jax.checkpoint_policies`` name or callable (e.g. ``"dots_saveable"``,
        ``jax.checkpoint_policies.save_only_these_names("h")`` with values tagged by
        ``jax.ad_checkpoint.checkpoint_name``); ``None`` saves nothing inside the step.
    """
    pol = checkpoint_policy(policy)

    def scan(body, init, xs, reverse: bool = False, unroll: int = 1):
        return lax.scan(jax.checkpoint(body, policy=pol, prevent_cse=False), init, xs, reverse=reverse,
                        unroll=unroll)

    return scan


def _segmented(run, carry, xs, seg_lens: Sequence[int]):
    """Runs ``run(carry, xs) -> (carry, ys)`` over time-major ``xs`` in checkpointed segments: ``seg_lens[0]`` is
    the outermost segment length, the last entry the innermost level, which ``run`` executes. A remainder that does
    not fill a segment is run at the next level down without its own checkpoint."""
    T = _length(xs)
    if len(seg_lens) <= 1 or T <= 1:
        return run(carry, xs)
    k, inner = seg_lens[0], seg_lens[1:]
    n = T // k
    if n == 0:
        return _segmented(run, carry, xs, inner)

    def segment(c, xseg):
        return _segmented(run, c, xseg, inner)

    main = jax.tree.map(lambda a: a[:n * k].reshape((n, k) + a.shape[1:]), xs)
    carry, ys = lax.scan(jax.checkpoint(segment, prevent_cse=False), carry, main)
    ys = jax.tree.map(lambda a: a.reshape((n * k,) + a.shape[2:]), ys)
    if n * k == T:
        return carry, ys
    carry, ys_rem = _segmented(run, carry, _slice(xs, n * k, T), inner)
    return carry, _concat([ys, ys_rem])


def _segment_scan(body, init, xs, seg_lens: Sequence[int], unroll: int):
    """:func:`_segmented` with a per-step ``lax.scan`` of ``body`` at the innermost level."""
    return _segmented(lambda c, x: lax.scan(body, c, x, unroll=unroll), init, xs, seg_lens)


def _with_sequence(steps: ScanFn, seg_lens_of: Callable[[int], list[int]]) -> Scan:
    """A :class:`~jbptt.unroll.Scan` that runs a cell's fused whole-sequence function on the same checkpointed
    segments as ``steps`` (only for schedules without a checkpoint policy: a policy asks for the step scan)."""

    def sequence(run, carry, xs):
        return _segmented(run, carry, xs, seg_lens_of(_length(xs)))

    return Scan(steps, sequence)


def _nested_lengths(T: int, levels: int, k: int | None) -> list[int]:
    """Segment lengths, outermost first, for ``levels`` levels of branching ``k`` (default ceil(T^(1/d)))."""
    if levels < 1:
        raise ValueError(f"nested: levels must be >= 1, got {levels}")
    if k is None:
        k = max(2, math.ceil(T ** (1.0 / levels) - 1e-9))
    return [k ** (levels - 1 - i) for i in range(levels - 1)] + [1]


def every_k(k: int | None = None, policy: str | Callable | None = None) -> ScanFn:
    """Two-level checkpointing: stores the carry every ``k`` steps and recomputes each segment in the backward
    pass.

    Args:
      k: segment length; ``None`` means ``ceil(sqrt(T))`` (O(sqrt(T)) memory, see :func:`sqrt`).
      policy: optional checkpoint policy for the steps inside a recomputed segment (as in :func:`per_step`,
        e.g. ``"nonlinearities"``): the segment then keeps each step's carry plus what the policy saves,
        instead of JAX's full residuals. Same evaluation count.

    Without a ``policy``, a cell with a fused :class:`~jbptt.cells.Layer` (Elman, LSTM, GRU and their stacks and
    readouts) runs it on each segment (see :func:`jbptt.unroll.unroll`); the Elman layer then stores only the
    segment's carries.
    """
    if k is not None and k < 1:
        raise ValueError(f"every_k: k must be >= 1, got {k}")
    pol = checkpoint_policy(policy)

    def seg_lens(T):
        return [math.ceil(math.sqrt(T)) if k is None else k, 1]

    def impl(body, init, xs, unroll):
        return _segment_scan(_checkpointed_step(body, pol), init, xs, seg_lens(_length(xs)), unroll)

    return _forward_only(impl) if pol is not None else _with_sequence(_forward_only(impl), seg_lens)


def sqrt(policy: str | Callable | None = None) -> ScanFn:
    """:func:`every_k` with ``k = ceil(sqrt(T))`` (and optionally a checkpoint ``policy`` for its steps)."""
    return every_k(None, policy)


def nested(levels: int = 3, k: int | None = None, policy: str | Callable | None = None) -> ScanFn:
    """``levels``-level checkpointing: segments of ``k^(d-1)``, ``k^(d-2)``, ... steps, each checkpointed and
    recomputed inside its parent's recomputation; O(d T^(1/d)) memory, ~d T evaluations.

    Args:
      levels: number of levels ``d`` (1 = plain scan, 2 = :func:`every_k`).
      k: branching factor; default ``ceil(T^(1/d))``.
      policy: optional checkpoint policy for the innermost steps (see :func:`every_k`; without one a cell's
        fused layer runs the innermost segments).
    """
    if levels < 1:
        raise ValueError(f"nested: levels must be >= 1, got {levels}")
    pol = checkpoint_policy(policy)

    def seg_lens(T):
        return _nested_lengths(T, levels, k)

    def impl(body, init, xs, unroll):
        return _segment_scan(_checkpointed_step(body, pol), init, xs, seg_lens(_length(xs)), unroll)

    return _forward_only(impl) if pol is not None else _with_sequence(_forward_only(impl), seg_lens)


def _segment_evaluations(T: int, seg_lens: Sequence[int]) -> int:
    if len(seg_lens) <= 1 or T <= 1:
        return T
    k, inner = seg_lens[0], seg_lens[1:]
    n = T // k
    if n == 0:
        return _segment_evaluations(T, inner)
    return n * k + n * _segment_evaluations(k, inner) + _segment_evaluations(T - n * k, inner)


# ----------------------------------------------------------------------------------------------------------
# Schedules: the revolve recursion, the Gruslys et al. DP planner and the brute-force model they share.


class Schedule(NamedTuple):
    """A checkpointing schedule for ``T`` steps, computed in Python before tracing.

    Attributes:
      T: number of steps.
      slots: carry slots used (slot 0 holds the initial carry).
      spine: ``(position, slot)`` snapshots taken during the forward pass (``(0, 0)`` first).
      tail: start of the last run ``[tail, T)``, whose residuals the forward pass keeps.
      actions: ``[n, 4]`` int32 rows ``(op, a, n, slot)`` of the backward pass: ``op`` 0 restore the carry
        from ``slot``; 1 advance ``n`` steps from position ``a``; 2 snapshot the carry into ``slot``; ``3 +
        j`` reverse the run of ``run_lengths[j]`` steps starting at ``a`` (forward with residuals, then
        backward).
      run_lengths: the distinct run lengths (one executor branch each).
      evaluations: predicted cell evaluations of one gradient (forward pass included).
      peak_units: predicted memory in carry units: ``slots + (longest run - 1) * alpha`` (the executor keeps a
        fixed buffer of ``slots`` carries, and one run's residuals at a time).
    """

    T: int
    slots: int
    spine: tuple
    tail: int
    actions: np.ndarray
    run_lengths: tuple
    evaluations: int
    peak_units: float


# A schedule tree: ("run", L) reverses L steps from the carry in hand; ("split", y, right, left) advances y
# steps, reverses the remaining ones (right: a tree, snapshotting the carry first unless it is a run), then
# the first y (left) from the start again.


def _beta(s: int, r: int) -> int:
    return math.comb(s + r, s) if r >= 0 else 0


def revolve_evaluations(l: int, s: int) -> int:
    """Cell evaluations of Griewank's optimal binomial reversal of ``l`` steps with ``s`` carry slots.

    ``t(l, s) = r l - beta(s + 1, r - 1)`` forward steps, with ``beta(s, r) = C(s + r, s)`` and ``r`` the
    smallest integer with ``beta(s, r) >= l`` (Griewank & Walther 2000), plus one evaluation per reversed
    step: ``t(l, s) + l``.
    """
    if l < 1 or s < 1:
        raise ValueError(f"revolve_evaluations needs l >= 1 and s >= 1, got l={l}, s={s}")
    r = 0
    while _beta(s, r) < l:
        r += 1
    return r * l - _beta(s + 1, r - 1) + l


def _revolve_vec(ls: np.ndarray, s: int) -> np.ndarray:
    out = np.array([revolve_evaluations(int(l), s) if l >= 1 else 0 for l in ls], dtype=np.int64)
    return out


@functools.cache
def _revolve_split(l: int, s: int) -> tuple[int, bool]:
    """Best first advance ``y`` for reversing ``l`` steps with ``s`` slots, and whether the right part is a
    single-step run."""
    ys = np.arange(1, l)
    right = np.where(l - ys == 1, 1, _revolve_vec(l - ys, s - 1) if s >= 2 else np.iinfo(np.int64).max // 4)
    cost = ys + right + _revolve_vec(ys, s)
    j = int(np.argmin(cost))
    return int(ys[j]), bool(l - ys[j] == 1)


def _revolve_tree(l: int, s: int):
    if l == 1:
        return ("run", 1)
    y, right_is_run = _revolve_split(l, s)
    right = ("run", 1) if right_is_run else _revolve_tree(l - y, s - 1)
    return ("split", y, right, _revolve_tree(y, s))


class _DP(NamedTuple):
    """DP tables over ``[run cap, l, s]``: ``R`` reverses ``l`` steps from a held start with ``s`` slots (the
    start's included), forward included; ``F`` is the top level, beyond the forward pass. ``*c``: split point
    (0 = one run); ``*k``: 1 if the right part is snapshotted and recursed, 0 if it is a run from the carry in
    hand."""

    caps: np.ndarray
    R: np.ndarray
    Rc: np.ndarray
    Rk: np.ndarray
    F: np.ndarray
    Fc: np.ndarray
    Fk: np.ndarray


_INF = np.iinfo(np.int64).max // 4


@functools.lru_cache(maxsize=8)
def _dp(T: int, S: int, caps: tuple[int, ...]) -> _DP:
    """Exact DP over schedule trees with at most ``S`` slots and runs of at most ``cap`` steps, for every cap
    in ``caps`` at once (vectorised over caps and split points): O(T^2 S len(caps)) work, O(T S) Python
    iterations."""
    caps_a = np.asarray(caps, np.int64)[:, None]
    n = len(caps)
    shape = (n, T + 1, S + 1)
    R, F = np.full(shape, _INF, np.int64), np.full(shape, _INF, np.int64)
    Rc, Rk, Fc, Fk = (np.zeros(shape, np.int64) for _ in range(4))
    R[:, 0, :], F[:, 0, :] = 0, 0
    ls = np.arange(T + 1)[None, :]
    run_ok = (ls >= 1) & (ls <= caps_a)                              # [n, T+1]
    rows = np.arange(n)
    for s in range(1, S + 1):
        r_run, f_run = np.where(run_ok, ls, _INF), np.where(run_ok, 0, _INF)
        r_rec = R[:, :, s - 1] if s >= 2 else np.full((n, T + 1), _INF)
        f_rec = F[:, :, s - 1] if s >= 2 else np.full((n, T + 1), _INF)
        right_R, kind_R = np.minimum(r_run, r_rec), (r_rec < r_run).astype(np.int64)
        right_F, kind_F = np.minimum(f_run, f_rec), (f_rec < f_run).astype(np.int64)
        R[:, :, s], F[:, :, s] = r_run, f_run
        for l in range(2, T + 1):
            if run_ok[:, l].all():
                continue
            y = np.arange(1, l)
            left = R[:, 1:l, s]
            cR = y[None] + right_R[:, l - y] + left
            cF = right_F[:, l - y] + left
            jR, jF = np.argmin(cR, axis=1), np.argmin(cF, axis=1)
            bR, bF = cR[rows, jR], cF[rows, jF]
            better_R, better_F = bR < R[:, l, s], bF < F[:, l, s]
            R[:, l, s] = np.where(better_R, bR, R[:, l, s])
            Rc[:, l, s] = np.where(better_R, jR + 1, 0)
            Rk[:, l, s] = np.where(better_R, kind_R[rows, l - jR - 1], 0)
            F[:, l, s] = np.where(better_F, bF, F[:, l, s])
            Fc[:, l, s] = np.where(better_F, jF + 1, 0)
            Fk[:, l, s] = np.where(better_F, kind_F[rows, l - jF - 1], 0)
    return _DP(caps_a[:, 0], R, Rc, Rk, F, Fc, Fk)


def _dp_tree(dp: _DP, i: int, l: int, s: int, top: bool):
    c, k = (dp.Fc, dp.Fk) if top else (dp.Rc, dp.Rk)
    y = int(c[i, l, s])
    if y == 0:
        return ("run", l)
    right = _dp_tree(dp, i, l - y, s - 1, top) if k[i, l, s] else ("run", l - y)
    return ("split", y, right, _dp_tree(dp, i, y, s, False))


def _compile(tree, T: int, slots: int, alpha: float) -> Schedule:
    """Turns a top-level schedule tree into the forward spine and the backward action list (slot allocation
    included; the smallest free slot is taken first so the slots used are ``0 .. slots - 1``)."""
    spine, node, pos, free = [(0, 0)], tree, 0, list(range(slots - 1, 0, -1))
    lefts = []  # (position, slot, left tree) to reverse after the tail, last first
    while node[0] == "split":
        _, y, right, left = node
        lefts.append((pos, spine[-1][1], left))
        pos += y
        if right[0] == "split":
            if not free:
                raise ValueError("schedule needs more slots than given")
            spine.append((pos, free.pop()))
        node = right
    tail, tail_len = pos, node[1]
    actions, evals = [], T
    run_lengths: list[int] = []

    def run_op(L):
        if L not in run_lengths:
            run_lengths.append(L)
        return 3 + run_lengths.index(L)

    free_after_spine = sorted(set(range(slots)) - {sl for _, sl in spine}, reverse=True)
    used = {sl for _, sl in spine}
    # iterative post-order over (start position, start slot, tree); the register's position is tracked to skip
    # redundant restores
    register = None
    stack = []
    for p, sl, left in lefts:  # the spine's left parts, deepest first after the tail
        stack.append(("tree", p, sl, left, True))
    free = free_after_spine
    while stack:
        item = stack.pop()
        if item[0] == "free":
            free.append(item[1])
            free.sort(reverse=True)
            continue
        _, a, sl, node, owns_slot = item
        if node[0] == "run":
            if register != a:
                actions.append((0, a, 0, sl))
            actions.append((run_op(node[1]), a, node[1], 0))
            evals += node[1]
            register = None
            if owns_slot and sl != 0:
                stack.append(("free", sl))
            continue
        _, y, right, left = node
        # after the right part: reverse the left part from this start (slot sl); frees sl when done if owned
        stack.append(("tree", a, sl, left, owns_slot))
        if register != a:
            actions.append((0, a, 0, sl))
        actions.append((1, a, y, 0))
        evals += y
        if right[0] == "split":
            if not free:
                raise ValueError("schedule needs more slots than given")
            ns = free.pop()
            used.add(ns)
            actions.append((2, a + y, 0, ns))
            register = a + y
            stack.append(("tree", a + y, ns, right, True))
        else:
            register = a + y
            stack.append(("tree", a + y, -1, right, False))
    acts = np.asarray(actions, np.int32).reshape(-1, 4)
    n_slots = max(used) + 1
    longest = max([tail_len, *run_lengths])
    peak = n_slots + (0 if longest == 1 else (longest - 1) * alpha)
    return Schedule(T, n_slots, tuple(spine), tail, acts, tuple(run_lengths), evals, float(peak))


def binomial_schedule(T: int, slots: int) -> Schedule:
    """Griewank's optimal binomial (revolve) schedule for ``T`` steps and ``slots`` carry slots (>= 1; slot 0
    holds the initial carry). Its ``evaluations`` equal :func:`revolve_evaluations` ``(T, slots)``."""
    if T < 1 or slots < 1:
        raise ValueError(f"binomial schedule needs T >= 1 and slots >= 1, got T={T}, slots={slots}")
    slots = min(slots, T)
    return _compile(_revolve_tree(T, slots), T, slots, math.inf)


class Plan(NamedTuple):
    """Result of :func:`plan`: the schedule, its ``scan`` and its predictions.

    Attributes:
      schedule: the :class:`Schedule` (``schedule.evaluations`` is the predicted number of cell evaluations).
      scan: the executor, a drop-in ``lax.scan`` replacement for sequences of exactly ``T`` steps.
      evaluations: predicted cell evaluations of one gradient (forward included).
      units: the budget in carry units.
      peak_units: predicted memory ``slots + (longest run - 1) * alpha`` in carry units (<= ``units``).
      alpha: internal-state size in carry units.
    """

    schedule: Schedule
    scan: ScanFn
    evaluations: int
    units: float
    peak_units: float
    alpha: float


def _plan_search(T: int, units: float, alpha: float):
    """Best (evaluations, memory, cap, slots) over the run caps whose ``slots + (cap - 1) alpha`` fit."""
    caps, slots = [], []
    for cap in range(1, T + 1):
        s = min(T, int(math.floor(units - (cap - 1) * alpha + 1e-9)))
        if s < 1:
            break
        caps.append(cap)
        slots.append(s)
    if not caps:
        raise ValueError(f"plan: a budget of {units} carry units cannot hold one carry")
    dp = _dp(T, max(slots), tuple(caps))
    best = None
    for i, (cap, s) in enumerate(zip(caps, slots, strict=True)):
        ev = T + int(dp.F[i, T, s])
        if ev >= _INF // 2:
            continue
        key = (ev, s + (cap - 1) * alpha)
        if best is None or key < best[0]:
            best = (key, i, cap, s)
    return dp, best


def plan(T: int, budget: float, *, alpha: float = 2.0, carry_bytes: int | None = None,
         internal_bytes: int | None = None) -> Plan:
    """Gruslys et al. (2016)'s dynamic-programming planner: the schedule with the fewest cell evaluations
    whose memory fits a budget, choosing between stored carries (1 unit each) and runs of full internal states
    (JAX's residuals, ``alpha`` units per step; those steps are not recomputed).

    The memory model is the executor's: a fixed buffer of ``slots`` carries plus the residuals of the longest
    run, ``slots + (cap - 1) * alpha <= budget``. For every run cap the DP finds the fewest evaluations with
    that many slots; the plan is the best cap (ties: least memory). :func:`binomial` is the cap-1 case.

    Args:
      T: sequence length.
      budget: memory in carry units (number of carries), or in bytes when ``carry_bytes`` is given.
      alpha: internal-state size / carry size (ignored when ``internal_bytes`` and ``carry_bytes`` are given;
        :func:`residual_bytes` measures it).
      carry_bytes: bytes of one carry (``B * H * itemsize`` for an Elman cell).
      internal_bytes: bytes of one step's residuals.

    Returns:
      A :class:`Plan`. Planning costs O(T^2 budget^2 / alpha) numpy work and O(T budget) Python iterations:
      seconds at T=256, about half a minute at T=1024 with 96 units.
    """
    if carry_bytes is not None:
        if internal_bytes is not None:
            alpha = internal_bytes / carry_bytes
        units = budget / carry_bytes
    else:
        units = float(budget)
    if T < 1:
        raise ValueError(f"plan: T must be >= 1, got {T}")
    if not alpha >= 1:
        raise ValueError(f"plan: alpha (internal state / carry size) must be >= 1, got {alpha}")
    if units < 1:
        raise ValueError(f"plan: the budget must hold at least one carry (got {units:.3g} carry units)")
    units = min(units, T + (T - 1) * alpha)  # more is never needed
    dp, best = _plan_search(T, units, alpha)
    (ev, mem), i, cap, s = best
    sched = _compile(_dp_tree(dp, i, T, s, True), T, s, alpha)
    assert sched.evaluations == ev, (sched.evaluations, ev)
    return Plan(sched, schedule_scan(sched), ev, units, sched.peak_units, alpha)


# ----------------------------------------------------------------------------------------------------------
# The schedule executor (custom_vjp).


def _is_diff(a) -> bool:
    return jnp.issubdtype(jnp.result_type(a), jnp.inexact)


def _zero_cotangent(a):
    if _is_diff(a):
        return jnp.zeros(jnp.shape(a), jnp.result_type(a))
    return np.zeros(jnp.shape(a), jax.dtypes.float0)


def _instantiate(ct):
    zero = jax.custom_derivatives.SymbolicZero
    return jax.tree.map(lambda c: jnp.zeros(c.aval.shape, c.aval.dtype) if isinstance(c, zero) else c, ct,
                        is_leaf=lambda c: isinstance(c, zero))


def schedule_scan(schedule: Schedule) -> ScanFn:
    """The executor of a :class:`Schedule`: a ``lax.scan`` replacement for ``xs`` of ``schedule.T`` steps.

    The forward pass is one scan storing the spine's carries and the tail run's residuals; the backward pass
    replays ``schedule.actions`` in a ``lax.while_loop``. The compiled program's size depends on the number of
    distinct run lengths, not on ``T``. Safe under ``jit``, ``grad`` and ``vmap``; not forward mode.
    """
    T, S = schedule.T, schedule.slots
    actions = schedule.actions
    spine_at = np.full((max(schedule.tail, 1),), -1, np.int32)
    for p, sl in schedule.spine:
        if p < schedule.tail:
            spine_at[p] = sl

    def impl(body, init, xs, unroll):
        if _length(xs) != T:
            raise ValueError(f"this schedule was planned for T={T} steps, got xs with {_length(xs)}")
        if not all(_is_diff(a) for a in jax.tree_util.tree_leaves(init)):
            raise ValueError("schedule executor: the carry must be all floating point")
        x0 = jax.tree.map(lambda a: a[0], xs)
        conv, consts = jax.closure_convert(body, init, x0)
        return _execute(conv, tuple(consts), init, xs, unroll)

    def run_vjp(conv, consts, c, xseg, unroll):
        """``jax.vjp`` of a plain scan over ``xseg`` w.r.t. (consts, carry, floating xs)."""
        xleaves, xdef = jax.tree_util.tree_flatten(xseg)
        diff = [_is_diff(a) for a in xleaves]

        def f(consts, c, xd):
            it = iter(xd)
            full = [next(it) if d else a for a, d in zip(xleaves, diff, strict=True)]
            xs_full = jax.tree_util.tree_unflatten(xdef, full)
            return lax.scan(lambda cc, x: conv(cc, x, *consts), c, xs_full, unroll=unroll)

        xd = [a for a, d in zip(xleaves, diff, strict=True) if d]
        out, vjp = jax.vjp(f, consts, c, xd)
        return out, vjp, diff, xdef, xleaves

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
    def _execute(conv, consts, init, xs, unroll):
        return lax.scan(lambda c, x: conv(c, x, *consts), init, xs, unroll=unroll)

    def fwd(conv, consts, init, xs, unroll):
        prim = jax.custom_derivatives.CustomVJPPrimal
        is_p = lambda v: isinstance(v, prim)
        value = lambda t: jax.tree.map(lambda v: v.value if is_p(v) else v, t, is_leaf=is_p)
        consts_v, init_v, xs_v = value(consts), value(init), value(xs)
        xs_perturbed = any(v.perturbed for v in jax.tree_util.tree_leaves(xs, is_leaf=is_p) if is_p(v))
        tail = schedule.tail
        H = jax.tree.map(lambda a: jnp.zeros((S,) + a.shape, a.dtype), init_v)

        def step(state, inp):
            c, H = state
            x, sl = inp
            idx = jnp.maximum(sl, 0)
            H = jax.tree.map(lambda Hb, v: lax.dynamic_update_index_in_dim(
                Hb, jnp.where(sl >= 0, v, Hb[idx]), idx, 0), H, c)
            c, y = conv(c, x, *consts_v)
            return (c, H), y

        if tail > 0:
            head = (_slice(xs_v, 0, tail), jnp.asarray(spine_at[:tail]))
            (c, H), ys_head = lax.scan(step, (init_v, H), head, unroll=unroll)
        else:
            c, ys_head = init_v, None
        (carry, ys_tail), vjp, *_ = run_vjp(conv, consts_v, c, _slice(xs_v, tail, T), unroll)
        ys = _concat([ys_head, ys_tail])
        return (carry, ys), (consts_v, init_v, xs_v, H, vjp, xs_perturbed)

    def bwd(conv, unroll, res, ct):
        consts, init, xs, H, tail_vjp, xs_perturbed = res
        carry_ct, ys_ct = ct
        carry_ct, ys_ct = _instantiate(carry_ct), _instantiate(ys_ct)
        tail = schedule.tail
        consts_ct, c_ct, xd_ct = tail_vjp((carry_ct, _slice(ys_ct, tail, T)))
        xleaves_all, xs_def = jax.tree_util.tree_flatten(xs)
        diff = [_is_diff(a) for a in xleaves_all]
        # cotangent buffers for the floating xs leaves, [T, ...] each (only if xs are differentiated)
        xbuf = []
        if xs_perturbed:
            xbuf = [lax.dynamic_update_slice_in_dim(jnp.zeros_like(a), g, tail, 0)
                    for a, g in zip([v for v, d in zip(xleaves_all, diff, strict=True) if d], xd_ct,
                                    strict=True)]
        if len(actions) == 0:
            return _finish(consts_ct, c_ct, xbuf, xs_perturbed, xleaves_all, diff, xs_def)

        acts = jnp.asarray(actions)
        h0 = init

        def x_at(t):
            return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, t, 0, keepdims=False), xs)

        def op_restore(st, a, n, sl):
            h, H, cc, cct, xb = st
            h = jax.tree.map(lambda Hb: lax.dynamic_index_in_dim(Hb, sl, 0, keepdims=False), H)
            return (h, H, cc, cct, xb)

        def op_advance(st, a, n, sl):
            h, H, cc, cct, xb = st
            h = lax.fori_loop(0, n, lambda i, hh: conv(hh, x_at(a + i), *consts)[0], h)
            return (h, H, cc, cct, xb)

        def op_snap(st, a, n, sl):
            h, H, cc, cct, xb = st
            H = jax.tree.map(lambda Hb, v: lax.dynamic_update_index_in_dim(Hb, v, sl, 0), H, h)
            return (h, H, cc, cct, xb)

        def op_run(L):
            def run(st, a, n, sl):
                h, H, cc, cct, xb = st
                xseg = jax.tree.map(lambda v: lax.dynamic_slice_in_dim(v, a, L, 0), xs)
                yct = jax.tree.map(lambda v: lax.dynamic_slice_in_dim(v, a, L, 0), ys_ct)
                _, vjp, _, _, _ = run_vjp(conv, consts, h, xseg, unroll)
                g_consts, g_c, g_x = vjp((cct, yct))
                cc = jax.tree.map(jnp.add, cc, g_consts)
                if xs_perturbed:
                    xb = [lax.dynamic_update_slice_in_dim(b, g, a, 0) for b, g in zip(xb, g_x, strict=True)]
                return (h, H, cc, g_c, xb)
            return run

        branches = [op_restore, op_advance, op_snap] + [op_run(L) for L in schedule.run_lengths]

        def cond(carry):
            return carry[0] < acts.shape[0]

        def body_fn(carry):
            i, st = carry
            op, a, n, sl = acts[i, 0], acts[i, 1], acts[i, 2], acts[i, 3]
            st = lax.switch(op, branches, st, a, n, sl)
            return i + 1, st

        st0 = (h0, H, consts_ct, c_ct, xbuf)
        _, (_, _, consts_ct, c_ct, xbuf) = lax.while_loop(cond, body_fn, (jnp.int32(0), st0))
        return _finish(consts_ct, c_ct, xbuf, xs_perturbed, xleaves_all, diff, xs_def)

    def _finish(consts_ct, c_ct, xbuf, xs_perturbed, xleaves, diff, xs_def):
        if xs_perturbed:
            it = iter(xbuf)
            xs_ct = jax.tree_util.tree_unflatten(
                xs_def, [next(it) if d else _zero_cotangent(a) for a, d in zip(xleaves, diff, strict=True)])
        else:
            xs_ct = jax.tree_util.tree_unflatten(xs_def, [_zero_cotangent(a) for a in xleaves])
        return consts_ct, c_ct, xs_ct

    _execute.defvjp(fwd, bwd, symbolic_zeros=True)
    return _forward_only(impl)


def residual_bytes(step: Callable, params, carry, x, lengths: tuple[int, int] = (16, 32)) -> float:
    """Bytes per step that the plain scan's gradient keeps for ``step(params, carry, x) -> (carry, y)``: the
    slope of XLA's temp memory (``memory_analysis().temp_size_in_bytes``) between two sequence lengths of the
    gradient w.r.t. ``params``. Divided by the carry's bytes it is the ``alpha`` of :func:`plan`.

    Args:
      carry: one carry (e.g. ``[B, H]``); x: one step's input (e.g. ``[B, I]``).
    """

    def temp(L):
        xs = jax.tree.map(lambda a: jnp.broadcast_to(a, (L,) + jnp.shape(a)), x)

        def loss(p):
            c, ys = lax.scan(lambda c, xx: step(p, c, xx), carry, xs)
            return sum(jnp.sum(v) for v in jax.tree_util.tree_leaves((c, ys)))

        return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

    a, b = lengths
    return (temp(b) - temp(a)) / (b - a)


def binomial(slots: int = 10) -> ScanFn:
    """Griewank's revolve: the fewest cell evaluations possible for reversing ``T`` steps with ``slots``
    stored carries, the initial carry's included (schedule computed in Python for the ``T`` seen at trace time
    and cached). Memory: ``slots`` carries plus one step's residuals."""
    if slots < 1:
        raise ValueError(f"binomial: slots must be >= 1, got {slots}")

    @functools.lru_cache(maxsize=16)
    def executor(T):
        return schedule_scan(binomial_schedule(T, slots))

    def scan(body, init, xs, reverse: bool = False, unroll: int = 1):
        return executor(_length(xs))(body, init, xs, reverse=reverse, unroll=unroll)

    return scan


def counting_cell(cell: Cell, counter: list) -> Cell:
    """An instrumented copy of ``cell`` for checking what a schedule costs: every evaluation of its step in the
    compiled program adds 1 to ``counter[0]``, and every run of one of its :class:`~jbptt.cells.Layer`'s
    whole-sequence functions adds the number of steps it runs (a fused layer's backward pass evaluates no step).
    The counts come from ``jax.debug.callback`` calls whose argument depends on the carry, so XLA can neither
    hoist nor merge them; recomputations inside ``jax.checkpoint`` call back again. Read ``counter[0]`` after
    ``jax.effects_barrier()``.

    Returns:
      A :class:`~jbptt.cells.Cell` computing exactly what ``cell`` computes.
    """

    def bump(n: int, carry, x):
        dep = jax.tree_util.tree_leaves(carry)[0].ravel()[0] + sum(jnp.sum(a) for a in jax.tree_util.tree_leaves(x))
        jax.debug.callback(lambda _: counter.__setitem__(0, counter[0] + n), dep)

    def step(params, carry, x):
        bump(1, carry, x)
        return cell.step(params, carry, x)

    fused = None
    if cell.fused is not None:
        def fused(params, xs, carry, valid, reset, **kwargs):
            bump(int(xs.shape[0]), carry, xs)
            return cell.fused(params, xs, carry, valid, reset, **kwargs)

    return cell._replace(step=step, fused=fused)


def evaluations(policy: str, T: int, **kwargs) -> int:
    """Predicted cell evaluations of one gradient through ``T`` steps under ``policy`` (forward included).

    ``kwargs`` are the policy's options (``k``, ``levels``, ``slots``, ``budget``/``alpha`` for ``plan``,
    ``checkpoint_policy`` for ``every_k``/``sqrt``/``nested``). With a ``checkpoint_policy`` the segmented
    policies also replay each step once in the backward pass of its inner checkpoint (``+ T``), but only the
    part the policy did not save: with ``"nonlinearities"`` elementwise ops, no matrix product (the compiled
    program has as many dot ops as without the policy). A cell's fused layer on the segments (no checkpoint
    policy) evaluates as many steps as the per-step scan: its backward pass replays nothing."""
    if policy == "none":
        return T
    if policy == "per_step":
        return 2 * T
    replay = T if kwargs.get("checkpoint_policy") is not None else 0
    if policy in ("every_k", "sqrt"):
        k = kwargs.get("k") or math.ceil(math.sqrt(T))
        return _segment_evaluations(T, [k, 1]) + replay
    if policy == "nested":
        return _segment_evaluations(T, _nested_lengths(T, kwargs.get("levels", 3), kwargs.get("k"))) + replay
    if policy == "binomial":
        return revolve_evaluations(T, min(kwargs.get("slots", 10), T))
    if policy == "plan":
        return plan(T, kwargs["budget"], alpha=kwargs.get("alpha", 2.0)).evaluations
    raise ValueError(f"unknown remat policy {policy!r}; choose from {sorted(POLICIES)}")


def _plan_scan(budget: float, alpha: float = 2.0) -> ScanFn:
    @functools.lru_cache(maxsize=16)
    def executor(T):
        return plan(T, budget, alpha=alpha).scan

    def scan(body, init, xs, reverse: bool = False, unroll: int = 1):
        return executor(_length(xs))(body, init, xs, reverse=reverse, unroll=unroll)

    return scan


POLICIES: dict[str, Callable[..., ScanFn]] = {
    "none": none, "per_step": per_step, "every_k": every_k, "sqrt": sqrt, "nested": nested,
    "binomial": binomial, "plan": _plan_scan,
}


def scan_from_config(cfg: dict | None) -> ScanFn | None:
    """Builds a scan from a config's ``remat:`` section, e.g. ``{"policy": "sqrt"}``, ``{"policy": "every_k",
    "k": 32}``, ``{"policy": "nested", "levels": 3}``, ``{"policy": "binomial", "slots": 10}``,
    ``{"policy": "plan", "budget": 64, "alpha": 2}`` (budget in carry units), ``{"policy": "per_step",
    "checkpoint_policy": "dots_saveable"}``, ``{"policy": "nested", "levels": 3, "checkpoint_policy":
    "nonlinearities"}`` (``checkpoint_policy`` also applies to the steps of ``every_k``/``sqrt``/``nested``).

    Returns:
      ``None`` for no section or ``policy: none`` (use ``lax.scan``), else the scan function.
    """
    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        raise ValueError(f"remat config must be a mapping with a 'policy' key, got {cfg!r}")
    cfg = dict(cfg)
    name = cfg.pop("policy", "none")
    if name not in POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; choose from {sorted(POLICIES)}")
    if name == "none":
        if cfg:
            raise ValueError(f"remat policy 'none' takes no options, got {sorted(cfg)}")
        return None
    if name in ("per_step", "every_k", "sqrt", "nested") and "checkpoint_policy" in cfg:
        cfg["policy"] = cfg.pop("checkpoint_policy")
    try:
        return POLICIES[name](**cfg)
    except TypeError as e:
        raise ValueError(f"bad options {sorted(cfg)} for remat policy {name!r}: {e}") from None
