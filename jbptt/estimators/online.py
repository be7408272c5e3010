"""The shared core of the online (forward-in-time) estimators: RTRL, SnAp, UORO, KF-RTRL, e-prop, RFLO.

Every online estimator runs the segment step by step and keeps, next to the cell's carry, a per-example *trace*
(the influence matrix ``J_t = d carry_t / d theta`` or an approximation of it). An algorithm is a per-example
:data:`Core` that advances the trace and a ``trace0`` that starts it; this module provides the rest:

- :func:`flat_step`: the cell's step for ONE example over flat vectors ``theta: [P]`` (trainable parameters only;
  leaves under a ``"fixed"`` key are left out; with a split, the ``Ps`` that act on the state first, found by
  :func:`state_acting`) and ``s: [n]`` (the raveled carry);
- :func:`online_segment`: the scan over a segment (resets, ``seq_lengths``, loss weights, accumulation of loss and
  gradient) and :func:`online_estimator`, the :class:`~jbptt.estimator.GradientEstimator` around it;
- the dense influence ``[P, n]`` of exact RTRL and SnAp-n (:func:`dense_core`, :func:`dense_trace0`), the layout
  :func:`unit_rows` of the compressed per-unit influence (its cores are in :mod:`.compressed`) and the size guard
  :func:`influence_bytes` / :func:`check_influence_size`;
- :func:`step_jacobian_support`: the step's Jacobian magnitudes maximised over several random probe points (the
  structure checks and SnAp patterns read sparsity from it, so one point's inactive ReLU units cannot hide it).

Online learning: ``update`` returns the exact (or estimated) gradient of the segment's loss and the state at its
end. With ``stateful=True`` the next ``update`` continues from there, so feeding short segments (see
:func:`split_segment`) with an optimizer update after each is online learning: no past is stored. With the default
``stateful=False`` every update starts from the initial carry (independent batches of whole sequences, as BPTT).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jbptt.batch import Batch, batch_and_time
from jbptt.cells import Cell, masked_step, trainable_mask
from jbptt.estimator import GradientEstimator

Core = Callable[..., tuple[Any, Any, Any, Any]]
"""``core(fs, theta, s, trace, x, loss_grad, key) -> (s_new, trace_new, loss, grad [P])`` for one example, where
``loss_grad(y) -> (weighted loss, dloss/dy)`` and ``key`` is this step's PRNG key."""


