"""SnAp-n (Menick et al. 2020): the influence matrix restricted to the sparsity pattern of the n-step Jacobian.

``J_t = (D_t J_{t-1} + M_t) ⊙ pattern_n`` where ``M_t = ds_t/dtheta`` (immediate influence), ``D_t = ds_t/ds_{t-1}``
and ``pattern_n`` marks the entries of ``J`` that are non-zero after ``n`` steps: ``bool(sum_{k<n} |D|^k |M|)``
(plus ``|D|^k |J_0|`` for a learned initial carry).

- ``snap1``: stored compressed, one row per parameter row that drives unit ``j`` (``[R, n]``, memory O(P)), with
  ``D`` reduced to its per-unit blocks (``[N, C, C]``; LSTM keeps the ``(h, c)`` block of each unit). It equals
  exact RTRL on element-wise cells (diagonal linear / LRU, IndRNN). Needs a carry of ``C`` leaves of shape ``[N]``.
- ``snap2`` / ``snap`` with ``n``: stored sparse, only on the pattern (:mod:`.snap_sparse`): ``[G, R, K]`` values
  for the parameters that act on the carry, in ``G`` groups (of at most ``R``) sharing the ``K`` carry entries they
  can reach in ``n`` steps; a step costs O(G R K^2) plus ``n`` jvps for ``D`` and one jvp per parameter colour for
  ``M``. ``init`` measures the pattern once, at random perturbations of the first step of its example ``inputs``,
  and keeps the layout in the state. Parameters that do not act on the carry (a readout) get their exact immediate
  gradient only. For a fully dense Elman cell SnAp-2 is exact RTRL (``K = n``); on a sparse recurrent cell
  (:func:`jbptt.cells.sparse_elman`) ``K`` is about ``1 +`` the out-degree of a unit, so SnAp-2 costs a fraction
  of exact RTRL.

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
from jbptt.estimators.compressed import check_unit_rows, compressed_core, compressed_trace0
from jbptt.estimators.online import (
    DEFAULT_MAX_INFLUENCE_BYTES,
    FlatStep,
    OnlineState,
    batch_size,
    check_influence_size,
    check_on_example,
    flat_step,
    init_state,
    online_estimator,
    online_segment,
    unit_rows,
)
from jbptt.estimators.snap_sparse import SparseLayout, snap_supports, sparse_core, sparse_layout, sparse_trace0
from jbptt.losses import LossFn

__all__ = ["SnapState", "measure_layout", "snap", "snap1", "snap2", "snap_pattern"]


def snap_pattern(fs: FlatStep, theta, x, n_steps: int, key):
    """The SnAp-n pattern ``[P, n]`` (booleans) measured at random perturbations of ``(theta, s, x)``.

    The entries of ``J`` that ``n`` steps can make non-zero, starting from the immediate influence ``M`` and from
    ``J_0 = d s_0 / d theta`` (a learned initial carry): ``bool(sum_{k<n} |D|^k (|M| + |J_0|))``; see
    :func:`~jbptt.estimators.snap_sparse.snap_supports`.

    Args:
      fs: the flat view of the cell; ``x``: one example's input; ``key``: PRNG key for the perturbation.
    """
    return snap_supports(fs, theta, x, n_steps, key)[0]


def measure_layout(cell: Cell, params, inputs, n_steps: int, key) -> SparseLayout:
    """The :class:`~jbptt.estimators.snap_sparse.SparseLayout` of SnAp-n, measured on the host.

    At ``params`` and the first step of one example of ``inputs`` when they are concrete (an eager ``init``).
    Under ``jit`` / ``eval_shape`` the layout's sizes cannot depend on traced values, so the structural pattern is
    measured at a generic point instead: params and float inputs drawn at random (integer inputs: zeros), and
    so is the probe key when it is traced.
    """
    x0 = jax.tree.map(lambda a: a[0, 0], inputs)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves((params, x0, key))):
        leaves, treedef = jax.tree_util.tree_flatten((params, x0))
        with jax.ensure_compile_time_eval():  # concrete: evaluated now, also inside a trace
            keys = jax.random.split(jax.random.key(11), len(leaves) + 1)
            generic = lambda a, k: (jax.random.normal(k, jnp.shape(a), a.dtype)
                                    if jnp.issubdtype(a.dtype, jnp.floating) else jnp.zeros(jnp.shape(a), a.dtype))
            params, x0 = jax.tree_util.tree_unflatten(treedef, [generic(a, k) for a, k in zip(leaves, keys[1:],
                                                                                              strict=True)])
            key = keys[0]
    with jax.ensure_compile_time_eval():
        fs = flat_step(cell, params)
    # a compiled program called on concrete arrays runs now, also inside an outer trace (a jit call there would be
    # traced into it; evaluating the probes eagerly would fold their [P, P] tangent bases into constants)
    supports = jax.jit(lambda th, x, k: snap_supports(fs, th, x, n_steps, k))
    sup = supports.lower(fs.theta, x0, key).compile()(fs.theta, x0, key)
    return sparse_layout(*jax.device_get(sup))


class SnapState(NamedTuple):
    """State of :func:`snap`: an :class:`~jbptt.estimators.online.OnlineState` (``carry``, ``trace``, ``key``) plus
    the SnAp-n ``pattern``, a :class:`~jbptt.estimators.snap_sparse.SparseLayout` measured once by ``init``; the
    trace is the stored-sparse influence ``[B, G, R, K]``."""

    carry: Any
    trace: Any
    key: jax.Array
    pattern: SparseLayout


@register_estimator("snap")
def snap(cell: Cell, loss_fn: LossFn, *, n: int = 2, stateful: bool = False,
         max_influence_bytes: int | None = DEFAULT_MAX_INFLUENCE_BYTES) -> GradientEstimator:
    """SnAp-n with the influence stored on its pattern, ``[B, G, R, K]`` (see the module docstring).

    Args:
      n: the number of steps whose Jacobian sparsity the pattern keeps (``>= 1``).
      stateful: see :func:`~jbptt.estimators.rtrl.rtrl`.
      max_influence_bytes: the largest stored influence (whole batch) ``init`` accepts; ``None`` for no limit.

    Returns:
      A :class:`GradientEstimator` with :class:`SnapState`. ``init(params, carry, *, key=None, inputs=...)`` needs
      ``inputs`` (an example of the segment inputs) to measure the pattern; ``update`` is safe under ``jit``.
    """
    if n < 1:
        raise ValueError(f"snap: n must be >= 1, got {n}")

    def init(params, carry, *, key=None, inputs=None):
        if inputs is None:
            raise ValueError(f"snap (n={n}): init needs inputs= (an example of the segment inputs, leaves [B, T, ...]) "
                             "to measure the SnAp pattern")
        B = batch_size(carry)
        key = jax.random.key(0) if key is None else key
        layout = measure_layout(cell, params, inputs, n, jax.random.fold_in(key, 7))
        (G, R), K = layout.rows.shape, layout.units.shape[1]
        nbytes = B * G * R * K * jnp.dtype(jax.eval_shape(lambda p: flat_step(cell, p).theta, params).dtype).itemsize
        check_influence_size(nbytes, max_influence_bytes, f"SnAp-{n} stored sparse, batch {B} x {G} x {R} x {K}")
        return SnapState(*init_state(cell, params, carry, sparse_trace0(layout), key), layout)

    def update(params, state: SnapState, batch):
        online = OnlineState(state.carry, state.trace, state.key)
        loss, grads, online = online_segment(cell, loss_fn, params, online, batch, core=sparse_core(state.pattern),
                                             trace0=sparse_trace0(state.pattern), stateful=stateful)
        return loss, grads, SnapState(*online, state.pattern)

    return GradientEstimator(init, update)


@register_estimator("snap2")
def snap2(cell: Cell, loss_fn: LossFn, *, stateful: bool = False,
          max_influence_bytes: int | None = DEFAULT_MAX_INFLUENCE_BYTES) -> GradientEstimator:
    """SnAp-2: :func:`snap` with ``n=2``."""
    return snap(cell, loss_fn, n=2, stateful=stateful, max_influence_bytes=max_influence_bytes)


@register_estimator("snap1")
def snap1(cell: Cell, loss_fn: LossFn, *, stateful: bool = False, split: bool = True) -> GradientEstimator:
    """SnAp-1 with the compressed influence ``[B, R, n]`` (memory O(P) per example, independent of ``T``).

    Args:
      stateful: see :func:`~jbptt.estimators.rtrl.rtrl`.
      split: influence only for the parameters that act on the state (see
        :func:`~jbptt.estimators.online.online_estimator`); ``False``: every trainable leaf on the unit layout.

    Returns:
      A :class:`GradientEstimator` with :class:`~jbptt.estimators.online.OnlineState`; ``init`` raises unless the
      carry is ``C`` leaves of shape ``[N]`` and every parameter on the unit layout drives its own unit (checked on
      ``inputs`` when given: a sparse cell's flat recurrent values are not unit-wise, use ``snap`` with ``n=1``).
      ``update`` is safe under ``jit``.
    """

    def parts(params, acting=None):
        rows = unit_rows(cell, params, acting)
        return compressed_core(rows, lambda blocks, *_: blocks), compressed_trace0(rows)

    def check(params, carry, inputs, acting):
        check_on_example("snap1", lambda p, x: check_unit_rows("snap1", cell, p, x, acting), params, inputs)

    return online_estimator(cell, loss_fn, parts, stateful=stateful, check=check, split=split)
