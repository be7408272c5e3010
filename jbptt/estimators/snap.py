"""SnAp-n (Menick et al. 2020): the influence matrix restricted to the sparsity pattern of the n-step Jacobian.

``J_t = (D_t J_{t-1} + M_t) ⊙ pattern_n`` where ``M_t = ds_t/dtheta`` (immediate influence), ``D_t = ds_t/ds_{t-1}``
and ``pattern_n`` marks the entries of ``J`` that are non-zero after ``n`` steps: ``bool(sum_{k<n} |D|^k |M|)``
(plus ``|D|^k |J_0|`` for a learned initial carry).

- ``snap1``: stored compressed, one row per parameter row that drives unit ``j`` (``[R, n]``, memory O(P)), with
  ``D`` reduced to its per-unit blocks (``[N, C, C]``; LSTM keeps the ``(h, c)`` block of each unit). It equals
  exact RTRL on element-wise cells (diagonal linear / LRU, IndRNN). Needs a carry of ``C`` leaves of shape ``[N]``.
- ``snap2`` / ``snap`` with ``n``: stored as a masked dense ``[P, n]`` influence (same cost as dense RTRL; the
  pattern is what is being studied). ``init`` measures the pattern once, at random perturbations of the first step of
  its example ``inputs``, and keeps it in the state.
  For a fully dense Elman cell SnAp-2 is exact RTRL.

The gradient of step ``t`` contracts the loss cotangent of the carry entering the step with the sparse ``J_{t-1}``
(plus the exact immediate term), i.e. the last step before each loss is propagated exactly, as for every estimator
built on :func:`jbptt.estimators.compressed.compressed_core` without a ``readout``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jbptt.cells import Cell
from jbptt.estimator import GradientEstimator, register_estimator
from jbptt.estimators.compressed import compressed_core, compressed_trace0
from jbptt.estimators.online import (
    DEFAULT_MAX_INFLUENCE_BYTES,
    FlatStep,
    OnlineState,
    batch_size,
    check_influence_size,
    dense_core,
    dense_trace0,
    flat_step,
    influence_bytes,
    init_state,
    online_estimator,
    online_segment,
    step_jacobian_support,
    unit_rows,
)
from jbptt.losses import LossFn

__all__ = ["SnapState", "snap", "snap1", "snap2", "snap_pattern"]


def snap_pattern(fs: FlatStep, theta, x, n_steps: int, key):
    """The SnAp-n pattern ``[P, n]`` (booleans) measured at random perturbations of ``(theta, s, x)``.

    The entries of ``J`` that ``n`` steps can make non-zero, starting from the immediate influence ``M`` and from
    ``J_0 = d s_0 / d theta`` (a learned initial carry): ``bool(sum_{k<n} |D|^k (|M| + |J_0|))``. ``M`` and ``D``
    are unioned over several probe points (:func:`~jbptt.estimators.online.step_jacobian_support`), so a unit that
    is inactive at one point (ReLU) does not drop its entries from the pattern.

    Args:
      fs: the flat view of the cell; ``x``: one example's input; ``key``: PRNG key for the perturbation.
    """
    k1, k2 = jax.random.split(key)
    M, D = step_jacobian_support(fs, theta, x, k1)
    th = theta + 0.1 * jax.random.normal(k2, theta.shape, theta.dtype)
    a = ((M + jnp.abs(jax.jacfwd(fs.carry0)(th))) > 0).astype(theta.dtype)
    d = (D > 0).astype(theta.dtype)
    acc = a
    for _ in range(n_steps - 1):
        a = jnp.minimum(d @ a, 1.0)
        acc = acc + a
    return (acc > 0).T


class SnapState(NamedTuple):
    """State of :func:`snap`: an :class:`~jbptt.estimators.online.OnlineState` (``carry``, ``trace``, ``key``) plus
    the SnAp-n ``pattern`` ``[P, n]`` (booleans), measured once by ``init``."""

    carry: Any
    trace: Any
    key: jax.Array
    pattern: jax.Array


@register_estimator("snap")
def snap(cell: Cell, loss_fn: LossFn, *, n: int = 2, stateful: bool = False,
         max_influence_bytes: int | None = DEFAULT_MAX_INFLUENCE_BYTES) -> GradientEstimator:
    """SnAp-n with a masked dense influence ``[B, P, n]`` (see the module docstring).

    Args:
      n: the number of steps whose Jacobian sparsity the pattern keeps (``>= 1``).
      stateful: see :func:`~jbptt.estimators.rtrl.rtrl`.
      max_influence_bytes: the largest influence matrix (whole batch) ``init`` accepts; ``None`` for no limit.

    Returns:
      A :class:`GradientEstimator` with :class:`SnapState`. ``init(params, carry, *, key=None, inputs=...)`` needs
      ``inputs`` (an example of the segment inputs) to measure the pattern; ``update`` is safe under ``jit``.
    """
    if n < 1:
        raise ValueError(f"snap: n must be >= 1, got {n}")

    def masked(pattern):
        return lambda fs, th, k: jnp.where(pattern, dense_trace0(fs, th, k), 0.0)

    def init(params, carry, *, key=None, inputs=None):
        if inputs is None:
            raise ValueError(f"snap (n={n}): init needs inputs= (an example of the segment inputs, leaves [B, T, ...]) "
                             "to measure the SnAp pattern")
        B = batch_size(carry)
        check_influence_size(influence_bytes(cell, params, B), max_influence_bytes, f"SnAp-{n} masked dense, batch {B}")
        key = jax.random.key(0) if key is None else key
        fs = flat_step(cell, params)
        x0 = jax.tree.map(lambda a: a[0, 0], inputs)
        pattern = jax.jit(lambda th, x, k: snap_pattern(fs, th, x, n, k))(fs.theta, x0, jax.random.fold_in(key, 7))
        return SnapState(*init_state(cell, params, carry, masked(pattern), key), pattern)

    def update(params, state: SnapState, batch):
        online = OnlineState(state.carry, state.trace, state.key)
        loss, grads, online = online_segment(cell, loss_fn, params, online, batch,
                                             core=dense_core("jacobian", state.pattern),
                                             trace0=masked(state.pattern), stateful=stateful)
        return loss, grads, SnapState(*online, state.pattern)

    return GradientEstimator(init, update)


@register_estimator("snap2")
def snap2(cell: Cell, loss_fn: LossFn, **options) -> GradientEstimator:
    """SnAp-2: :func:`snap` with ``n=2``."""
    return snap(cell, loss_fn, n=2, **options)


@register_estimator("snap1")
def snap1(cell: Cell, loss_fn: LossFn, *, stateful: bool = False) -> GradientEstimator:
    """SnAp-1 with the compressed influence ``[B, R, n]`` (memory O(P) per example, independent of ``T``).

    Returns:
      A :class:`GradientEstimator` with :class:`~jbptt.estimators.online.OnlineState`; ``init`` raises unless the
      carry is ``C`` leaves of shape ``[N]``. ``update`` is safe under ``jit``.
    """

    def parts(params):
        rows = unit_rows(cell, params)
        return compressed_core(rows, lambda blocks, *_: blocks), compressed_trace0(rows)

    return online_estimator(cell, loss_fn, parts, stateful=stateful)