class OnlineState(NamedTuple):
    """State of an online estimator.

    Attributes:
      carry: the cell's carry, leaves ``[B, ...]``.
      trace: the per-example trace (influence matrix or its approximation), leaves ``[B, ...]``.
      key: PRNG key for stochastic estimators (UORO, KF-RTRL); split at every update.
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
      Ps: ``theta[:Ps]`` act on the state (:func:`state_acting`; ``Ps == P`` without a split), the rest on ``y`` only.
      step_parts / carry0_parts: ``step`` and ``carry0`` over ``(theta_s [Ps], theta_o [P - Ps])`` (derivatives in
        ``theta_s`` alone never touch the output-only parameters).
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
    Ps: int | None = None
    step_parts: Callable | None = None
    carry0_parts: Callable | None = None


def _state_leaves(params, acting):
    """``(state-acting trainable leaves, trainable leaves)`` of ``params`` (``acting=None``: all act)."""
    mask = jax.tree_util.tree_leaves(trainable_mask(params))
    train = [a for a, m in zip(jax.tree_util.tree_leaves(params), mask, strict=True) if m]
    acting = (True,) * len(train) if acting is None else acting
    return [a for a, act in zip(train, acting, strict=True) if act], train


def _unraveler(leaves):
    """``v [size] -> [leaf, ...]`` cutting ``v`` into the shapes and dtypes of ``leaves`` (static slices)."""
    shapes = [tuple(jnp.shape(a)) for a in leaves]
    ends = np.cumsum([0] + [int(np.prod(sh)) for sh in shapes])
    dtypes = [jnp.result_type(a) for a in leaves]
    cut = list(zip(ends[:-1], ends[1:], shapes, dtypes, strict=True))
    return lambda v: [v[a:b].reshape(sh).astype(dt) for a, b, sh, dt in cut]


def flat_step(cell: Cell, params, acting=None) -> FlatStep:
    """Builds the one-example flat view :class:`FlatStep` of ``cell`` at ``params``. Safe under ``jit``.

    ``acting``: ``None`` (``theta`` is the trainable leaves raveled in tree order, ``Ps == P``) or one bool per
    trainable leaf (:func:`state_acting`): ``theta`` is then the state-acting leaves followed by the others.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    train = [i for i, m in enumerate(jax.tree_util.tree_leaves(trainable_mask(params))) if m]
    acting = (True,) * len(train) if acting is None else tuple(acting)
    order = sorted(train, key=lambda i: not acting[train.index(i)])  # state-acting leaves first (a stable sort)
    k = sum(acting)
    dtype = jnp.result_type(*[leaves[i] for i in train]) if train else jnp.float32
    theta = jnp.concatenate([jnp.ravel(leaves[i]).astype(dtype) for i in order] + [jnp.zeros((0,), dtype)])
    Ps = int(sum(np.prod(jnp.shape(leaves[i])) for i in order[:k]))
    un_all, un_s, un_o = (_unraveler([leaves[i] for i in part]) for part in (order, order[:k], order[k:]))
    s_example, unravel_carry = ravel_pytree(cell.initial_carry(params, ()))

    def place(values, fill=None):
        new = dict(zip(order, values, strict=True))
        out = [new[i] if i in new else (jnp.zeros_like(a) if fill == "zeros" else a) for i, a in enumerate(leaves)]
        return jax.tree_util.tree_unflatten(treedef, out)

    def ravel_carry(c):
        return ravel_pytree(c)[0]

    def run(p, s, x):
        carry = unravel_carry(s)
        new, y = cell.step(p, carry, x)
        new = jax.tree.map(lambda a, b: a.astype(b.dtype), new, carry)
        return ravel_carry(new), y

    return FlatStep(theta, lambda th, s, x: run(place(un_all(th)), s, x),
                    lambda th: ravel_carry(cell.initial_carry(place(un_all(th)), ())), ravel_carry, unravel_carry,
                    lambda g: place(un_all(g), "zeros"), lambda th: place(un_all(th)), int(s_example.shape[0]),
                    int(theta.shape[0]), Ps, lambda ths, tho, s, x: run(place(un_s(ths) + un_o(tho)), s, x),
                    lambda ths, tho: ravel_carry(cell.initial_carry(place(un_s(ths) + un_o(tho)), ())))


# Calls whose body is followed by the dataflow of :func:`state_acting` (any other equation, including scans, conds,
# while loops and custom-derivative calls, counts as one: each output depends on every input).
_TRANSPARENT = ("pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call")


def _body(eqn):
    if eqn.primitive.name not in _TRANSPARENT:
        return None
    for name in ("jaxpr", "call_jaxpr"):
        body = getattr(eqn.params.get(name), "jaxpr", eqn.params.get(name))
        if body is not None and hasattr(body, "eqns") and len(body.invars) == len(eqn.invars) \
                and len(body.outvars) == len(eqn.outvars):
            return body
    return None


def _live_inputs(jaxpr, live_out) -> list[bool]:
    """Which inputs of ``jaxpr`` the outputs flagged by ``live_out`` depend on (backward dataflow)."""
    is_var = lambda v: not hasattr(v, "val")  # literals carry a value
    live = {v for v, m in zip(jaxpr.outvars, live_out, strict=True) if m and is_var(v)}
    for eqn in reversed(jaxpr.eqns):
        outs = [v in live for v in eqn.outvars]
        if any(outs):
            body = _body(eqn)
            ins = [True] * len(eqn.invars) if body is None else _live_inputs(body, outs)
            live.update(v for v, m in zip(eqn.invars, ins, strict=True) if m and is_var(v))
    return [v in live for v in jaxpr.invars]


