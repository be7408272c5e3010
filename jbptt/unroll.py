"""Unrolling a cell over time with ``lax.scan``: variable lengths, episode resets, reverse and bidirectional.

Inputs are batch-major: every leaf of ``xs`` is ``[B, T, ...]``. The scan runs time-major internally, and the
compiled program does not grow with ``T`` (no Python loop over time).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jbptt.batch import batch_and_time, batch_where, sequence_mask, time_major
from jbptt.cells import Cell, layer_of, segment_fn

ScanFn = Callable[..., tuple[Any, Any]]


def unroll(cell: Cell, params, xs, carry=None, *, seq_lengths=None, resets=None, unroll: int = 1,
           reverse: bool = False, scan: ScanFn | None = None, reverse_mode_only: bool = False):
    """Runs ``cell`` over the time axis of ``xs``.

    Args:
      cell: the :class:`~jbptt.cells.Cell`.
      params: its parameters.
      xs: batch-major inputs, a pytree with leaves ``[B, T, ...]`` (e.g. ``[B, T, I]``, or ``(x, keys)`` from
        :func:`with_step_keys` for dropout).
      carry: initial carry for batch shape ``(B,)``; default ``cell.initial_carry(params, (B,))``.
      seq_lengths: ``[B]`` ints for right-padded batches. Outputs at ``t >= seq_lengths[b]`` are zero and the
        returned carry is each sequence's carry after its last valid step.
      resets: ``[B, T]`` booleans; the carry is re-initialised (to ``cell.initial_carry``) *before* each flagged
        step, so several episodes can share one row. In reverse mode an episode starting at ``s`` is entered at its
        last step, so the carry is reset before step ``t`` when ``resets[:, t + 1]`` is set.
      unroll: ``lax.scan`` unroll factor; on the fused fast path ``1`` (the default) lets the layer pick its own
        tuned factor.
      reverse: run from the last step to the first (outputs stay in input order). With ``seq_lengths`` the
        padded steps come first and leave the carry untouched, so each sequence starts at its own last step.
      scan: a drop-in replacement for ``lax.scan`` (``scan(body, init, xs, reverse=, unroll=)``), e.g. a
        rematerialising schedule from :mod:`jbptt.remat`.
      reverse_mode_only: promise that the result is only differentiated in reverse mode (``grad``/``vjp``), which
        lets a cell's layer use its faster ``apply_reverse`` variant (the LSTM's hand-written VJP); ``jax.jvp``
        through such an unroll raises. The BPTT estimator sets it.

    Returns:
      ``(final_carry, ys)`` with ``ys: [B, T, output_size]``.

    Fast path: when the cell carries a fused :class:`~jbptt.cells.Layer` for its ``step`` (LSTM and GRU by
    default, and :func:`~jbptt.cells.stack` / :func:`~jbptt.cells.with_readout` of such cells), ``xs`` is a single
    array and no ``scan`` replacement is given, the whole sequence runs through the layer's ``apply`` (see
    :mod:`jbptt.fused`): same function, same ``seq_lengths`` / ``resets`` / ``reverse`` semantics. A segmented remat
    schedule (a ``scan`` with a ``run_layer`` attribute: :func:`jbptt.remat.every_k`, ``sqrt``, ``nested``) runs
    the layer's ``segment`` function (else ``apply``) on each innermost segment instead (Elman cells by default:
    one stored carry per step). Inputs with per-step keys (dropout), other ``scan`` replacements, mixed dtypes
    among ``params``, ``carry`` and ``xs`` and any other cell fall back to scanning ``cell.step``.

    Safe under ``jit``, ``grad``, ``vmap`` and ``jvp``.
    """
    B, T = batch_and_time(xs)
    if carry is None:
        carry = cell.initial_carry(params, (B,))
    valid = None if seq_lengths is None else sequence_mask(seq_lengths, T).T  # [T, B]
    layer = layer_of(cell)
    reset_before = None
    if resets is not None:
        resets = jnp.asarray(resets, bool)
        if resets.shape != (B, T):
            raise ValueError(f"unroll: resets must have shape [B, T] = {(B, T)}, got {resets.shape}")
        if reverse:
            resets = jnp.concatenate([resets[:, 1:], jnp.zeros((B, 1), bool)], axis=1)
        reset_before = resets.T
        fresh = cell.initial_carry(params, (B,))

    if layer is not None and _one_dtype(params, carry, xs):
        apply = layer.apply_reverse if reverse_mode_only and layer.apply_reverse is not None else layer.apply
        if scan is None and apply is not None:
            return _unroll_layer(apply, params, jnp.asarray(xs), carry, valid, reset_before, unroll, reverse)
        run_layer, seg = getattr(scan, "run_layer", None), segment_fn(layer)
        if run_layer is not None and seg is not None:
            apply = partial(run_layer, seg)
            return _unroll_layer(apply, params, jnp.asarray(xs), carry, valid, reset_before, unroll, reverse)

    def body(c, inp):
        x, v, r = inp
        if r is not None:
            c = batch_where(r, fresh, c)
        c_new, y = cell.step(params, c, x)
        c_new = jax.tree.map(lambda new, old: new.astype(old.dtype), c_new, c)  # keep the carry's dtype
        if v is not None:
            c_new = batch_where(v, c_new, c)
            y = batch_where(v, y, jnp.zeros_like(y))
        return c_new, y

    scan = lax.scan if scan is None else scan
    carry, ys = scan(body, carry, (time_major(xs), valid, reset_before), reverse=reverse, unroll=unroll)
    return carry, time_major(ys)


def _one_dtype(params, carry, xs) -> bool:
    """True when ``xs`` is a single array and it, ``params`` and ``carry`` share one floating dtype."""
    if not jax.tree_util.treedef_is_leaf(jax.tree.structure(xs)):
        return False
    dtypes = {jnp.result_type(a) for a in jax.tree.leaves((params, carry, xs))}
    return len(dtypes) == 1 and jnp.issubdtype(dtypes.pop(), jnp.floating)


def _unroll_layer(apply: Callable, params, xs, carry, valid, reset, unroll: int, reverse: bool):
    """The fast path of :func:`unroll`: a whole-sequence function of the cell's :class:`~jbptt.cells.Layer`."""
    flip = (lambda a: None if a is None else jnp.flip(a, axis=0)) if reverse else (lambda a: a)
    new_carry, ys = apply(params, flip(time_major(xs)), carry, flip(valid), flip(reset),
                          None if unroll == 1 else unroll)
    new_carry = jax.tree.map(lambda new, old: new.astype(old.dtype), new_carry, carry)
    return new_carry, time_major(flip(ys))


