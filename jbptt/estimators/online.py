"""Shared machinery of the online (forward-in-time) estimators: RTRL, SnAp, UORO, e-prop, RFLO.

Every online estimator runs the segment step by step and keeps, next to the cell's carry, a per-example *trace*
(the influence matrix ``J_t = d carry_t / d theta`` or an approximation of it). This module provides

- :func:`flat_step`: the cell's step for ONE example over flat vectors ``theta: [P]`` (trainable parameters only;
  leaves under a ``"fixed"`` key are left out) and ``s: [n]`` (the raveled carry);
- :func:`online_segment`: the scan over a segment that handles resets, ``seq_lengths``, loss weights and the
  accumulation of loss and gradient, given a per-example ``core`` that advances the trace;
- :func:`unit_rows` / :func:`compressed_core`: the compressed influence for cells whose parameters each drive one
  unit (SnAp-1, e-prop, RFLO and the exact element-wise path of RTRL).

Online learning. ``update`` returns the exact (or estimated) gradient of the segment's loss, and the returned state
holds the carry and the trace at the segment's end. With ``stateful=True`` the next ``update`` continues from
there, so a trainer that feeds short segments (e.g. ``n`` steps; see :func:`split_segment`) applies an optimizer
update every ``n`` steps while the influence matrix is carried forward: no past is stored. With the default
``stateful=False`` every update starts from the initial carry (independent batches of whole sequences, as BPTT).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jbptt.batch import Batch, batch_and_time, batch_where
from jbptt.cells import Cell, trainable_mask

# Per-example core: core(fs, theta, s, trace, x, loss_grad, key) -> (s_new, trace_new, loss, grad_flat)
Core = Callable[..., tuple[Any, Any, Any, Any]]


class OnlineState(NamedTuple):
    """State of an online estimator.

    Attributes:
      carry: the cell's carry, leaves ``[B, ...]``.
      trace: the per-example trace (influence matrix or its approximation), leaves ``[B, ...]``.
      key: PRNG key for stochastic estimators (UORO); split at every update.
    """

    carry: Any
    trace: Any
    key: jax.Array


class FlatStep(NamedTuple):
    """A cell's step for one example over flat vectors.

    Attributes:
      theta: ``[P]`` the trainable parameters, raveled.
      step: ``step(theta [P], s [n], x) -> (s_new [n], y [O])`` for one example.
      carry0: ``carry0(theta) -> s0 [n]`` the initial carry of one example (may depend on theta).
      ravel_carry / unravel_carry: between a one-example carry pytree and ``[n]``.
      grads: ``grads(g [P]) -> params``-shaped gradient with zeros at fixed leaves.
      params: ``params(theta) -> params`` (fixed leaves from the params the view was built at).
      n: carry size; P: number of trainable parameters.
    """

    theta: jax.Array
    step: Callable
    carry0: Callable
    ravel_carry: Callable
    unravel_carry: Callable
    grads: Callable
    params: Callable
    n: int
    P: int


def flatten_trainable(params):
    """Ravels the trainable leaves of ``params`` (not under a ``"fixed"`` key).

    Returns:
      ``(theta [P], rebuild)`` where ``rebuild(theta, fill=None)`` returns params with the trainable leaves taken
      from ``theta`` and the fixed leaves from ``params`` (or zeros when ``fill == "zeros"``).
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    mask = jax.tree_util.tree_leaves(trainable_mask(params))
    theta, unravel = ravel_pytree([leaf for leaf, m in zip(leaves, mask, strict=True) if m])

    def rebuild(theta, fill=None):
        train = iter(unravel(theta))
        out = [next(train) if m else (jnp.zeros_like(leaf) if fill == "zeros" else leaf)
               for leaf, m in zip(leaves, mask, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, out)

    return theta, rebuild


def flat_step(cell: Cell, params) -> FlatStep:
    """Builds the one-example flat view :class:`FlatStep` of ``cell`` at ``params``. Safe under ``jit``."""
    theta, rebuild = flatten_trainable(params)
    carry_example = cell.initial_carry(params, ())
    s_example, unravel_carry = ravel_pytree(carry_example)

    def ravel_carry(c):
        return ravel_pytree(c)[0]

    def step(th, s, x):
        carry = unravel_carry(s)
        new, y = cell.step(rebuild(th), carry, x)
        new = jax.tree.map(lambda a, b: a.astype(b.dtype), new, carry)
        return ravel_carry(new), y

    def carry0(th):
        return ravel_carry(cell.initial_carry(rebuild(th), ()))

    return FlatStep(theta, step, carry0, ravel_carry, unravel_carry, lambda g: rebuild(g, "zeros"), rebuild,
                    int(s_example.shape[0]), int(theta.shape[0]))


def is_concrete(tree) -> bool:
    """True when no leaf of ``tree`` is a tracer (eager call), so host-side checks on values may run."""
    try:
        for leaf in jax.tree_util.tree_leaves(tree):
            np.asarray(leaf)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return False
    return True


def loss_grad_fn(loss_fn, target, scale):
    """``y -> (scale * loss_fn(y, target), gradient wrt y)`` for one example's output ``y: [O]``."""
    return lambda y: jax.value_and_grad(lambda yy: scale * loss_fn(yy, target))(y)


def online_segment(cell: Cell, loss_fn, params, state: OnlineState, batch: Batch, *, core: Core,
                   trace0: Callable, stateful: bool):
    """Runs an online estimator over one segment.

    Args:
      cell, loss_fn, params: the model and per-step loss.
      state: :class:`OnlineState` with carry ``[B, ...]`` and trace ``[B, ...]``.
      batch: the segment, ``[B, T, ...]``.
      core: ``core(fs, theta, s, trace, x, loss_grad, key) -> (s_new, trace_new, loss, grad [P])`` for one
        example, where ``loss_grad(y) -> (weighted loss, dloss/dy)`` (weights already include ``1/sum(w)``).
      trace0: ``trace0(fs, theta, key) -> trace`` for one example: the trace at the initial carry (used at resets
        and, when not ``stateful``, at the segment start).
      stateful: continue from ``state`` (online learning) or restart from the initial carry.

    Returns:
      ``(loss, grads, new_state)``: the weighted mean per-step loss, gradients shaped like ``params`` and the
      state at the end of the segment.
    """
    fs = flat_step(cell, params)
    theta = fs.theta
    B, T = batch_and_time(batch.inputs)
    key, k_init, k_steps = jax.random.split(state.key, 3)
    w = batch.weights(theta.dtype)
    total = jnp.sum(w)
    scale = w / jnp.where(total > 0, total, 1.0)  # [B, T]
    s_fresh = jnp.broadcast_to(fs.carry0(theta), (B, fs.n))
    if stateful:
        s, trace = jax.vmap(fs.ravel_carry)(state.carry), state.trace
    else:
        s, trace = s_fresh, jax.vmap(lambda k: trace0(fs, theta, k))(jax.random.split(k_init, B))
    resets = None if batch.resets is None else jnp.asarray(batch.resets, bool)
    valid = None if batch.seq_lengths is None else \
        jnp.arange(T)[None, :] < jnp.asarray(batch.seq_lengths)[:, None]

    def one(s, tr, x, target, sc, k):
        return core(fs, theta, s, tr, x, loss_grad_fn(loss_fn, target, sc), k)

    def at(tree, t):
        """Step ``t`` of batch-major leaves, read inside the scan so that nothing of size T is copied."""
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, t, axis=1, keepdims=False), tree)

    def body(acc, t):
        s, tr, loss, g = acc
        k = jax.random.split(jax.random.fold_in(k_steps, t), B)
        if resets is not None:
            r = at(resets, t)
            fresh_tr = jax.vmap(lambda kk: trace0(fs, theta, kk))(jax.random.split(jax.random.fold_in(k_init, t), B))
            s, tr = batch_where(r, (s_fresh, fresh_tr), (s, tr))
        s_new, tr_new, l, gb = jax.vmap(one)(s, tr, at(batch.inputs, t), at(batch.targets, t), at(scale, t), k)
        # keep the scan's carry types when inputs come in another float dtype than the parameters
        s_new, tr_new = jax.tree.map(lambda a, b: a.astype(b.dtype), (s_new, tr_new), (s, tr))
        l, gb = jnp.sum(l).astype(loss.dtype), jnp.sum(gb, axis=0).astype(g.dtype)
        if valid is not None:
            s_new, tr_new = batch_where(at(valid, t), (s_new, tr_new), (s, tr))
        return (s_new, tr_new, loss + l, g + gb), None

    init = (s, trace, jnp.zeros((), theta.dtype), jnp.zeros_like(theta))
    (s, trace, loss, g), _ = jax.lax.scan(body, init, jnp.arange(T))
    new_state = OnlineState(jax.vmap(fs.unravel_carry)(s), trace, key) if stateful else \
        OnlineState(state.carry, state.trace, key)
    return loss, fs.grads(g), new_state


