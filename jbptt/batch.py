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
    lengths = jnp.asarray(seq_lengths)
    return jnp.arange(T, dtype=lengths.dtype)[None, :] < lengths[:, None]


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


# ----------------------------------------------------------------------------------------------------------------
# Chunking: padding and cutting segments on a grid of time steps (TBPTT, streams).


def padding_steps(tree, n: int):
    """``n`` filler steps for every ``[B, T, ...]`` leaf of ``tree``: zeros (False) for numbers, and for typed PRNG
    keys (dropout inputs from :func:`jbptt.unroll.with_step_keys`) the leaf's last key repeated (``T >= 1``), so
    every filler is a valid value of the leaf's dtype. Returns leaves ``[B, n, ...]``."""

    def fill(a):
        a = jnp.asarray(a)
        shape = (a.shape[0], n) + a.shape[2:]
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jnp.broadcast_to(a[:, -1:], shape)
        return jnp.zeros(shape, a.dtype)

    return jax.tree.map(fill, tree)


def pad_time(tree, length: int):
    """Right-pads every ``[B, T, ...]`` leaf of ``tree`` to ``length >= T`` steps with :func:`padding_steps`."""

    def pad(a):
        a = jnp.asarray(a)
        extra = length - a.shape[1]
        return a if extra == 0 else jnp.concatenate([a, padding_steps(a, extra)], axis=1)

    return jax.tree.map(pad, tree)


def pad_chunk(batch: Batch, length: int) -> Batch:
    """Right-pads a batch of ``T <= length`` steps to ``length`` steps; the padding is masked out.

    The padded steps are invalid (``seq_lengths`` marks them): they leave the carry untouched and carry no loss,
    so a stream's short last chunk runs through the same compiled step as every full chunk.

    Args:
      batch: a :class:`Batch` with leaves ``[B, T, ...]``.
      length: the chunk length (e.g. TBPTT's ``k1``).

    Returns:
      A :class:`Batch` with leaves ``[B, length, ...]`` and ``seq_lengths: [B]`` (always set).
    """
    B, T = batch_and_time(batch.inputs)
    if T > length:
        raise ValueError(f"pad_chunk: the chunk has {T} steps, more than the chunk length {length}")
    lengths = jnp.full((B,), T, jnp.int32) if batch.seq_lengths is None else \
        jnp.minimum(jnp.asarray(batch.seq_lengths, jnp.int32), T)
    if T == length:
        return batch._replace(seq_lengths=lengths)
    mask = None if batch.mask is None else pad_time(jnp.broadcast_to(jnp.asarray(batch.mask), (B, T)), length)
    resets = None if batch.resets is None else pad_time(jnp.asarray(batch.resets, bool), length)
    return Batch(pad_time(batch.inputs, length), pad_time(batch.targets, length), mask, lengths, resets)


def split_chunks(batch: Batch, k1: int) -> Batch:
    """Cuts a batch of long sequences into chunks of ``k1`` steps on the grid ``0, k1, 2 k1, ...``.

    Args:
      batch: leaves ``[B, T, ...]``; ``mask``, ``seq_lengths`` and ``resets`` are optional.
      k1: the chunk length.

    Returns:
      A :class:`Batch` whose leaves are ``[n, B, k1, ...]`` with ``n = ceil(T / k1)`` (scan over the leading
      axis); the last chunk is right-padded and masked. ``seq_lengths: [n, B]`` gives each chunk's valid steps and
      ``mask``/``resets`` are always arrays.
    """
    B, T = batch_and_time(batch.inputs)
    n = -(-T // k1)
    valid = jnp.ones((B, T), bool) if batch.seq_lengths is None else sequence_mask(batch.seq_lengths, T)
    mask = jnp.ones((B, T)) if batch.mask is None else jnp.broadcast_to(jnp.asarray(batch.mask), (B, T))
    resets = jnp.zeros((B, T), bool) if batch.resets is None else jnp.asarray(batch.resets, bool)

    def cut(tree):
        def leaf(a):
            a = pad_time(a, n * k1)
            return jnp.moveaxis(jnp.reshape(a, (a.shape[0], n, k1) + a.shape[2:]), 1, 0)

        return jax.tree.map(leaf, tree)

    lengths = jnp.sum(cut(valid), axis=-1).astype(jnp.int32)  # valid steps are a prefix of each row
    return Batch(cut(batch.inputs), cut(batch.targets), cut(mask), lengths, cut(resets))
