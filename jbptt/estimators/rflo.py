"""RFLO, random-feedback local online learning (Murray 2019), for Elman cells.

For the leaky rate network ``h_t = (1 - a) h_{t-1} + a tanh(u_t)`` the eligibility trace keeps only the leak:
``p_t = (1 - a) p_{t-1} + a tanh'(u_t) [x_t, h_{t-1}, 1]`` (here: ``p_t = (1 - leak) p_{t-1} + M_t``, with ``M_t``
the immediate influence of the step), and the learning signal is the output error sent back through a fixed
random matrix ``B`` instead of the readout's transpose: ``L_t = B (dl_t/dy_t)``. The readout's own weights get
their exact immediate gradient. The foundation's :func:`jbptt.cells.elman` has no leak, so ``leak=1`` (the
default) matches it; with ``feedback="symmetric"`` the true ``dl/dh`` is used (then RFLO equals e-prop for Elman).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jbptt.cells import Cell
from jbptt.estimator import GradientEstimator, register_estimator
from jbptt.estimators.compressed import eligibility_estimator, hidden_readout
from jbptt.losses import LossFn

__all__ = ["rflo"]


@register_estimator("rflo")
def rflo(cell: Cell, loss_fn: LossFn, *, leak: float = 1.0, feedback: str = "random", feedback_seed: int = 0,
         readout=hidden_readout, stateful: bool = False, split: bool = True) -> GradientEstimator:
    """RFLO as a :class:`GradientEstimator`.

    Args:
      leak: ``a`` in ``(0, 1]``; the eligibility decays by ``1 - a`` per step.
      feedback: ``"random"`` (a fixed ``B [n, O]`` with entries ``N(0, 1/O)``, part of the model like a fixed
        weight, drawn from ``feedback_seed``) or ``"symmetric"`` (the exact ``dl/dh``).
      readout: ``readout(params, new_carry, x) -> y`` matching the step's output (checked by ``init``).
      stateful: carry and eligibility continue between segments (online learning).
      split: eligibility only for the parameters that act on the state; ``False``: rows for every trainable leaf
        (a readout with a multiple of ``n`` outputs then gets rows, always zero), as before.

    Returns:
      A :class:`GradientEstimator` with :class:`~jbptt.estimators.online.OnlineState` (eligibility ``[B, R, n]``);
      ``init(params, carry, *, key=None, inputs=...)`` needs an example segment ``inputs`` for its readout check.
    """
    if not 0.0 < leak <= 1.0:
        raise ValueError(f"rflo: leak must be in (0, 1], got {leak}")
    if feedback not in ("random", "symmetric"):
        raise ValueError(f"rflo: feedback must be 'random' or 'symmetric', got {feedback!r}")

    def block_for(rows):
        return lambda blocks, *_: (1.0 - leak) * jnp.broadcast_to(jnp.eye(rows.C, dtype=blocks.dtype), blocks.shape)

    def feedback_for(rows):
        n, O = rows.C * rows.N, cell.output_size
        matrix = jax.random.normal(jax.random.key(feedback_seed), (n, O)) / jnp.sqrt(O)
        matrix = jnp.where((jnp.arange(n) < rows.N)[:, None], matrix, 0.0)  # only the first component (h) reads out
        return lambda gy, gs: (matrix.astype(gy.dtype) @ gy.reshape(-1)).astype(gs.dtype)

    return eligibility_estimator("rflo", cell, loss_fn, block_for, readout=readout,
                                 feedback_for=feedback_for if feedback == "random" else None, stateful=stateful,
                                 split=split)
