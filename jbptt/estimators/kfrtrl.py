"""KF-RTRL, Kronecker-factored RTRL (Mujika, Meier & Steger 2018), for Elman-type cells.

For ``h_t = f(a_t W)`` with ``a_t = [x_t, h_{t-1}, 1]`` the immediate influence factorises as ``a_t ⊗ diag(psi_t)``,
and the influence is estimated unbiasedly by one Kronecker product ``J_t ≈ u_t ⊗ A_t`` (``u: [R]`` over the
rows of the weight matrices, ``A: [n, N]`` over carry and units; ``J[i, (r, j)] = u_r A[i, j]``)::

    u_t = c1 rho1 u_{t-1} + c2 rho2 a_t,     A_t = c1 D_t A_{t-1} / rho1 + c2 diag(psi_t) / rho2

with independent random signs ``c1, c2`` and ``rho1 = sqrt(|D A| / |u|)``, ``rho2 = sqrt(|psi| / |a|)`` minimising
the variance. Memory O(n^2 + R) per example (RTRL: O(n^3)); time O(n^3) per step (``N`` jvps for ``D A``).

The factors are read off the compressed immediate influence ``m [R, N]`` (one jvp per row, see
:func:`~jbptt.estimators.online.unit_rows`), which must be rank one: true for :func:`~jbptt.cells.elman` (with
or without ``with_readout``). ``init`` checks it on an example input and refuses other cells (LSTM, GRU, IndRNN)
and a learned initial carry (the trace starts at ``J_0 = 0``) with a clear error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jbptt.cells import Cell
from jbptt.estimator import GradientEstimator, register_estimator
from jbptt.estimators.compressed import check_unit_rows, row_tangents, scatter_rows
from jbptt.estimators.online import (
    FlatStep,
    UnitRows,
    check_on_example,
    flat_step,
    online_estimator,
    unit_rows,
)
from jbptt.losses import LossFn

__all__ = ["check_rank_one", "kfrtrl"]


def _rank_one(m):
    """``m [R, N] = a ⊗ psi`` read off the row of largest norm (exact when ``m`` has rank one; zeros if ``R = 0``)."""
    if m.shape[0] == 0:  # no trainable parameter drives a unit (an ESN): the influence is empty
        return m[:, 0], jnp.zeros(m.shape[1:], m.dtype)
    r = jnp.argmax(jnp.sum(m * m, axis=1))
    psi = m[r]
    a = m @ psi / jnp.maximum(jnp.sum(psi * psi), jnp.finfo(m.dtype).tiny)
    return a, psi


def _immediate(fs: FlatStep, rows: UnitRows, theta, s, x):
    tangents = row_tangents(rows, fs.Ps, theta.dtype)
    step = lambda ths: fs.step_parts(ths, theta[fs.Ps:], s, x)[0]
    return jax.vmap(lambda t: jax.jvp(step, (theta[:fs.Ps],), (t,))[1])(tangents)


def kf_core(rows: UnitRows, eps: float):
    """Per-example KF-RTRL core over the trace ``(u [R], A [n, N])``."""

    def core(fs: FlatStep, theta, s, trace, x, loss_grad, key):
        u, A = trace
        f = lambda th, ss: fs.step(th, ss, x)
        (s_new, y), vjp = jax.vjp(f, theta, s)
        loss, gy = loss_grad(y)
        gth, gs = vjp((jnp.zeros_like(s_new), gy))
        grad = gth + scatter_rows(rows, u[:, None] * (gs @ A)[None, :], fs.P)
        a, psi = _rank_one(_immediate(fs, rows, theta, s, x))
        _, lin = jax.linearize(lambda ss: f(theta, ss)[0], s)
        DA = jax.vmap(lin, in_axes=1, out_axes=1)(A)
        c1, c2 = jnp.where(jax.random.bernoulli(key, 0.5, (2,)), 1.0, -1.0).astype(s.dtype)
        rho1 = jnp.sqrt((jnp.linalg.norm(DA) + eps) / (jnp.linalg.norm(u) + eps))
        rho2 = jnp.sqrt((jnp.linalg.norm(psi) + eps) / (jnp.linalg.norm(a) + eps))
        return s_new, (c1 * rho1 * u + c2 * rho2 * a, c1 * DA / rho1 + c2 * jnp.diag(psi) / rho2), loss, grad

    return core


def check_rank_one(cell: Cell, params, x, *, key=None, rtol: float = 1e-6):
    """Raises unless the compressed immediate influence of ``cell`` has rank one (an Elman-type cell) and the
    initial carry is fixed. ``x`` is one example's input; call it eagerly."""
    rows = unit_rows(cell, params)  # every trainable leaf: a readout's rows are zero, they do not change the rank
    if rows.C != 1:
        raise ValueError(f"kfrtrl needs a single-component carry (Elman); this cell has {rows.C} components")
    fs = flat_step(cell, params)
    if np.any(np.asarray(jax.jit(jax.jacrev(fs.carry0))(fs.theta)) != 0):
        raise ValueError("kfrtrl does not support a learned initial carry (its trace starts at J_0 = 0); use uoro")
    s = jax.random.normal(jax.random.key(0) if key is None else key, (fs.n,), fs.theta.dtype)
    sv = np.linalg.svd(np.asarray(jax.jit(lambda th, ss: _immediate(fs, rows, th, ss, x))(fs.theta, s)),
                       compute_uv=False)
    if sv.size > 1 and sv[1] > rtol * sv[0]:
        raise ValueError("kfrtrl needs an immediate influence that factorises as a ⊗ psi (an Elman cell "
                         f"h' = f([x, h, 1] W)); second singular value {sv[1]:.3g} vs first {sv[0]:.3g}. "
                         "Use uoro or snap1 for this cell")


@register_estimator("kfrtrl")
def kfrtrl(cell: Cell, loss_fn: LossFn, *, stateful: bool = False, eps: float = 1e-7,
           split: bool = True) -> GradientEstimator:
    """KF-RTRL as a :class:`GradientEstimator` (Elman-type cells; see the module docstring).

    Args:
      stateful: carry and Kronecker factors continue between segments (online learning).
      eps: keeps the variance-reduction scalings finite.
      split: rows ``u`` only for the parameters that act on the state; ``False``: for every trainable leaf whose
        last axis fits (a readout with a multiple of ``n`` outputs then gets rows, always zero), as before.

    Returns:
      A :class:`GradientEstimator` with :class:`~jbptt.estimators.online.OnlineState` (trace
      ``(u [B, R], A [B, n, N])``); ``init(params, carry, *, key=None, inputs=...)`` needs an example segment
      ``inputs`` for its rank-one check; ``key`` seeds the random signs.
    """

    def parts(params, acting=None):
        rows = unit_rows(cell, params, acting)

        def trace0(fs, theta, key):
            del key
            return jnp.zeros((rows.idx.shape[0],), theta.dtype), jnp.zeros((fs.n, rows.N), theta.dtype)

        return kf_core(rows, eps), trace0

    def check(params, carry, inputs, acting):
        check_on_example("kfrtrl", lambda p, x: check_rank_one(cell, p, x), params, inputs)
        check_on_example("kfrtrl", lambda p, x: check_unit_rows("kfrtrl", cell, p, x, acting), params, inputs)

    return online_estimator(cell, loss_fn, parts, stateful=stateful, check=check, split=split)
