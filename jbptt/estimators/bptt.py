"""Backpropagation through time: ``jax.value_and_grad`` over the unrolled scan.

This is the reference every other estimator (truncated, online, rematerialised, multi-device, hand-optimised) is
tested against, so it is kept plain.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from jax import lax

from jbptt.batch import Batch
from jbptt.cells import Cell, plain
from jbptt.estimator import GradientEstimator, register_estimator
from jbptt.losses import LossFn, sequence_loss
from jbptt.unroll import Bidirectional, ScanFn, SequenceModel, unroll

__all__ = ["Batch", "BPTTState", "GradientEstimator", "bptt", "loss_and_outputs", "reference_gradient"]


def loss_and_outputs(cell: Cell, loss_fn: LossFn, params, batch: Batch, carry=None, *, unroll_steps: int = 1,
                     scan: ScanFn | None = None, reverse_mode_only: bool = False, truncation: int | None = None):
    """Unrolls ``cell`` over ``batch`` and returns ``(loss, (final_carry, ys))``.

    Args:
      carry: initial carry (default: ``cell.initial_carry(params, (B,))``, so a learned initial carry is trained).
      unroll_steps: ``lax.scan`` unroll factor.
      scan: replacement for ``lax.scan`` (see :mod:`jbptt.remat`).
      reverse_mode_only: passed to :func:`jbptt.unroll.unroll` (a fused fast path may then use a ``custom_vjp``;
        no ``jax.jvp`` through it).
      truncation: passed to :func:`jbptt.unroll.unroll` as ``truncate`` (the gradient is cut every ``k`` steps).

    Returns:
      ``loss`` (scalar weighted mean per-step loss, or a :class:`~jbptt.losses.WholeSequenceLoss` of the whole
      sequence), ``final_carry`` and ``ys: [B, T, O]``.
    """
    final, ys = unroll(cell, params, batch.inputs, carry, seq_lengths=batch.seq_lengths, resets=batch.resets,
                       unroll=unroll_steps, scan=scan, reverse_mode_only=reverse_mode_only, truncate=truncation)
    return sequence_loss(loss_fn, ys, batch.targets, batch.weights(ys.dtype)), (final, ys)


def reference_gradient(cell: Cell, loss_fn: LossFn, params, batch: Batch, carry=None):
    """Plain BPTT ``(loss, grads)`` by ``jax.value_and_grad`` of the scanned ``cell.step`` — the reference for tests.

    The cell's fused fast path is removed (:func:`jbptt.cells.plain`), so the reference never rests on it.
    """
    cell = plain(cell)
    loss, grads = jax.value_and_grad(lambda p: loss_and_outputs(cell, loss_fn, p, batch, carry)[0])(params)
    return loss, grads


class BPTTState(NamedTuple):
    """State of :func:`bptt`: the carry the next segment starts from (used when ``stateful``)."""

    carry: Any


@register_estimator("bptt", whole_sequence=True)
def bptt(cell: Cell, loss_fn: LossFn, *, stateful: bool = False, unroll_steps: int = 1,
         scan: ScanFn | None = None, truncation: int | None = None) -> GradientEstimator:
    """Full backpropagation through time as a :class:`GradientEstimator`.

    Args:
      cell: the cell (include the readout, e.g. :func:`jbptt.cells.with_readout`).
      loss_fn: per-step loss ``loss_fn(y, target) -> [...]`` (see :mod:`jbptt.losses`).
      stateful: if True each segment starts from the previous segment's final carry (with the gradient stopped);
        if False (default) every segment starts from ``cell.initial_carry(params, (B,))``.
      unroll_steps: ``lax.scan`` unroll factor.
      scan: replacement for ``lax.scan``, e.g. a checkpointing schedule from :mod:`jbptt.remat`.
      truncation: ``k`` cuts the gradient every ``k`` steps over the whole sequence (values unchanged): the
        gradient of truncated BPTT(k, k) at fixed parameters, for losses that need the whole sequence (CTC), where
        ``tbptt``'s chunked updates do not apply. ``None``: the full gradient.

    The cell may also be a whole-sequence model (:class:`jbptt.unroll.SequenceModel`, e.g. bidirectional layers)
    and the loss a :class:`~jbptt.losses.WholeSequenceLoss` (e.g. CTC).

    Returns:
      A :class:`GradientEstimator` whose ``init(params, carry, *, key=None, inputs=None)`` keeps ``carry`` (``key``
      and ``inputs`` are not needed) and whose ``update`` returns the exact gradient of the segment's loss. ``update``
      differentiates in reverse mode only, so it unrolls with ``reverse_mode_only=True`` (a fused LSTM runs its
      hand-written VJP layer); forward-mode derivatives *of* ``update`` are not supported for fused cells.
    """

    if truncation is not None and truncation < 1:
        raise ValueError(f"bptt: truncation must be >= 1 (or None), got {truncation}")
    if stateful and isinstance(cell, SequenceModel | Bidirectional):
        raise ValueError("bptt: stateful=True needs a carry that crosses segments; a bidirectional model reads "
                         "each sequence whole")

    def init(params, carry, *, key=None, inputs=None):
        del params, key, inputs
        return BPTTState(carry)

    def update(params, state, batch):
        # Not stateful: the carry is built inside the differentiated function (``carry=None`` makes ``unroll``
        # call ``cell.initial_carry(p, (B,))``), so a learned initial carry gets its gradient.
        carry = lax.stop_gradient(state.carry) if stateful else None
        (loss, (final, _)), grads = jax.value_and_grad(
            lambda p: loss_and_outputs(cell, loss_fn, p, batch, carry, unroll_steps=unroll_steps, scan=scan,
                                       reverse_mode_only=True, truncation=truncation),
            has_aux=True)(params)
        return loss, grads, BPTTState(final if stateful else state.carry)

    return GradientEstimator(init, update)