def state_acting(cell: Cell, params, x) -> tuple[bool, ...]:
    """Which trainable leaves of ``params`` act on the state: one bool per trainable leaf, in tree order.

    A leaf acts on the state when the new carry or the initial carry depends on it, read off the dataflow of the
    jaxpr of ``(leaves, carry, x) -> (step's new carry, initial_carry)``. Shapes only, deterministic, jit-safe;
    conservative (a leaf is kept when in doubt, e.g. inside a scan). The others (a ``with_readout`` readout, an
    output bias) act only on the output: their gradient needs no influence.

    Args:
      cell, params: the model; ``x``: one example's input step (arrays or ``jax.ShapeDtypeStruct`` leaves).
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    struct = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
    carry = jax.eval_shape(lambda p: cell.initial_carry(p, ()), params)

    def dataflow(leaves, c, xx):
        p = jax.tree_util.tree_unflatten(treedef, leaves)
        return cell.step(p, c, xx)[0], cell.initial_carry(p, ())

    closed = jax.make_jaxpr(dataflow)([struct(a) for a in leaves], jax.tree.map(struct, carry),
                                      jax.tree.map(struct, x))
    live = _live_inputs(closed.jaxpr, [True] * len(closed.jaxpr.outvars))[:len(leaves)]
    mask = jax.tree_util.tree_leaves(trainable_mask(params))
    return tuple(bool(a) for a, m in zip(live, mask, strict=True) if m)


def acting_for(cell: Cell, params, inputs):
    """:func:`state_acting` at the first step of segment ``inputs`` (leaves ``[B, T, ...]``); ``None`` (no split)
    when ``inputs`` is ``None``."""
    x = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[2:], jnp.result_type(a)), inputs)
    return None if inputs is None else state_acting(cell, params, x)


def batch_size(carry) -> int:
    """``B`` read from the leading axis of the carry's first leaf."""
    return int(jnp.shape(jax.tree_util.tree_leaves(carry)[0])[0])


def check_on_example(name: str, check: Callable, params, inputs):
    """Runs ``check(params, x)`` on one example's first step ``x`` of ``inputs`` (leaves ``[B, T, ...]``).

    Called by ``init`` of estimators that are defined only for some cells. The check runs when ``params`` and
    ``inputs`` are concrete (an eager ``init``); under ``jit`` or ``eval_shape`` it is skipped.

    Raises:
      ValueError: ``inputs`` is ``None`` (the check needs an input), or whatever ``check`` raises.
    """
    if inputs is None:
        raise ValueError(f"{name}: init needs inputs= (an example segment, leaves [B, T, ...]) to check that the "
                         "cell suits the algorithm")
    x = jax.tree.map(lambda a: a[0, 0], inputs)
    if not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves((params, x))):
        check(params, x)


def loss_grad_fn(loss_fn, target, scale):
    """``y -> (scale * loss_fn(y, target), gradient wrt y)`` for one example's output ``y: [O]``."""
    return lambda y: jax.value_and_grad(lambda yy: scale * loss_fn(yy, target))(y)


