"""Data shapes: the :class:`Batch` every estimator consumes, masks and loss weights.

Everything here is batch-major (leaves ``[B, T, ...]``) and knows nothing of cells or estimators, so tasks,
losses and estimators can all depend on it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


def batch_and_time(xs) -> tuple[int, int]:
    """Returns ``(B, T)`` read from the first leaf of batch-major ``xs``, with a clear error for bad shapes."""
    leaves = jax.tree_util.tree_leaves(xs)
    if not leaves:
        raise ValueError("xs has no arrays")
    shape = jnp.shape(leaves[0])
    if len(shape) < 2:
        raise ValueError(f"xs must be batch-major [B, T, ...]; got an array of shape {shape}")
    return int(shape[0]), int(shape[1])


def sequence_mask(seq_lengths, T: int):
    """``[B, T]`` booleans, True at the valid steps ``t < seq_lengths[b]`` of right-padded sequences."""
    return jnp.arange(T)[None, :] < jnp.asarray(seq_lengths)[:, None]


def batch_where(mask, on_true, on_false):
    """``jnp.where`` over pytrees with a per-example ``mask: [B]`` broadcast against leaves ``[B, ...]``."""

    def pick(a, b):
        m = jnp.reshape(mask, mask.shape + (1,) * (jnp.ndim(a) - mask.ndim))
        return jnp.where(m, a, b)

    return jax.tree.map(pick, on_true, on_false)


def time_major(tree):
    """Swaps the two leading axes of every leaf: ``[B, T, ...] <-> [T, B, ...]``."""
    return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), tree)


def loss_weights(B: int, T: int, *, mask=None, seq_lengths=None, dtype=jnp.float32):
    """Per-step loss weights ``[B, T]``: ``mask`` (default all ones) times the validity of ``seq_lengths``."""
    w = jnp.ones((B, T), dtype) if mask is None else jnp.broadcast_to(jnp.asarray(mask, dtype), (B, T))
    if seq_lengths is not None:
        w = w * sequence_mask(seq_lengths, T).astype(dtype)
    return w


class Batch(NamedTuple):
    """One segment of data, batch-major.

    Attributes:
      inputs: ``[B, T, I]`` (or a pytree of ``[B, T, ...]`` leaves).
      targets: ``[B, T, ...]`` targets for the per-step loss.
      mask: optional ``[B, T]`` loss weights (1 where a step has a target, 0 where it has none).
      seq_lengths: optional ``[B]`` lengths of right-padded sequences.
      resets: optional ``[B, T]`` booleans: the carry is re-initialised before flagged steps.
    """

    inputs: Any
    targets: Any
    mask: Any = None
    seq_lengths: Any = None
    resets: Any = None

    def weights(self, dtype=jnp.float32):
        """``[B, T]`` loss weights combining ``mask`` and ``seq_lengths``."""
        B, T = batch_and_time(self.inputs)
        return loss_weights(B, T, mask=self.mask, seq_lengths=self.seq_lengths, dtype=dtype)