def init_state(cell: Cell, params, carry, trace0: Callable, key=None) -> OnlineState:
    """The :class:`OnlineState` at ``carry`` (leaves ``[B, ...]``) with every example's trace from ``trace0``."""
    fs = flat_step(cell, params)
    B = jax.tree_util.tree_leaves(carry)[0].shape[0]
    key = jax.random.key(0) if key is None else key
    key, sub = jax.random.split(key)
    trace = jax.vmap(lambda k: trace0(fs, fs.theta, k))(jax.random.split(sub, B))
    return OnlineState(carry, trace, key)


def split_segment(batch: Batch, n: int) -> list[Batch]:
    """Splits a batch ``[B, T, ...]`` into consecutive segments of ``n`` steps (the last may be shorter).

    Feeding these to a ``stateful`` online estimator one by one, with an optimizer update after each, is online
    learning with an update every ``n`` steps. Loss weights are kept per segment, so the sum of the segment
    gradients weighted by each segment's total weight equals the whole batch's gradient at fixed parameters.
    ``seq_lengths`` is converted into a ``mask`` (the carry of a finished sequence is then no longer frozen, which
    does not change any weighted loss).
    """
    B, T = batch_and_time(batch.inputs)
    if n < 1:
        raise ValueError(f"split_segment: n must be >= 1, got {n}")
    mask = batch.weights(jnp.float32) if batch.seq_lengths is not None or batch.mask is not None else None
    out = []
    for t0 in range(0, T, n):
        sl = lambda a, t0=t0: None if a is None else jax.tree.map(lambda v: v[:, t0:t0 + n], a)
        out.append(Batch(sl(batch.inputs), sl(batch.targets), sl(mask), None, sl(batch.resets)))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Compressed influence for unit-structured cells.