def online_segment(cell: Cell, loss_fn, params, state: OnlineState, batch: Batch, *, core: Core,
                   trace0: Callable, stateful: bool, acting=None):
    """Runs an online estimator over one segment.

    Args:
      cell, loss_fn, params: the model and per-step loss.
      state: :class:`OnlineState` with carry ``[B, ...]`` and trace ``[B, ...]``.
      batch: the segment, ``[B, T, ...]``.
      core: the per-example :data:`Core` (its ``loss_grad`` weights already include ``1 / sum(w)``).
      trace0: ``trace0(fs, theta, key) -> trace`` for one example: the trace at the initial carry (used at resets
        and, when not ``stateful``, at the segment start).
      stateful: continue from ``state`` (online learning) or restart from the initial carry.
      acting: the split of the flat view (:func:`flat_step`) that ``core`` and ``trace0`` were built for.

    Returns:
      ``(loss, grads, new_state)``: the weighted mean per-step loss, gradients shaped like ``params`` and the
      state at the end of the segment. Safe under ``jit``.
    """
    fs = flat_step(cell, params, acting)
    theta = fs.theta
    B, T = batch_and_time(batch.inputs)
    key, k_init, k_steps = jax.random.split(state.key, 3)
    w = batch.weights(theta.dtype)
    total = jnp.sum(w)
    scale = w / jnp.where(total > 0, total, 1.0)  # [B, T]
    s_fresh = jnp.broadcast_to(fs.carry0(theta), (B, fs.n))
    fresh_traces = lambda k: jax.vmap(lambda kk: trace0(fs, theta, kk))(jax.random.split(k, B))
    start = (jax.vmap(fs.ravel_carry)(state.carry), state.trace) if stateful else (s_fresh, fresh_traces(k_init))
    resets = None if batch.resets is None else jnp.asarray(batch.resets, bool)
    valid = None if batch.seq_lengths is None else \
        jnp.arange(T)[None, :] < jnp.asarray(batch.seq_lengths)[:, None]

    def one(s, tr, x, target, sc, k):
        return core(fs, theta, s, tr, x, loss_grad_fn(loss_fn, target, sc), k)

    def step(_, carry, inp):  # the batched step over (s, trace); y = [loss, grad] per example, [B, 1 + P]
        s_new, tr_new, loss, grad = jax.vmap(one)(*carry, *inp)
        return (s_new, tr_new), jnp.concatenate([loss[:, None].astype(grad.dtype), grad], axis=1)

    def at(tree, t):
        """Step ``t`` of batch-major leaves, read inside the scan so that nothing of size T is copied."""
        return None if tree is None else \
            jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, t, axis=1, keepdims=False), tree)

    def body(acc, t):
        carry, total = acc
        fresh = None if resets is None else (s_fresh, fresh_traces(jax.random.fold_in(k_init, t)))
        keys = jax.random.split(jax.random.fold_in(k_steps, t), B)
        inp = (at(batch.inputs, t), at(batch.targets, t), at(scale, t), keys)
        carry, y = masked_step(step, None, carry, inp, at(valid, t), at(resets, t), fresh)
        return (carry, total + jnp.sum(y, axis=0).astype(total.dtype)), None

    ((s, trace), total), _ = jax.lax.scan(body, (start, jnp.zeros((1 + fs.P,), theta.dtype)), jnp.arange(T))
    new_state = OnlineState(jax.vmap(fs.unravel_carry)(s), trace, key) if stateful else \
        OnlineState(state.carry, state.trace, key)
    return total[0], fs.grads(total[1:]), new_state


def init_state(cell: Cell, params, carry, trace0: Callable, key=None, acting=None) -> OnlineState:
    """The :class:`OnlineState` at ``carry`` (leaves ``[B, ...]``) with every example's trace from ``trace0``
    (built for the split ``acting``, see :func:`flat_step`); ``key`` (default ``jax.random.key(0)``) seeds the
    traces and is kept for the updates."""
    fs = flat_step(cell, params, acting)
    key = jax.random.key(0) if key is None else key
    key, sub = jax.random.split(key)
    traces = jax.jit(lambda theta, keys: jax.vmap(lambda k: trace0(fs, theta, k))(keys))  # one program, not op by op
    trace = traces(fs.theta, jax.random.split(sub, batch_size(carry)))
    return OnlineState(carry, trace, key)


