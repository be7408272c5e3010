"""The training step: one pure function from (train state, batch) to (train state, metrics).

Any :class:`~jbptt.estimator.GradientEstimator` and any ``optax.GradientTransformation`` combine into a step
that is safe under ``jit`` (and, wrapped by :mod:`jbptt.parallel`, under ``pmap`` / sharded ``jit``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jbptt.batch import Batch, batch_and_time, pad_chunk, split_chunks
from jbptt.estimator import GradientEstimator


class TrainState(NamedTuple):
    """Everything a training run carries from step to step (a pytree; checkpoint it whole)."""

    params: Any
    opt_state: Any
    est_state: Any
    step: jax.Array


def init_train_state(estimator: GradientEstimator, optimizer: optax.GradientTransformation, params, carry, *,
                     key=None, inputs=None) -> TrainState:
    """Initial :class:`TrainState` for ``params`` and an initial ``carry`` (which fixes the batch shape).

    ``key`` and ``inputs`` (an example of the training inputs, leaves ``[B, T, ...]``) go to ``estimator.init``.
    """
    est_state = estimator.init(params, carry, key=key, inputs=inputs)
    return TrainState(params, optimizer.init(params), est_state, jnp.zeros((), jnp.int32))


def make_train_step(estimator: GradientEstimator, optimizer: optax.GradientTransformation,
                    *, grad_transform: Callable[[Any], Any] | None = None):
    """Builds ``train_step(state, batch) -> (state, metrics)``.

    Args:
      estimator: how gradients are obtained (BPTT, TBPTT, RTRL, ...).
      optimizer: an optax transformation (clipping, weight decay etc. chained in by the caller).
      grad_transform: optional function applied to the gradients before the optimizer (e.g. a ``lax.pmean``
        over a device axis in :mod:`jbptt.parallel`); it receives and returns ``(loss, grads)``.

    Returns:
      A pure function; ``metrics`` holds ``loss`` and ``grad_norm`` (before the optimizer) as scalars.
    """

    def train_step(state: TrainState, batch: Batch):
        loss, grads, est_state = estimator.update(state.params, state.est_state, batch)
        if grad_transform is not None:
            loss, grads = grad_transform((loss, grads))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return TrainState(params, opt_state, est_state, state.step + 1), metrics

    return train_step


# ----------------------------------------------------------------------------------------------------------------
# Chunked training: one optimizer step per chunk of a long sequence or a stream (e.g. truncated BPTT).


def make_sequence_train_step(estimator: GradientEstimator, optimizer: optax.GradientTransformation, k1: int,
                             *, reset: bool = True):
    """Builds ``train_sequence(state, batch) -> (state, metrics)``: one optimizer step per chunk of ``k1`` steps of a
    batch of long sequences held in memory (a ``lax.scan`` over the chunks; compiled once).

    Args:
      estimator: a stateful estimator (e.g. ``tbptt(..., k1=k1, stateful=True)``), so its state crosses chunks.
      optimizer: an optax transformation.
      k1: the chunk length.
      reset: start the sequences from the initial carry (a reset before their first step); ``False`` continues
        from the state's carry (consecutive pieces of one stream).

    Returns:
      A pure function; ``state`` is a :class:`TrainState` (from :func:`init_train_state`, with ``inputs=`` where
      the estimator keeps inputs) and ``metrics`` leaves are ``[n_chunks]``.
    """
    train_step = make_train_step(estimator, optimizer)

    def train_sequence(state: TrainState, batch: Batch):
        return lax.scan(train_step, state, split_chunks(start_sequences(batch) if reset else batch, k1))

    return train_sequence


def start_sequences(batch: Batch) -> Batch:
    """``batch`` with a reset before every sequence's first step (``resets[:, 0] = True``), so a stateful estimator
    starts it from the initial carry (and a fresh trace) whatever its state holds. Leaves ``[B, T, ...]``."""
    B, T = batch_and_time(batch.inputs)
    resets = jnp.zeros((B, T), bool) if batch.resets is None else jnp.asarray(batch.resets, bool)
    return batch._replace(resets=resets.at[:, 0].set(True))


def sequence_chunk(batch: Batch, k1: int, index) -> Batch:
    """Chunk ``index`` (``0 <= index < ceil(T / k1)``, may be traced) of :func:`jbptt.batch.split_chunks`: leaves
    ``[B, k1, ...]``, the last chunk right-padded and masked. Safe under ``jit``."""
    return jax.tree.map(lambda a: a[index], split_chunks(batch, k1))


def train_stream(train_step, state, chunks: Iterable[Batch], k1: int, *, on_metrics: Callable | None = None):
    """Feeds a stream of chunks (an iterator of :class:`Batch`, each ``[B, T <= k1, ...]``) to ``train_step``.

    Every chunk is padded to ``k1`` steps (:func:`jbptt.batch.pad_chunk`), so a jitted ``train_step`` compiles once
    and serves every chunk, the short last one included. The estimator must be stateful so its state crosses chunks.

    Args:
      train_step: ``train_step(state, batch) -> (state, metrics)``, e.g. ``jax.jit(make_train_step(...))``.
      state: the initial train state.
      chunks: iterable of batches in stream order.
      k1: the chunk length.
      on_metrics: optional callback ``on_metrics(index, metrics)`` after each chunk.

    Returns:
      ``(state, n_chunks)``.
    """
    n = 0
    for n, chunk in enumerate(chunks, start=1):
        state, metrics = train_step(state, pad_chunk(chunk, k1))
        if on_metrics is not None:
            on_metrics(n - 1, metrics)
    return state, n
