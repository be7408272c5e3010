"""Exact real-time recurrent learning (Williams & Zipser 1989) for any Cell, by forward-mode autodiff.

Every example carries the influence matrix ``J_t = d s_t / d theta`` (``s`` the raveled carry, ``theta`` the
trainable parameters), stored as ``[P, n]``. With ``(s_t, y_t) = step(theta, s_{t-1}, x_t)``::

    J_t = (ds_t/ds_{t-1}) J_{t-1} + ds_t/dtheta
    dL_t/dtheta = dL_t/dy_t (dy_t/dtheta + dy_t/ds_{t-1} J_{t-1})

so readout parameters inside :func:`~jbptt.cells.with_readout` and a learned initial carry
(``J_0 = d s_0 / d theta``) are handled uniformly. With ``split=True`` (default) the influence is kept only for the
``Ps`` parameters the carry depends on (:func:`~jbptt.estimators.online.state_acting`): a readout's
``dL_t/dtheta = dL_t/dy_t dy_t/dtheta`` is taken directly at each step (Elman n=256 with a 256-output readout:
``Ps = 131,328`` of ``P = 197,120``). The gradient of each step is available at that step: nothing of
the past is stored, and memory does not grow with ``T``.

- ``mode="jacobian"`` (default) or ``"jvp"``: two ways of advancing the dense influence
  (:func:`~jbptt.estimators.online.dense_core`); ``"jacobian"`` does a factor ``n`` less work.
- ``diagonal=True``: the exact path for element-wise recurrences (diagonal linear / LRU, IndRNN): every parameter
  drives one unit, so the influence is stored compressed as ``[R, n]`` rows (``R = P / N``) and advanced by one
  jvp per row: time and memory O(P) per step.

The dense path costs time O(n^4) and memory O(n^3) per example for an Elman cell with ``n`` units, so
``max_influence_bytes`` guards it with a clear error in ``init``, before anything is allocated.
"""

from __future__ import annotations

from jbptt.cells import Cell
from jbptt.estimator import GradientEstimator, register_estimator
from jbptt.estimators.compressed import check_unit_structure, compressed_core, compressed_trace0
from jbptt.estimators.online import (
    DEFAULT_MAX_INFLUENCE_BYTES,
    batch_size,
    check_influence_size,
    check_on_example,
    dense_core,
    dense_trace0,
    influence_bytes,
    online_estimator,
    unit_rows,
)
from jbptt.losses import LossFn

__all__ = ["check_unit_structure", "influence_bytes", "rtrl"]


@register_estimator("rtrl")
def rtrl(cell: Cell, loss_fn: LossFn, *, mode: str = "jacobian", diagonal: bool = False, stateful: bool = False,
         max_influence_bytes: int | None = DEFAULT_MAX_INFLUENCE_BYTES, split: bool = True) -> GradientEstimator:
    """Exact RTRL as a :class:`GradientEstimator`.

    Args:
      cell: any cell (stacks, readouts and learned initial carries included).
      loss_fn: per-step loss ``loss_fn(y, target) -> [...]``.
      mode: ``"jacobian"`` or ``"jvp"`` (dense path; see the module docstring).
      diagonal: use the compressed exact path for element-wise cells; ``init`` then needs ``inputs=`` (an example
        segment) and checks the cell (:func:`~jbptt.estimators.compressed.check_unit_structure`).
      stateful: carry and influence continue from segment to segment: online learning with an optimizer update
        after every (short) segment. If False (default, as for ``bptt``) every update restarts from the initial
        carry, so independent batches of sequences are handled like BPTT does.
      max_influence_bytes: the largest influence matrix (whole batch) ``init`` accepts; ``None`` for no limit.
      split: influence only for the parameters that act on the state (``init`` needs ``inputs=`` when
        ``stateful``); ``False``: over all trainable parameters, as before the split.

    Returns:
      A :class:`GradientEstimator` with state :class:`~jbptt.estimators.online.OnlineState` (trace ``[B, Ps, n]`` or
      ``[B, R, n]``; ``Ps = P`` with ``split=False``) whose ``update`` returns the exact gradient of the segment
      loss (from the state's carry and influence when ``stateful``). ``update`` is safe under ``jit``.
    """
    if mode not in ("jvp", "jacobian"):
        raise ValueError(f"rtrl: mode must be 'jvp' or 'jacobian', got {mode!r}")

    def parts(params, acting=None):
        if diagonal:
            rows = unit_rows(cell, params, acting)
            return compressed_core(rows, None), compressed_trace0(rows)
        return dense_core(mode), dense_trace0

    def check(params, carry, inputs, acting):
        B = batch_size(carry)
        check_influence_size(influence_bytes(cell, params, B, diagonal=diagonal, acting=acting), max_influence_bytes,
                             "diagonal path" if diagonal else f"batch {B} x params x carry")
        if diagonal:
            check_on_example("rtrl(diagonal=True)", lambda p, x: check_unit_structure(cell, p, x), params, inputs)

    return online_estimator(cell, loss_fn, parts, stateful=stateful, check=check, split=split)