class UnitRows(NamedTuple):
    """The compressed influence layout: row ``r`` holds ``d s[c, j] / d theta[idx[r, j]]`` for every unit ``j``.

    Attributes:
      idx: ``[R, N]`` flat parameter positions; parameter leaves whose last axis is a multiple of ``N`` give one row
        per leading index and per block of ``N`` columns (column ``k`` drives unit ``k % N``). Other leaves (e.g. a
        readout) are assumed not to drive the carry.
      C: carry components per unit (1 for Elman/IndRNN, 2 for LSTM ``(h, c)`` and the complex diagonal cell).
      N: number of units.
    """

    idx: np.ndarray
    C: int
    N: int


def unit_rows(cell: Cell, params) -> UnitRows:
    """Builds :class:`UnitRows` for ``cell`` at ``params`` (shapes only). Raises if the carry is not ``C x [N]``."""
    carry = cell.initial_carry(params, ())
    shapes = {tuple(jnp.shape(c)) for c in jax.tree_util.tree_leaves(carry)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError("the compressed (unit-wise) influence needs a carry whose leaves all have the same shape "
                         f"[N]; got leaf shapes {sorted(shapes)} (stacks of different sizes are not unit-wise: "
                         "use exact dense RTRL or uoro)")
    (N,) = next(iter(shapes))
    C = len(jax.tree_util.tree_leaves(carry))
    leaves = jax.tree_util.tree_leaves(params)
    mask = jax.tree_util.tree_leaves(trainable_mask(params))
    rows, offset = [], 0
    for leaf, m in zip(leaves, mask, strict=True):
        if not m:
            continue
        shape = jnp.shape(leaf)
        size = int(np.prod(shape))
        if len(shape) >= 1 and shape[-1] % N == 0:
            pos = offset + np.arange(size).reshape(-1, shape[-1] // N, N)
            rows.append(pos.reshape(-1, N))
        offset += size
    if not rows:
        raise ValueError(f"no parameter leaf has a last axis that is a multiple of the {N} units")
    return UnitRows(np.concatenate(rows).astype(np.int32), C, N)


def row_tangents(rows: UnitRows, P: int, dtype):
    """``[R, P]`` tangents: row ``r`` is 1 at the positions ``rows.idx[r]`` (all units at once)."""
    R = rows.idx.shape[0]
    return jnp.zeros((R, P), dtype).at[np.arange(R)[:, None], rows.idx].set(1.0)


def scatter_rows(rows: UnitRows, values, P: int):
    """Scatters per-row, per-unit values ``[R, N]`` to a flat ``[P]`` vector at ``rows.idx``."""
    return jnp.zeros((P,), values.dtype).at[rows.idx.reshape(-1)].add(values.reshape(-1))


def compressed_gradient(rows: UnitRows, trace, gs, P: int):
    """``sum_{c} gs[c, j] * trace[r, c, j]`` scattered to ``[P]``: the influence term of the gradient.

    Args:
      trace: ``[R, C*N]`` compressed influence; ``gs``: ``[C*N]`` the loss cotangent of the carry.
    """
    R = rows.idx.shape[0]
    v = jnp.sum(trace.reshape(R, rows.C, rows.N) * gs.reshape(rows.C, rows.N), axis=1)
    return scatter_rows(rows, v, P)


def compressed_trace0(rows: UnitRows):
    """``trace0`` for the compressed influence: ``d s0 / d theta`` along the row tangents (zero for a fixed s0)."""

    def trace0(fs: FlatStep, theta, key):
        del key
        tangents = row_tangents(rows, fs.P, theta.dtype)
        return jax.vmap(lambda t: jax.jvp(fs.carry0, (theta,), (t,))[1])(tangents)

    return trace0


def unit_blocks(D, C: int, N: int):
    """The per-unit ``C x C`` blocks of a carry Jacobian ``D: [C*N, C*N]``. Returns ``[N, C, C]``."""
    return jnp.einsum("cjdj->jcd", D.reshape(C, N, C, N))


def compressed_core(rows: UnitRows, block: Callable | None, *, readout: Callable | None = None,
                    feedback: Callable | None = None) -> Core:
    """A core that advances the compressed influence ``[R, C*N]``.

    Args:
      rows: the layout.
      block: ``None`` for the exact element-wise update (one jvp per row, exact when the carry Jacobian is
        block-diagonal per unit); otherwise ``block(blocks [N, C, C], fs, theta, s, x) -> [N, C, C]``: the per-unit
        blocks of the carry Jacobian that the approximation keeps (SnAp-1: all of them; e-prop: the internal
        components; RFLO: a leak).
      readout: optional ``readout(params, new_carry, x) -> y`` equal to the step's output. Given it, the gradient
        is ``dl/dtheta|_readout + (dl/ds_t) J_t`` with the approximate ``J_t`` (the e-prop / RFLO form: learning
        signal at ``s_t`` times eligibility). Without it, ``(dl/ds_{t-1}) J_{t-1}`` plus the exact immediate term
        is used (any cell; SnAp, exact element-wise RTRL).
      feedback: optional ``feedback(gy [O], gs [n]) -> gs`` replacing the learning signal ``dl/ds_t`` (RFLO's
        random feedback); needs ``readout``.
    """

    def core(fs: FlatStep, theta, s, trace, x, loss_grad, key):
        del key
        f = lambda th, ss: fs.step(th, ss, x)
        if readout is None:
            (s_new, y), vjp = jax.vjp(f, theta, s)
            loss, gy = loss_grad(y)
            gth, gs = vjp((jnp.zeros_like(s_new), gy))
            grad = gth + compressed_gradient(rows, trace, gs, fs.P)
        tangents = row_tangents(rows, fs.P, theta.dtype)
        _, lin = jax.linearize(lambda th, ss: f(th, ss)[0], theta, s)
        if block is None:
            new = jax.vmap(lin)(tangents, trace)
        else:
            m = jax.vmap(lambda t: lin(t, jnp.zeros_like(s)))(tangents)  # [R, n] immediate influence
            d_cols = jax.vmap(lambda e: lin(jnp.zeros_like(theta), e))(jnp.eye(fs.n, dtype=s.dtype))  # D^T
            blocks = block(unit_blocks(d_cols.T, rows.C, rows.N), fs, theta, s, x)
            R = rows.idx.shape[0]
            prop = jnp.einsum("jcd,rdj->rcj", blocks, trace.reshape(R, rows.C, rows.N))
            new = prop.reshape(R, -1) + m
        if readout is not None:
            s_new = f(theta, s)[0]
            y, vjp = jax.vjp(lambda th, sn: readout(fs.params(th), fs.unravel_carry(sn), x), theta, s_new)
            loss, gy = loss_grad(y)
            gth, gs = vjp(gy)
            if feedback is not None:
                gs = feedback(gy, gs)
            grad = gth + compressed_gradient(rows, new, gs, fs.P)
        return s_new, new, loss, grad

    return core
