"""The training step: one pure function from (train state, batch) to (train state, metrics).

Any :class:`~jbptt.estimator.GradientEstimator` and any ``optax.GradientTransformation`` combine into a step
that is safe under ``jit`` (and, wrapped by :mod:`jbptt.parallel`, under ``pmap`` / sharded ``jit``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jbptt.batch import Batch
from jbptt.estimator import GradientEstimator


class TrainState(NamedTuple):
    """Everything a training run carries from step to step (a pytree; checkpoint it whole)."""

    params: Any
    opt_state: Any
    est_state: Any
    step: jax.Array


def init_train_state(estimator: GradientEstimator, optimizer: optax.GradientTransformation, params,
                     carry) -> TrainState:
    """Initial :class:`TrainState` for ``params`` and an initial ``carry`` (which fixes the batch shape)."""
    return TrainState(params, optimizer.init(params), estimator.init(params, carry), jnp.zeros((), jnp.int32))


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
