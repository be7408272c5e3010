"""The GradientEstimator protocol, the Batch every estimator consumes, and the estimator registry.

Every gradient algorithm (BPTT, truncated BPTT, RTRL, UORO, SnAp, e-prop, ...) is a :class:`GradientEstimator`:

    state = est.init(params, carry)                        # carry: cell.initial_carry(params, (B,))
    loss, grads, state = est.update(params, state, batch)  # one segment: a sequence, a chunk, online steps

The trainer, the multi-device wrappers and the comparison harness talk only to this shape. A new algorithm is one
new module that builds a GradientEstimator and registers its factory with :func:`register_estimator`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp

from jbptt.losses import loss_weights
from jbptt.unroll import batch_and_time


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


class GradientEstimator(NamedTuple):
    """How a gradient is obtained over a segment of time steps (shaped like optax's GradientTransformation).

    Attributes:
      init: ``init(params, carry) -> state``; ``carry`` fixes the batch shape and the state to start from.
      update: ``update(params, state, batch) -> (loss, grads, new_state)``; ``grads`` has the structure of
        ``params``; ``loss`` is the weighted mean per-step loss of the segment.
    """

    init: Callable[[Any, Any], Any]
    update: Callable[[Any, Any, Batch], tuple[Any, Any, Any]]


ESTIMATORS: dict[str, Callable[..., GradientEstimator]] = {}


def register_estimator(name: str):
    """Decorator registering ``factory(cell, loss_fn, **options) -> GradientEstimator`` under ``name``."""

    def decorator(factory):
        ESTIMATORS[name] = factory
        return factory

    return decorator


def make_estimator(name: str, cell, loss_fn, **options) -> GradientEstimator:
    """Builds a registered estimator by name, with a clear error listing the registered names."""
    _import_builtin_estimators()
    try:
        factory = ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; registered: {sorted(ESTIMATORS)}") from None
    return factory(cell, loss_fn, **options)


def _import_builtin_estimators():
    """Imports jbptt's own estimator modules so that they register themselves."""
    import importlib

    for module in BUILTIN_ESTIMATOR_MODULES:
        importlib.import_module(module)


BUILTIN_ESTIMATOR_MODULES = ["jbptt.bptt", "jbptt.tbptt", "jbptt.rtrl", "jbptt.snap", "jbptt.uoro", "jbptt.eprop",
                             "jbptt.rflo", "jbptt.kfrtrl"]
