"""Planning checkpoint schedules in numpy, before any tracing: Griewank's revolve and Gruslys et al.'s DP.

A :class:`Schedule` says what the executor (:mod:`jbptt.remat.executor`) does: which carries the forward pass
stores and the list of backward-pass actions. Memory is counted in carry units: the executor keeps a fixed buffer
of ``slots`` carries and the residuals of one run at a time, so a schedule needs ``slots + (longest run - 1) *
alpha`` units, ``alpha`` being a step's residuals over a carry (:func:`jbptt.remat.cost.residual_bytes`). With runs
of one step (:func:`binomial_schedule`) this is Griewank & Walther's model and the count is revolve's ``t(T, s) +
T`` (forward steps plus one evaluation per reversed step).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

__all__ = ["Schedule", "binomial_schedule", "budget_units", "optimal_schedule", "revolve_evaluations"]


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



def budget_units(T: int, budget: float, *, alpha: float = 2.0, carry_bytes: int | None = None,
                 internal_bytes: int | None = None) -> tuple[float, float]:
    """A memory budget in carry units, and ``alpha``, for :func:`optimal_schedule` of ``T`` steps.

    Args:
      T: sequence length.
      budget: memory in carry units (number of carries), or in bytes when ``carry_bytes`` is given.
      alpha: internal-state size / carry size (ignored when ``internal_bytes`` and ``carry_bytes`` are given).
      carry_bytes: bytes of one carry (``B * H * itemsize`` for an Elman cell).
      internal_bytes: bytes of one step's residuals.

    Returns:
      ``(units, alpha)``; ``units`` is capped at ``T + (T - 1) * alpha`` (more is never needed).
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
    return min(units, T + (T - 1) * alpha), alpha


def optimal_schedule(T: int, units: float, alpha: float) -> Schedule:
    """Gruslys et al. (2016)'s dynamic-programming planner: the schedule with the fewest cell evaluations whose
    memory fits ``units`` carry units, choosing between stored carries (1 unit each) and runs of full internal
    states (JAX's residuals, ``alpha`` units per step; those steps are not recomputed).

    The memory model is the executor's: ``slots + (cap - 1) * alpha <= units`` for runs of at most ``cap`` steps.
    For every run cap the DP finds the fewest evaluations with that many slots; the plan is the best cap (ties:
    least memory). :func:`binomial_schedule` is the cap-1 case.

    Args:
      T: sequence length.
      units: memory budget in carry units (see :func:`budget_units`).
      alpha: internal-state size / carry size (>= 1).

    Returns:
      The :class:`Schedule`. Planning costs O(T^2 units^2 / alpha) numpy work and O(T units) Python iterations:
      seconds at T=256, about half a minute at T=1024 with 96 units.
    """
    dp, best = _plan_search(T, units, alpha)
    (ev, _), i, _, s = best
    sched = _compile(_dp_tree(dp, i, T, s, True), T, s, alpha)
    assert sched.evaluations == ev, (sched.evaluations, ev)
    return sched
