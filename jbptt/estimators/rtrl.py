"""Exact real-time recurrent learning (Williams & Zipser 1989) for any Cell, by forward-mode autodiff.

Every example carries the influence matrix ``J_t = d s_t / d theta`` (``s`` the raveled carry, ``theta`` the
trainable parameters), stored as ``[P, n]``. With ``(s_t, y_t) = step(theta, s_{t-1}, x_t)``::

    J_t = (ds_t/ds_{t-1}) J_{t-1} + ds_t/dtheta
    dL_t/dtheta = dL_t/dy_t (dy_t/dtheta + dy_t/ds_{t-1} J_{t-1})

so readout parameters inside :func:`~jbptt.cells.with_readout` and a learned initial carry
(``J_0 = d s_0 / d theta``) are handled uniformly. The gradient of each step is available at that step: nothing of
the past is stored, and memory does not grow with ``T``. Modes (measured against each other by the ``rtrl_jvp``
entries of ``configs/compare_small.yaml`` / ``compare_scaling.yaml``):

- ``"jvp"``: ``jax.linearize`` of the step, vmapped over the ``P`` directions ``(e_k, J[k])`` (one pass gives both
  ``J_t[k]`` and ``dy_t/dtheta_k``);
- ``"jacobian"`` (default; fastest in our measurements, e.g. 0.03 s vs 3.9 s per update and 10 MB vs 173 MB of
  XLA temp memory for an Elman cell with n=64, B=4, T=16 on CPU): ``n + 1`` vector-Jacobian products give
  ``ds_t/dtheta``, ``ds_t/ds_{t-1}`` and the loss cotangents, then one ``[P, n] x [n, n]`` product. The ``"jvp"``
  mode pushes a ``[P, P]`` identity of tangents through the step, which costs an extra factor of ``n``.
- ``diagonal=True``: the exact path for element-wise recurrences (diagonal linear / LRU, IndRNN): every parameter
  drives one unit, so the influence is stored compressed as ``[R, n]`` rows (``R = P / N``) and advanced by one
  jvp per row: cost O(P) per step for these cells and memory O(P), independent of ``T``.

Cost of the dense path for an Elman cell with ``n`` units: time O(n^4) and memory O(n^3) per example, so
``max_influence_bytes`` guards it with a clear error before anything is allocated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jbptt.cells import Cell
from jbptt.estimator import GradientEstimator, register_estimator
from jbptt.estimators.online import (
    FlatStep,
    OnlineState,
    compressed_core,
    compressed_trace0,
    flat_step,
    init_state,
    is_concrete,
    online_segment,
    unit_rows,
)
from jbptt.losses import LossFn

__all__ = ["check_unit_structure", "influence_bytes", "rtrl", "dense_core", "dense_trace0"]

DEFAULT_MAX_INFLUENCE_BYTES = 2 << 30


def influence_bytes(cell: Cell, params, batch_size: int, *, diagonal: bool = False) -> int:
    """Bytes of the influence matrix for ``batch_size`` examples: ``B * P * n * itemsize`` (dense) or
    ``B * R * n * itemsize`` (diagonal path). Computed from shapes only; nothing is allocated."""
    fs = jax.eval_shape(lambda p: flat_step(cell, p).theta, params)
    P, itemsize = int(fs.shape[0]), jnp.dtype(fs.dtype).itemsize
    n = int(sum(np.prod(jnp.shape(c)) for c in jax.tree_util.tree_leaves(
        jax.eval_shape(lambda p: cell.initial_carry(p, ()), params))))
    rows = unit_rows(cell, params).idx.shape[0] if diagonal else P
    return int(batch_size) * rows * n * itemsize


def check_influence_size(nbytes: int, limit: int | None, what: str):
    if limit is not None and nbytes > limit:
        raise ValueError(
            f"exact RTRL: the influence matrix ({what}) needs {nbytes:,} bytes ({nbytes / 2**30:.2f} GiB), above "
            f"max_influence_bytes={limit:,}. Use an approximation instead: estimator 'snap1' (sparse, "
            "O(params) memory), 'uoro' (rank one), 'eprop' or 'rflo'; or rtrl(diagonal=True) for element-wise "
            "cells; or a smaller batch; or raise max_influence_bytes.")


def dense_trace0(fs: FlatStep, theta, key):
    """``J_0 = d s_0 / d theta`` as ``[P, n]`` (zero unless the initial carry is learned)."""
    del key
    return jax.jacrev(fs.carry0)(theta).T


def dense_core(mode: str = "jacobian", mask=None):
    """Per-example core advancing the dense influence ``[P, n]`` (optionally restricted to a boolean ``mask``
    ``[P, n]``, which is SnAp-n). ``mode`` is ``"jvp"`` or ``"jacobian"`` (see the module docstring)."""
    if mode not in ("jvp", "jacobian"):
        raise ValueError(f"rtrl mode must be 'jvp' or 'jacobian', got {mode!r}")

    def apply_mask(J):
        return J if mask is None else jnp.where(mask, J, 0.0)

    def core(fs: FlatStep, theta, s, J, x, loss_grad, key):
        del key
        f = lambda th, ss: fs.step(th, ss, x)
        if mode == "jvp":
            (s_new, y), lin = jax.linearize(f, theta, s)
            J_new, dy = jax.vmap(lin)(jnp.eye(fs.P, dtype=theta.dtype), J)  # [P, n], [P, O]
            loss, gy = loss_grad(y)
            grad = dy.reshape(fs.P, -1) @ gy.reshape(-1)
        else:
            (s_new, y), vjp = jax.vjp(f, theta, s)
            loss, gy = loss_grad(y)
            eye = jnp.eye(fs.n, dtype=s.dtype)
            cts = (jnp.concatenate([eye, jnp.zeros((1, fs.n), s.dtype)]),
                   jnp.concatenate([jnp.zeros((fs.n,) + gy.shape, gy.dtype), gy[None]]))
            gth, gs = jax.vmap(vjp)(cts)  # [n+1, P], [n+1, n]: rows i < n are d s_new[i] / d(theta, s)
            J_new = J @ gs[:-1].T + gth[:-1].T
            grad = gth[-1] + J @ gs[-1]
        return s_new, apply_mask(J_new), loss, grad

    return core


def check_unit_structure(cell: Cell, params, x, *, key=None, atol: float = 0.0):
    """Checks on a random carry that ``cell`` is element-wise, as ``rtrl(diagonal=True)`` needs.

    Element-wise means: the carry Jacobian is block-diagonal per unit and every parameter drives only its own unit
    (:func:`~jbptt.estimators.online.unit_rows`). Args: ``x`` one example's input ``[I]``. Raises
    ``ValueError`` naming the
    violation; call it outside ``jit``.
    """
    rows = unit_rows(cell, params)
    fs = flat_step(cell, params)
    key = jax.random.key(0) if key is None else key
    s = jax.random.normal(key, (fs.n,), fs.theta.dtype)
    M, D = jax.jacfwd(lambda th, ss: fs.step(th, ss, x)[0], argnums=(0, 1))(fs.theta, s)
    C, N = rows.C, rows.N
    unit = np.arange(C * N) % N
    off = np.abs(np.asarray(D))[unit[:, None] != unit[None, :]]
    if off.size and off.max() > atol:
        raise ValueError("rtrl(diagonal=True) needs an element-wise recurrence, but the carry Jacobian couples "
                         f"different units (max |off-block entry| = {off.max():.3g}); use dense rtrl or snap1")
    allowed = np.zeros((C * N, fs.P), bool)
    for r in range(rows.idx.shape[0]):
        for j in range(N):
            allowed[unit == j, rows.idx[r, j]] = True
    bad = np.abs(np.asarray(M))[~allowed]
    if bad.size and bad.max() > atol:
        raise ValueError("rtrl(diagonal=True): some parameter drives a unit other than its own (max |entry| = "
                         f"{bad.max():.3g}); use dense rtrl or snap1")


@register_estimator("rtrl")
def rtrl(cell: Cell, loss_fn: LossFn, *, mode: str = "jacobian", diagonal: bool = False, stateful: bool = False,
         max_influence_bytes: int | None = DEFAULT_MAX_INFLUENCE_BYTES) -> GradientEstimator:
    """Exact RTRL as a :class:`GradientEstimator`.

    Args:
      cell: any cell (stacks, readouts and learned initial carries included).
      loss_fn: per-step loss ``loss_fn(y, target) -> [...]``.
      mode: ``"jacobian"`` or ``"jvp"`` (dense path; see the module docstring).
      diagonal: use the compressed exact path for element-wise cells (checked on the first eager ``update``).
      stateful: carry and influence continue from segment to segment: online learning with an optimizer update
        after every (short) segment. If False (default, as for ``bptt``) every update restarts from the initial
        carry, so independent batches of sequences are handled like BPTT does.
      max_influence_bytes: the largest influence matrix (whole batch) allowed; ``None`` for no limit.

    Returns:
      A :class:`GradientEstimator` with state :class:`~jbptt.estimators.online.OnlineState` (trace ``[B, P, n]`` or
      ``[B, R, n]``) whose ``update`` returns the exact gradient of the segment loss (from the state's carry and
      influence when ``stateful``). Safe under ``jit``.
    """
    if diagonal:
        rows_cache = {}

        def layout(params):
            key = jax.tree_util.tree_structure(params), tuple(jnp.shape(a) for a in jax.tree.leaves(params))
            if key not in rows_cache:
                rows_cache[key] = unit_rows(cell, params)
            return rows_cache[key]

        def parts(params):
            rows = layout(params)
            return compressed_core(rows, None), compressed_trace0(rows)
    else:
        def parts(params):
            del params
            return dense_core(mode), dense_trace0

    def check(params, B):
        check_influence_size(influence_bytes(cell, params, B, diagonal=diagonal), max_influence_bytes,
                    "diagonal path" if diagonal else f"batch {B} x params x carry")

    checked = []

    def init(params, carry, key=None):
        check(params, jax.tree_util.tree_leaves(carry)[0].shape[0])
        return init_state(cell, params, carry, parts(params)[1], key)

    def update(params, state: OnlineState, batch):
        B = jax.tree_util.tree_leaves(state.carry)[0].shape[0]
        check(params, B)
        x0 = jax.tree.map(lambda a: a[0, 0], batch.inputs)
        if diagonal and not checked and is_concrete((params, x0)):
            check_unit_structure(cell, params, x0)
            checked.append(True)
        core, trace0 = parts(params)
        return online_segment(cell, loss_fn, params, state, batch, core=core, trace0=trace0, stateful=stateful)

    return GradientEstimator(init, update)
