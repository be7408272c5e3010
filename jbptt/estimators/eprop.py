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

import jax
import jax.numpy as jnp

from jbptt.cells import Cell
from jbptt.estimator import GradientEstimator, register_estimator
from jbptt.estimators.online import (
    OnlineState,
    compressed_core,
    compressed_trace0,
    init_state,
    is_concrete,
    online_segment,
    unit_rows,
)
from jbptt.losses import LossFn

__all__ = ["eprop", "hidden_readout"]


def hidden_readout(params, carry, x):
    """``y`` from the first carry component ``h``: ``h W + b`` when ``params`` has a ``with_readout`` readout."""
    del x
    h = jax.tree_util.tree_leaves(carry)[0]
    if isinstance(params, dict) and "readout" in params and "core" in params:
        return h @ params["readout"]["w"] + params["readout"]["b"]
    return h


def check_readout(cell: Cell, params, readout, x):
    """Raises if ``readout(params, new_carry, x)`` differs from the step's output (one example ``x``)."""
    carry = cell.initial_carry(params, ())
    carry = jax.tree.map(lambda c: c + 0.5, carry)
    new, y = cell.step(params, carry, x)
    y_read = readout(params, new, x)
    if jnp.shape(y_read) != jnp.shape(y) or not jnp.allclose(y_read, y, rtol=1e-5, atol=1e-6):
        raise ValueError("e-prop / RFLO need the output to be a readout of the new carry's first component h "
                         "(Elman or LSTM, optionally with_readout); pass readout=... for other cells")


@register_estimator("eprop")
def eprop(cell: Cell, loss_fn: LossFn, *, internal: Sequence[int] | None = None, readout=hidden_readout,
          stateful: bool = False) -> GradientEstimator:
    """e-prop as a :class:`GradientEstimator`.

    Args:
      internal: indices of the carry components kept in the eligibility dynamics; default all but the first
        (``c`` for an LSTM ``(h, c)``; none for Elman).
      readout: ``readout(params, new_carry, x) -> y`` matching the step's output (checked on the first eager update).

    Returns:
      A :class:`GradientEstimator` with :class:`jbptt.estimators.online.OnlineState` (eligibility ``[B, R, n]``).
    """
    def parts(params):
        rows = unit_rows(cell, params)
        keep = jnp.zeros((rows.C,)).at[jnp.asarray(tuple(range(1, rows.C)) if internal is None else
                                                   tuple(internal), jnp.int32)].set(1.0)
        block = lambda blocks, *_: blocks * keep.astype(blocks.dtype)[None, None, :]
        return rows, compressed_core(rows, block, readout=readout)

    return eligibility_estimator(cell, loss_fn, parts, readout=readout, stateful=stateful)


def eligibility_estimator(cell: Cell, loss_fn: LossFn, parts, *, readout, stateful: bool) -> GradientEstimator:
    """The GradientEstimator shared by e-prop and RFLO: compressed per-unit eligibility traces.

    Args:
      parts: ``parts(params) -> (rows, core)``, the unit rows and the per-example core of
        :func:`jbptt.estimators.online.compressed_core` that advances the eligibility trace.
      readout: the step's output as a function of the new carry (checked once against the step, eagerly).

    Returns:
      A :class:`GradientEstimator` with :class:`jbptt.estimators.online.OnlineState` (eligibility ``[B, R, n]``).
    """
    checked = []

    def init(params, carry, key=None):
        return init_state(cell, params, carry, compressed_trace0(unit_rows(cell, params)), key)

    def update(params, state: OnlineState, batch):
        x0 = jax.tree.map(lambda a: a[0, 0], batch.inputs)
        if not checked and is_concrete((params, x0)):
            check_readout(cell, params, readout, x0)
            checked.append(True)
        rows, core = parts(params)
        return online_segment(cell, loss_fn, params, state, batch, core=core, trace0=compressed_trace0(rows),
                              stateful=stateful)

    return GradientEstimator(init, update)