def online_estimator(cell: Cell, loss_fn, parts: Callable, *, stateful: bool, check: Callable | None = None,
                     split: bool = False) -> GradientEstimator:
    """The :class:`~jbptt.estimator.GradientEstimator` of an online algorithm.

    Args:
      cell, loss_fn: the model and per-step loss.
      parts: ``parts(params) -> (core, trace0)``, the algorithm at ``params`` (shape-level work only; it runs
        while ``update`` is traced); with ``split``: ``parts(params, acting)`` for the split ``acting``
        (:func:`state_acting`, or ``None`` for none).
      stateful: see :func:`online_segment`.
      check: optional ``check(params, carry, inputs, acting)`` run by ``init`` (``acting``: the split, computed once)
        before anything is allocated; raises ``ValueError`` where the algorithm does not apply (see
        :func:`check_on_example`).
      split: carry the trace only for the parameters that act on the state (found from the segment inputs'
        shapes); the others get their gradient directly at each step. ``init`` then needs ``inputs=`` when
        ``stateful`` (without it, and not stateful, the state holds the unsplit trace, which ``update`` never reads).

    Returns:
      ``GradientEstimator(init, update)`` with ``init(params, carry, *, key=None, inputs=None) -> OnlineState``
      (``key`` seeds the estimator's randomness) and a pure, jit-safe ``update``.
    """

    def parts_at(params, acting):
        return parts(params, acting) if split else parts(params)

    def init(params, carry, *, key=None, inputs=None):
        if split and stateful and inputs is None:
            raise ValueError("a stateful online estimator with split=True needs inputs= in init (an example segment, "
                             "leaves [B, T, ...]) to find the parameters that act on the state; or split=False")
        acting = acting_for(cell, params, inputs) if split else None
        if check is not None:
            check(params, carry, inputs, acting)
        return init_state(cell, params, carry, parts_at(params, acting)[1], key, acting)

    def update(params, state: OnlineState, batch: Batch):
        acting = acting_for(cell, params, batch.inputs) if split else None
        core, trace0 = parts_at(params, acting)
        return online_segment(cell, loss_fn, params, state, batch, core=core, trace0=trace0, stateful=stateful,
                              acting=acting)

    return GradientEstimator(init, update)


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
# Influence layouts: dense [P, n] (exact RTRL, SnAp-n) and compressed per unit [R, n] (see .compressed).


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