_unroll = unroll  # for callers whose own `unroll` argument shadows the function


def with_step_keys(xs, key, *, batch_size: int | None = None):
    """Pairs inputs with per-example, per-step PRNG keys for dropout in :func:`jbptt.cells.stack`.

    Args:
      xs: batch-major inputs ``[B, T, ...]``.
      key: a typed PRNG key (``jax.random.key``).

    Returns:
      ``(xs, keys)`` with ``keys: [B, T]`` typed keys, to pass as ``xs`` to :func:`unroll`.
    """
    B, T = batch_and_time(xs) if batch_size is None else (batch_size, batch_and_time(xs)[1])
    return xs, jax.random.split(key, (B, T))


class Bidirectional(NamedTuple):
    """A bidirectional layer (built at the unroll level): ``init(key, input_size) -> params`` and
    ``apply(params, xs, *, seq_lengths=None, resets=None, unroll=1) -> ((carry_fwd, carry_bwd), ys)`` with
    ``ys: [B, T, O_fwd + O_bwd]`` (forward outputs first)."""

    init: Callable
    apply: Callable
    output_size: int


def bidirectional(fwd: Cell, bwd: Cell) -> Bidirectional:
    """Combines a forward and a backward cell into a :class:`Bidirectional` layer.

    With ``seq_lengths`` the backward cell starts at each sequence's last valid step; outputs past the length
    are zero in both halves.
    """

    def init(key, input_size):
        kf, kb = jax.random.split(key)
        return {"fwd": fwd.init(kf, input_size), "bwd": bwd.init(kb, input_size)}

    def apply(params, xs, *, seq_lengths=None, resets=None, unroll: int = 1):
        cf, yf = _unroll(fwd, params["fwd"], xs, seq_lengths=seq_lengths, resets=resets, unroll=unroll)
        cb, yb = _unroll(bwd, params["bwd"], xs, seq_lengths=seq_lengths, resets=resets, unroll=unroll,
                         reverse=True)
        return (cf, cb), jnp.concatenate([yf, yb], axis=-1)

    return Bidirectional(init, apply, fwd.output_size + bwd.output_size)
