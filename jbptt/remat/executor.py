"""The ``custom_vjp`` executor that runs a :class:`~jbptt.remat.planner.Schedule`, and the two policies built on
it: ``binomial`` (Griewank's revolve) and ``plan`` (Gruslys et al.'s DP within a memory budget).

The forward pass is one ``lax.scan`` storing the schedule's carries (and the last run's residuals); the backward
pass is a ``lax.while_loop`` over the schedule's actions (restore a carry, advance ``n`` steps, snapshot, reverse a
run of ``L`` steps with JAX's own residuals: one ``lax.switch`` branch per distinct run length), so the compiled
size does not grow with ``T``. Safe under ``jit``, ``grad`` and ``vmap``, not forward mode (as any ``custom_vjp``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jbptt.remat._time import concat, forward_only, length, per_length, window
from jbptt.remat.planner import Schedule, binomial_schedule, budget_units, optimal_schedule
from jbptt.unroll import ScanFn

__all__ = ["Plan", "binomial", "plan", "plan_scan", "schedule_scan"]


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
        if length(xs) != T:
            raise ValueError(f"this schedule was planned for T={T} steps, got xs with {length(xs)}")
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
            head = (window(xs_v, 0, tail), jnp.asarray(spine_at[:tail]))
            (c, H), ys_head = lax.scan(step, (init_v, H), head, unroll=unroll)
        else:
            c, ys_head = init_v, None
        (carry, ys_tail), vjp, *_ = run_vjp(conv, consts_v, c, window(xs_v, tail, T), unroll)
        ys = concat([ys_head, ys_tail])
        return (carry, ys), (consts_v, init_v, xs_v, H, vjp, xs_perturbed)

    def bwd(conv, unroll, res, ct):
        consts, init, xs, H, tail_vjp, xs_perturbed = res
        carry_ct, ys_ct = ct
        carry_ct, ys_ct = _instantiate(carry_ct), _instantiate(ys_ct)
        tail = schedule.tail
        consts_ct, c_ct, xd_ct = tail_vjp((carry_ct, window(ys_ct, tail, T)))
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
    return forward_only(impl)



def binomial(slots: int = 10) -> ScanFn:
    """Griewank's revolve: the fewest cell evaluations possible for reversing ``T`` steps with ``slots``
    stored carries, the initial carry's included (schedule computed in Python for the ``T`` seen at trace time
    and cached). Memory: ``slots`` carries plus one step's residuals."""
    if slots < 1:
        raise ValueError(f"binomial: slots must be >= 1, got {slots}")
    return per_length(lambda T: schedule_scan(binomial_schedule(T, slots)))


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



def plan(T: int, budget: float, *, alpha: float = 2.0, carry_bytes: int | None = None,
         internal_bytes: int | None = None) -> Plan:
    """Plans the schedule with the fewest cell evaluations whose memory fits ``budget``
    (:func:`~jbptt.remat.planner.optimal_schedule`) and builds its executor.

    Args:
      T: sequence length.
      budget: memory in carry units (number of carries), or in bytes when ``carry_bytes`` is given.
      alpha: internal-state size / carry size (ignored when ``internal_bytes`` and ``carry_bytes`` are given;
        :func:`jbptt.remat.cost.residual_bytes` measures it).
      carry_bytes: bytes of one carry (``B * H * itemsize`` for an Elman cell).
      internal_bytes: bytes of one step's residuals.

    Returns:
      A :class:`Plan`. Planning runs in numpy: seconds at T=256, about half a minute at T=1024 with 96 units.
    """
    units, alpha = budget_units(T, budget, alpha=alpha, carry_bytes=carry_bytes, internal_bytes=internal_bytes)
    sched = optimal_schedule(T, units, alpha)
    return Plan(sched, schedule_scan(sched), sched.evaluations, units, sched.peak_units, alpha)


def plan_scan(budget: float, alpha: float = 2.0) -> ScanFn:
    """The ``plan`` policy as a ``lax.scan`` drop-in for any ``T``: :func:`plan` ``(T, budget, alpha=alpha)`` for
    the ``T`` seen at trace time (cached), ``budget`` in carry units."""
    return per_length(lambda T: plan(T, budget, alpha=alpha).scan)
