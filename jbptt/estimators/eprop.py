"""e-prop (Bellec et al. 2020, symmetric feedback) for Elman and LSTM cells.

The gradient is ``sum_t L_t . e_t``: the learning signal ``L_t = dl_t/ds_t`` (through the readout of the same step
only) times the eligibility trace ``e_t``, an approximation of ``ds_t/dtheta`` that keeps only each unit's own
*internal* dynamics: ``e_t = D^int_t e_{t-1} + M_t``, where ``D^int`` is the per-unit block of the carry Jacobian
restricted to the internal carry components (the LSTM cell state ``c``, whose self-dependence is the forget gate);
components that feed the recurrent weights (``h``) are dropped. For an Elman cell the eligibility is the immediate
influence, for an LSTM it is carried through ``c``. Memory O(P) per example (compressed like SnAp-1).

The readout ``y = h W + b`` (with :func:`jbptt.cells.with_readout`) or ``y = h`` is taken from the first carry
component ``h``, as for :func:`jbptt.cells.elman` and :func:`jbptt.cells.lstm`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

from jbptt.cells import Cell
from jbptt.estimator import GradientEstimator, register_estimator
from jbptt.estimators.compressed import eligibility_estimator, hidden_readout
from jbptt.losses import LossFn

__all__ = ["eprop"]


@register_estimator("eprop")
def eprop(cell: Cell, loss_fn: LossFn, *, internal: Sequence[int] | None = None, readout=hidden_readout,
          stateful: bool = False, split: bool = True) -> GradientEstimator:
    """e-prop as a :class:`GradientEstimator`.

    Args:
      internal: indices of the carry components kept in the eligibility dynamics; default all but the first
        (``c`` for an LSTM ``(h, c)``; none for Elman).
      readout: ``readout(params, new_carry, x) -> y`` matching the step's output (checked by ``init``).
      stateful: carry and eligibility continue between segments (online learning).
      split: eligibility only for the parameters that act on the state (``init`` needs ``inputs=`` anyway); the
        readout's gradient is exact and direct either way. ``False``: rows for every trainable leaf, as before.

    Returns:
      A :class:`GradientEstimator` with :class:`~jbptt.estimators.online.OnlineState` (eligibility ``[B, R, n]``);
      ``init(params, carry, *, key=None, inputs=...)`` needs an example segment ``inputs`` for its readout check.
    """

    def block_for(rows):
        kept = tuple(range(1, rows.C)) if internal is None else tuple(internal)
        keep = jnp.zeros((rows.C,)).at[jnp.asarray(kept, jnp.int32)].set(1.0)
        return lambda blocks, *_: blocks * keep.astype(blocks.dtype)[None, None, :]

    return eligibility_estimator("eprop", cell, loss_fn, block_for, readout=readout, stateful=stateful,
                                 split=split)
