"""Losses over cell outputs: per-step and final-step, masked, averaged over valid steps only.

A *per-step loss* is an element-wise function ``loss_fn(y, target) -> [...]`` of one output ``y: [..., O]`` and
its target; the estimators weight it by :func:`loss_weights` and average with :func:`weighted_mean`. Final-step
losses (classification, regression of a whole sequence) are per-step losses whose weights select each sequence's
last valid step (:func:`final_step_weights`); auxiliary losses at chosen steps add weights at those steps
(:func:`step_weights`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jbptt.batch import loss_weights, sequence_mask  # noqa: F401  (loss_weights is part of this API)

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


class WholeSequenceLoss(NamedTuple):
    """A loss of the whole output sequence that is not a sum of per-step terms (e.g. CTC,
    :func:`jbptt.ctc.ctc_sequence_loss`).

    Attributes:
      fn: ``fn(ys [B, T, O], targets, weights [B, T]) -> scalar`` (``weights`` mark the valid steps).
      name: what the loss is called in error messages.

    :func:`sequence_loss` (and so ``bptt``, evaluation and the diagnostics) calls ``fn``. Used as a per-step
    ``loss_fn(y, target)`` it raises a ``ValueError`` naming the problem: estimators that need a per-step loss
    (the online ones: rtrl, snap, uoro, kfrtrl, eprop, rflo; tbptt's chunked updates) cannot train with it.
    """

    fn: Callable
    name: str = "a whole-sequence loss"

    def __call__(self, y, target):
        raise ValueError(f"{self.name} is a whole-sequence loss: it cannot be evaluated one step at a time, so "
                         "estimators that need a per-step loss (online: rtrl, snap, uoro, kfrtrl, eprop, rflo; "
                         "tbptt's chunked updates) do not apply; use bptt (with truncation=k for a truncated "
                         "gradient)")


def is_whole_sequence(loss_fn) -> bool:
    """True for a :class:`WholeSequenceLoss`."""
    return isinstance(loss_fn, WholeSequenceLoss)


def cross_entropy(logits, labels):
    """Softmax cross-entropy. ``logits: [..., C]``, integer ``labels: [...]``; returns ``[...]`` (nats)."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.asarray(labels, jnp.int32)[..., None], axis=-1)[..., 0]
    return logz - picked


def _same_shape(name: str, pred, target):
    """One clear error when predictions and targets differ in shape (instead of a silent broadcast)."""
    if jnp.shape(pred) != jnp.shape(target):
        raise ValueError(f"{name}: predictions have shape {jnp.shape(pred)} but targets have shape "
                         f"{jnp.shape(target)}; they must match (check the model's output size)")


def mse(pred, target):
    """Squared error averaged over the last axis. ``pred, target: [..., D]`` (same shape); returns ``[...]``."""
    _same_shape("mse", pred, target)
    return jnp.mean(jnp.square(pred - target), axis=-1)


def binary_cross_entropy(logits, target):
    """Sigmoid cross-entropy averaged over the last axis. ``logits, target: [..., D]`` (same shape); returns
    ``[...]``."""
    _same_shape("binary_cross_entropy", logits, target)
    return jnp.mean(jnp.logaddexp(0.0, logits) - logits * target, axis=-1)


LOSSES: dict[str, LossFn] = {"cross_entropy": cross_entropy, "mse": mse,
                             "binary_cross_entropy": binary_cross_entropy}


def get_loss(name: str) -> LossFn:
    """Looks a per-step loss up by name, with a clear error listing the choices."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSSES)}") from None



def weighted_mean(values, weights):
    """``sum(weights * values) / sum(weights)`` over all axes (0 when every weight is 0). Returns a scalar."""
    total = jnp.sum(weights)
    return jnp.sum(weights * values) / jnp.where(total > 0, total, 1.0)


def final_step_weights(B: int, T: int, seq_lengths=None, dtype=jnp.float32):
    """``[B, T]`` one-hot weights at each sequence's last valid step (``T - 1`` without ``seq_lengths``)."""
    last = jnp.full((B,), T - 1) if seq_lengths is None else jnp.asarray(seq_lengths) - 1
    return jax.nn.one_hot(last, T, dtype=dtype)


def step_weights(B: int, T: int, steps: Sequence[int], weights: Sequence[float] | None = None,
                 dtype=jnp.float32):
    """``[B, T]`` weights that put ``weights[k]`` (default 1) on time step ``steps[k]``, for auxiliary losses."""
    w = jnp.zeros((T,), dtype)
    for k, t in enumerate(steps):
        w = w.at[t].add(1.0 if weights is None else weights[k])
    return jnp.broadcast_to(w, (B, T))


def final_step(ys, seq_lengths=None):
    """Each sequence's output at its last valid step. ``ys: [B, T, ...]``; returns ``[B, ...]``."""
    B, T = ys.shape[:2]
    last = jnp.full((B,), T - 1) if seq_lengths is None else jnp.asarray(seq_lengths) - 1
    return ys[jnp.arange(B), last]


def sequence_loss(loss_fn: LossFn | WholeSequenceLoss, ys, targets, weights):
    """Weighted mean of ``loss_fn(ys, targets)`` over batch and time. ``ys: [B, T, O]``, ``weights: [B, T]``.

    A :class:`WholeSequenceLoss` is evaluated on the whole sequence instead: ``loss_fn.fn(ys, targets, weights)``.
    Returns a scalar."""
    if isinstance(loss_fn, WholeSequenceLoss):
        return loss_fn.fn(ys, targets, weights)
    return weighted_mean(loss_fn(ys, targets), weights)


def accuracy(logits, labels, weights):
    """Weighted fraction of steps where ``argmax(logits) == labels``. ``logits: [B, T, C]``; returns a scalar."""
    return weighted_mean((jnp.argmax(logits, -1) == labels).astype(weights.dtype), weights)