def unit_rows(cell: Cell, params, acting=None) -> UnitRows:
    """Builds :class:`UnitRows` for ``cell`` at ``params`` (arrays or ``jax.ShapeDtypeStruct``: only shapes are
    read). Raises if the carry is not ``C x [N]``. ``idx`` is ``[0, N]`` when no trainable leaf drives a unit
    (e.g. an ESN whose reservoir is fixed): every compressed algorithm is then defined, with an empty influence.
    ``acting`` (:func:`state_acting`): only the state-acting leaves give rows (positions in the theta of
    ``flat_step(cell, params, acting)``) and one that does not fit raises; ``None``: every trainable leaf whose
    last axis fits, the others are skipped."""
    carry = jax.eval_shape(lambda p: cell.initial_carry(p, ()), params)
    shapes = {tuple(jnp.shape(c)) for c in jax.tree_util.tree_leaves(carry)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError("the compressed (unit-wise) influence needs a carry whose leaves all have the same shape "
                         f"[N]; got leaf shapes {sorted(shapes)} (stacks of different sizes are not unit-wise: "
                         "use exact dense RTRL or uoro)")
    (N,) = next(iter(shapes))
    C = len(jax.tree_util.tree_leaves(carry))
    rows, offset = [], 0
    for leaf in _state_leaves(params, acting)[0]:
        shape = jnp.shape(leaf)
        size = int(np.prod(shape))
        if len(shape) >= 1 and shape[-1] % N == 0:
            pos = offset + np.arange(size).reshape(-1, shape[-1] // N, N)
            rows.append(pos.reshape(-1, N))
        elif acting is not None:  # its influence would be dropped silently (e.g. a sparse cell's [nnz] values)
            raise ValueError(f"unit-wise influence: a parameter leaf of shape {shape} acts on the state but its last "
                             f"axis is not made of blocks of N={N} units (a sparse cell?); use rtrl, snap2 or uoro")
        offset += size
    # no row (e.g. an ESN: only a readout is trained): the influence is empty, ``[0, C*N]``, and exactly zero
    idx = np.concatenate(rows) if rows else np.zeros((0, N), np.int64)
    return UnitRows(idx.astype(np.int32), C, N)


def step_jacobian_support(fs: FlatStep, theta, x, key, *, pairs: int = 4, scale: float = 3.0):
    """Entry-wise maxima of ``|ds'/dtheta|`` and ``|ds'/ds|`` of the step over random probe points (jit-safe).

    One point can hide structure (a ReLU unit inactive there has a zero row), so the Jacobians are taken at
    ``2 * pairs`` points: ``theta + 0.1 z``, ``s = ±c z'``, ``x ± c z''`` (antithetic pairs, so that a unit whose
    pre-activation is dominated by ``s`` and ``x`` is active at one point of each pair), with scales ``c`` from
    ``1 / scale`` to ``scale``. Integer inputs are not perturbed.

    Args:
      fs: the flat view of the cell; ``theta``: ``[P]``; ``x``: one example's input; ``key``: PRNG key.

    Returns:
      ``(M [n, P], D [n, n])``, the maxima of the absolute Jacobian entries over the probes.
    """
    fx = lambda a: jnp.issubdtype(a.dtype, jnp.floating)

    def probe(acc, inp):
        k, c, sign = inp
        k1, k2, k3 = jax.random.split(k, 3)
        th = theta + 0.1 * jax.random.normal(k1, theta.shape, theta.dtype)
        s = sign * c * jax.random.normal(k2, (fs.n,), theta.dtype)
        xs = jax.tree.map(lambda a: a + sign * c * jax.random.normal(k3, jnp.shape(a), a.dtype) if fx(a) else a, x)
        M, D = jax.jacrev(lambda t, ss: fs.step(t, ss, xs)[0], argnums=(0, 1))(th, s)  # n rows, not P + n
        return (jnp.maximum(acc[0], jnp.abs(M)), jnp.maximum(acc[1], jnp.abs(D))), None

    keys = jnp.repeat(jax.random.split(key, pairs), 2, axis=0)  # the same z for both points of a pair
    scales = jnp.repeat(jnp.geomspace(1.0 / scale, scale, pairs), 2).astype(theta.dtype)
    signs = jnp.tile(jnp.asarray([1.0, -1.0], theta.dtype), pairs)
    zeros = (jnp.zeros((fs.n, fs.P), theta.dtype), jnp.zeros((fs.n, fs.n), theta.dtype))
    return jax.lax.scan(probe, zeros, (keys, scales, signs))[0]


DEFAULT_MAX_INFLUENCE_BYTES = 2 << 30


def carry_size(cell: Cell, params) -> int:
    """``n``, the number of scalars in one example's carry (from shapes only)."""
    carry = jax.eval_shape(lambda p: cell.initial_carry(p, ()), params)
    return int(sum(np.prod(jnp.shape(c)) for c in jax.tree_util.tree_leaves(carry)))


def influence_bytes(cell: Cell, params, batch_size: int, *, diagonal: bool = False, acting=None) -> int:
    """Bytes of the influence matrix of ``batch_size`` examples: ``B * P * n * itemsize`` (dense ``[P, n]``) or
    ``B * R * n * itemsize`` (compressed per unit, :func:`unit_rows`); with the split ``acting``
    (:func:`state_acting`) ``Ps`` or the state-acting rows. From shapes only; nothing is allocated."""
    state, train = _state_leaves(params, acting)
    Ps = sum(int(np.prod(jnp.shape(a))) for a in state)
    rows = unit_rows(cell, params, acting).idx.shape[0] if diagonal else Ps
    itemsize = jnp.dtype(jnp.result_type(*train) if train else jnp.float32).itemsize
    return int(batch_size) * rows * carry_size(cell, params) * itemsize


def check_influence_size(nbytes: int, limit: int | None, what: str):
    """Raises ``ValueError`` (suggesting the approximations) when ``nbytes`` exceeds ``limit`` (``None``: no limit)."""
    if limit is not None and nbytes > limit:
        raise ValueError(
            f"exact RTRL: the influence matrix ({what}) needs {nbytes:,} bytes ({nbytes / 2**30:.2f} GiB), above "
            f"max_influence_bytes={limit:,}. Use an approximation instead: estimator 'snap1' (sparse, "
            "O(params) memory), 'uoro' (rank one), 'eprop' or 'rflo'; or rtrl(diagonal=True) for element-wise "
            "cells; or a smaller batch; or raise max_influence_bytes.")


def dense_trace0(fs: FlatStep, theta, key):
    """``J_0 = d s_0 / d theta_s`` as ``[Ps, n]`` (zero unless the initial carry is learned)."""
    del key
    return jax.jacrev(lambda ths: fs.carry0_parts(ths, theta[fs.Ps:]))(theta[:fs.Ps]).T


def dense_core(mode: str = "jacobian", mask=None) -> Core:
    """The :data:`Core` advancing the dense influence ``J [Ps, n]`` (restricted to a boolean ``mask [Ps, n]``:
    SnAp-n) of the state-acting parameters (all ``P`` without a split, see :func:`flat_step`).

    ``mode="jacobian"``: ``n + 1`` vector-Jacobian products give ``ds_t/dtheta``, ``ds_t/ds_{t-1}`` and the loss
    cotangents, then ``J_t = J_{t-1} (ds_t/ds_{t-1})^T + ds_t/dtheta`` is one ``[Ps, n] x [n, n]`` product.
    ``mode="jvp"``: ``jax.linearize`` of the step pushed along the ``Ps`` directions ``(e_k, J[k])`` (one pass gives
    ``J_t[k]`` and ``dy_t/dtheta_k``; a ``[Ps, Ps]`` identity of tangents, a factor ``n`` more work). With a split,
    these products see only ``theta_s``, and one more vjp gives the output-only parameters' direct gradient.
    """

    def core(fs: FlatStep, theta, s, J, x, loss_grad, key):
        del key
        Ps = fs.Ps
        ths, tho = theta[:Ps], theta[Ps:]
        f = lambda th, ss: fs.step_parts(th, tho, ss, x)
        if mode == "jvp":
            (s_new, y), lin = jax.linearize(f, ths, s)
            J_new, dy = jax.vmap(lin)(jnp.eye(Ps, dtype=theta.dtype), J)  # [Ps, n], [Ps, O]
            loss, gy = loss_grad(y)
            grad = dy.reshape(Ps, -1) @ gy.reshape(-1)
        else:
            (s_new, y), vjp = jax.vjp(f, ths, s)
            loss, gy = loss_grad(y)
            eye = jnp.eye(fs.n, dtype=s.dtype)
            cts = (jnp.concatenate([eye, jnp.zeros((1, fs.n), s.dtype)]),
                   jnp.concatenate([jnp.zeros((fs.n,) + gy.shape, gy.dtype), gy[None]]))
            gth, gs = jax.vmap(vjp)(cts)  # [n+1, Ps], [n+1, n]: rows i < n are d s_new[i] / d(theta_s, s)
            J_new = J @ gs[:-1].T + gth[:-1].T
            grad = gth[-1] + J @ gs[-1]
        if Ps < fs.P:  # the output-only parameters: their direct gradient
            grad = jnp.concatenate([grad, jax.vjp(lambda th: fs.step_parts(ths, th, s, x)[1], tho)[1](gy)[0]])
        return s_new, J_new if mask is None else jnp.where(mask, J_new, 0.0), loss, grad

    return core
