"""UORO, unbiased online recurrent optimisation (Tallec & Ollivier 2017).

The influence ``J_t = ds_t/dtheta`` is replaced by a rank-one estimate ``s~_t theta~_t^T`` with
``E[s~ theta~^T] = J``: with a random sign vector ``nu`` (``E[nu nu^T] = I``) at every step::

    s~_t     = rho0 D_t s~_{t-1} + rho1 nu
    theta~_t = theta~_{t-1} / rho0 + (nu^T M_t) / rho1

where ``rho0 = sqrt(|theta~| / |D s~|)`` and ``rho1 = sqrt(|nu^T M| / |nu|)`` minimise the variance. One jvp
(``D s~``) and one vjp (``nu^T M`` together with the loss cotangents) per step: cost like a forward pass, memory
O(n + P) per example. A learned initial carry starts as ``s~_0 = nu_0``, ``theta~_0 = J_0^T nu_0`` (also unbiased).
With ``split=True`` (default) ``theta~`` covers only the ``Ps`` parameters that act on the state (the others' entries
would stay exactly zero); their gradient is the step's direct one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jbptt.cells import Cell
from jbptt.estimator import GradientEstimator, register_estimator
from jbptt.estimators.online import FlatStep, online_estimator
from jbptt.losses import LossFn

__all__ = ["uoro"]


def _signs(key, n, dtype):
    return jnp.where(jax.random.bernoulli(key, 0.5, (n,)), 1.0, -1.0).astype(dtype)


def uoro_trace0(fs: FlatStep, theta, key):
    """``(s~_0 [n], theta~_0 [Ps])``: a rank-one unbiased estimate of ``J_0 = d s_0 / d theta_s``."""
    nu = _signs(key, fs.n, theta.dtype)
    _, vjp = jax.vjp(lambda ths: fs.carry0_parts(ths, theta[fs.Ps:]), theta[:fs.Ps])
    return nu, vjp(nu)[0]


def uoro_core(eps: float):
    """Per-example UORO core (see the module docstring); ``eps`` keeps the scalings finite."""

    def core(fs: FlatStep, theta, s, trace, x, loss_grad, key):
        st, tt = trace
        f = lambda th, ss: fs.step(th, ss, x)
        (s_new, y), vjp = jax.vjp(f, theta, s)
        loss, gy = loss_grad(y)
        nu = _signs(key, fs.n, s.dtype)
        gth, gs = jax.vmap(vjp)((jnp.stack([jnp.zeros_like(s_new), nu]),
                                 jnp.stack([gy, jnp.zeros_like(gy)])))
        grad = gth[0] + jnp.pad(jnp.dot(gs[0], st) * tt, (0, fs.P - fs.Ps))
        d_st = jax.jvp(lambda ss: f(theta, ss)[0], (s,), (st,))[1]
        nu_m = gth[1][:fs.Ps]
        rho0 = jnp.sqrt(jnp.linalg.norm(tt) / (jnp.linalg.norm(d_st) + eps)) + eps
        rho1 = jnp.sqrt(jnp.linalg.norm(nu_m) / (jnp.linalg.norm(nu) + eps)) + eps
        return s_new, (rho0 * d_st + rho1 * nu, tt / rho0 + nu_m / rho1), loss, grad

    return core


@register_estimator("uoro")
def uoro(cell: Cell, loss_fn: LossFn, *, stateful: bool = False, eps: float = 1e-7,
         split: bool = True) -> GradientEstimator:
    """UORO as a :class:`GradientEstimator` for any cell.

    Args:
      stateful: carry and rank-one influence continue between segments (online learning); default False (every
        update starts from the initial carry, as for ``bptt``).
      eps: added to the variance-reduction scalings (as in the paper's reference code).
      split: ``theta~`` only over the parameters that act on the state (``init`` needs ``inputs=`` when
        ``stateful``); ``False``: over all trainable parameters, as before.

    Returns:
      A :class:`GradientEstimator` with :class:`~jbptt.estimators.online.OnlineState` (trace ``(s~ [B, n],
      theta~ [B, Ps])``). ``init(params, carry, *, key=None, inputs=None)``: ``key`` seeds the random signs; it is
      split every update, so successive estimates are independent.
    """
    return online_estimator(cell, loss_fn, lambda params, acting=None: (uoro_core(eps), uoro_trace0),
                            stateful=stateful, split=split)
