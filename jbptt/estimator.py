"""The GradientEstimator protocol and the estimator registry. It knows no algorithm.

Every gradient algorithm (BPTT, truncated BPTT, RTRL, UORO, SnAp, e-prop, ...) is a :class:`GradientEstimator`::

    state = est.init(params, carry, key=key, inputs=example_inputs)   # carry: cell.initial_carry(params, (B,))
    loss, grads, state = est.update(params, state, batch)              # one segment: a sequence, a chunk, online steps

The trainer, the multi-device wrappers and the comparison harness talk only to this shape. A new algorithm is one
new module under :mod:`jbptt.estimators` that builds a GradientEstimator and registers its factory with
:func:`register_estimator`; ``jbptt.estimators`` imports its modules so that they register.

Conventions every estimator follows:

- factories are pure: no mutable state in closures; options are checked in the factory, everything that depends
  on ``params`` or the batch shape is checked in ``init`` (which runs eagerly, before any ``jit``);
- randomness enters one way: ``init(..., key=)`` (a typed PRNG key; ``None`` means ``jax.random.key(0)``); the
  state carries the key and ``update`` splits it;
- whatever an estimator needs before its first update (e.g. TBPTT's replay buffer of past inputs) is allocated
  by ``init`` from ``inputs``, an example of the segment inputs (leaves ``[B, T, ...]``, any ``T``), so the state's
  structure never changes between updates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from jbptt.batch import Batch
from jbptt.losses import is_whole_sequence
from jbptt.unroll import Bidirectional, SequenceModel


class GradientEstimator(NamedTuple):
    """How a gradient is obtained over a segment of time steps (shaped like optax's GradientTransformation).

    Attributes:
      init: ``init(params, carry, *, key=None, inputs=None) -> state``; ``carry`` fixes the batch shape and the
        state to start from, ``key`` seeds the estimator's randomness, ``inputs`` is an example of the segment
        inputs for estimators that keep inputs in their state.
      update: ``update(params, state, batch) -> (loss, grads, new_state)``; ``grads`` has the structure of
        ``params``; ``loss`` is the weighted mean per-step loss of the segment.
    """

    init: Callable[[Any, Any], Any]
    update: Callable[[Any, Any, Batch], tuple[Any, Any, Any]]


ESTIMATORS: dict[str, Callable[..., GradientEstimator]] = {}

WHOLE_SEQUENCE: set[str] = set()
"""Names of the estimators that differentiate the whole unroll at once, so they accept a whole-sequence loss
(:class:`~jbptt.losses.WholeSequenceLoss`, e.g. CTC) and a whole-sequence model (bidirectional layers,
:class:`~jbptt.unroll.SequenceModel`)."""


def register_estimator(name: str, *, whole_sequence: bool = False):
    """Decorator registering ``factory(cell, loss_fn, **options) -> GradientEstimator`` under ``name``;
    ``whole_sequence=True`` declares that it accepts whole-sequence losses and models (see :data:`WHOLE_SEQUENCE`)."""

    def decorator(factory):
        ESTIMATORS[name] = factory
        if whole_sequence:
            WHOLE_SEQUENCE.add(name)
        return factory

    return decorator


def make_estimator(name: str, cell, loss_fn, **options) -> GradientEstimator:
    """Builds a registered estimator by name, with a clear error listing the registered names.

    jbptt's own estimators register when :mod:`jbptt.estimators` is imported (``import jbptt`` does that).
    """
    try:
        factory = ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; registered: {sorted(ESTIMATORS)}") from None
    if name not in WHOLE_SEQUENCE:
        if is_whole_sequence(loss_fn):
            raise ValueError(f"estimator {name!r} needs a per-step loss, but {loss_fn.name} is a whole-sequence "
                             f"loss; estimators that take one: {sorted(WHOLE_SEQUENCE)}")
        if isinstance(cell, SequenceModel | Bidirectional):
            raise ValueError(f"estimator {name!r} steps the cell one time step at a time, but the model has "
                             "bidirectional layers, which read the whole sequence; estimators that take one: "
                             f"{sorted(WHOLE_SEQUENCE)}")
    return factory(cell, loss_fn, **options)
