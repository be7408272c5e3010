"""The fused Elman layer: ``h' = act(x W_x + h W_h + b)`` over a whole sequence, with a custom VJP that stores
only the carries.

The derivative of each activation is a function of its output (tanh: ``1 - y^2``, relu: ``y > 0``, identity: 1),
so a step's backward pass needs only its input and output carries: one stored carry per step ("alpha = 1" in the
terms of :mod:`jbptt.remat`) where JAX's own rule keeps three for tanh.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jbptt import cells
from jbptt.cells import Cell, get_activation
from jbptt.fused._common import col, float0_like, mask_ys, zero_where

ELMAN_ACTIVATIONS = ("tanh", "relu", "identity")


def _elman_act_grad(name, y):
    """``act'(z)`` written as a function of ``y = act(z)``."""
    if name == "tanh":
        return 1.0 - y * y
    if name == "relu":
        return (y > 0).astype(y.dtype)
    return jnp.ones((), y.dtype)


def elman_forward(act, w_x, w_h, b, readout, xs, h0, valid, reset, unroll):
    """The recurrence over ``xs [T, B, I]``: returns ``(h_T, hs, ys)`` with ``hs [T, B, H]`` the carry after each
    step and ``ys`` the (masked) outputs: ``hs`` itself, or with ``readout = (w_o, b_o)`` each step's
    ``h W_o + b_o`` computed inside the loop."""
    f = get_activation(act)

    def body(h, inp):
        x, v, r = inp
        h = zero_where(r, h)
        h_new = f(x @ w_x + h @ w_h + b)
        y = h_new
        if readout is not None:
            y = h_new @ readout[0] + readout[1]
        if v is not None:
            h_new, y = jnp.where(col(v), h_new, h), jnp.where(col(v), y, jnp.zeros((), y.dtype))
        return h_new, (h_new, y if readout is not None else None)

    hT, (hs, ys) = lax.scan(body, h0, (xs, valid, reset), unroll=unroll)
    return hT, hs, mask_ys(hs, valid) if readout is None else ys


@partial(jax.custom_vjp, nondiff_argnums=(0, 8))
def _elman_vjp(act, w_x, w_h, b, readout, xs, h0, masks, unroll):
    hT, _, ys = elman_forward(act, w_x, w_h, b, readout, xs, h0, *masks, unroll)
    return hT, ys


def _elman_vjp_fwd(act, w_x, w_h, b, readout, xs, h0, masks, unroll):
    hT, hs, ys = elman_forward(act, w_x, w_h, b, readout, xs, h0, *masks, unroll)
    return (hT, ys), (w_x, w_h, readout, xs, h0, hs, masks)


def _elman_vjp_bwd(act, unroll, res, cts):
    w_x, w_h, readout, xs, h0, hs, masks = res
    g_hT, g_ys = cts
    valid, reset = masks
    T = xs.shape[0]
    w_hT, w_xT = w_h.T, w_x.T
    w_oT = None if readout is None else readout[0].T

    def body(carry, inp):
        g_h, g_wx, g_wh, g_b, g_ro = carry
        t, x, g_y, v, r = inp
        h_out = lax.dynamic_index_in_dim(hs, t, keepdims=False)
        h_prev = jnp.where(t == 0, h0, lax.dynamic_index_in_dim(hs, jnp.maximum(t - 1, 0), keepdims=False))
        if v is not None:  # ys are zero at invalid steps: their cotangent does not flow back
            g_y = jnp.where(col(v), g_y, 0.0)
        if readout is not None:
            g_ro = (g_ro[0] + h_out.T @ g_y, g_ro[1] + jnp.sum(g_y, axis=0))
            g_y = g_y @ w_oT
        g = g_h + g_y
        if v is not None:
            g = jnp.where(col(v), g, 0.0)
        delta = g * _elman_act_grad(act, h_out)  # dL/dz at this step
        g_prev = delta @ w_hT
        if v is not None:
            g_prev = g_prev + jnp.where(col(v), 0.0, g_h)  # invalid steps pass the carry (and its gradient) on
        g_prev, h_in = zero_where(r, g_prev), zero_where(r, h_prev)
        carry = (g_prev, g_wx + x.T @ delta, g_wh + h_in.T @ delta, g_b + jnp.sum(delta, axis=0), g_ro)
        return carry, delta @ w_xT

    zeros = (jnp.zeros_like(w_x), jnp.zeros_like(w_h), jnp.zeros(w_h.shape[-1:], w_h.dtype),
             jax.tree.map(jnp.zeros_like, readout))
    (g_h0, g_wx, g_wh, g_b, g_ro), g_xs = lax.scan(body, (g_hT, *zeros), (jnp.arange(T), xs, g_ys, valid, reset),
                                                   reverse=True, unroll=unroll)
    return g_wx, g_wh, g_b, g_ro, g_xs, g_h0, float0_like(masks)


_elman_vjp.defvjp(_elman_vjp_fwd, _elman_vjp_bwd)


def elman_layer(params, xs, carry, valid=None, reset=None, *, activation: str = "tanh", readout=None,
                unroll: int = 1):
    """Runs the :func:`jbptt.cells.elman` recurrence over a whole time-major sequence, with a custom VJP that keeps
    only the carry sequence.

    The backward pass is a reverse scan that reads each step's input and output carries (``h_{t-1}``, ``h_t``)
    from the stored ``[T, B, H]`` carries, forms ``delta_t = dL/dz_t = g_t * act'(z_t)`` from ``h_t`` alone (tanh:
    ``1 - h_t^2``; relu: ``h_t > 0``; identity: ``1``), passes ``delta_t W_h^T`` back and accumulates the weight
    gradients: no matrix product of the forward pass is redone and nothing but the carries is stored (JAX's own
    rule keeps 3 carries per tanh step). This is what lets :mod:`jbptt.remat`'s segmented schedules keep
    ``T / k + k`` carries at ``2T`` evaluations. Reverse mode only (``jax.jvp`` of it raises).

    Args:
      params: ``{"w_x": [I, H], "w_h": [H, H], "b": [H]}``.
      xs: ``[T, B, I]`` inputs.
      carry: ``h: [B, H]``.
      valid: optional ``[T, B]`` booleans; at invalid steps the carry is left unchanged and ``ys`` is zero.
      reset: optional ``[T, B]`` booleans; the carry is zeroed before flagged steps.
      activation: ``"tanh"``, ``"relu"`` or ``"identity"``.
      readout: optional ``{"w": [H, O], "b": [O]}``: ``ys`` are then ``h_t W + b``, computed (and differentiated)
        inside the loops, so the backward pass never holds a ``[T, B, H]`` output cotangent
        (:func:`jbptt.cells.with_readout` of an Elman cell uses this in remat segments).
      unroll: ``lax.scan`` unroll factor.

    Returns:
      ``(h, ys)`` with ``h: [B, H]`` the final carry and ``ys: [T, B, H]`` (``[T, B, O]`` with a readout).
    """
    if activation not in ELMAN_ACTIVATIONS:
        raise ValueError(f"elman_layer: unknown activation {activation!r}; choose from {ELMAN_ACTIVATIONS}")
    ro = None if readout is None else (readout["w"], readout["b"])
    return _elman_vjp(activation, params["w_x"], params["w_h"], params["b"], ro, xs, carry, (valid, reset), unroll)




def elman(hidden: int, *, activation: str = "tanh", **options) -> Cell:
    """:func:`jbptt.cells.elman` with its fused fast path attached (same params, same ``step``).

    Reverse-mode-only unrolls (the BPTT estimator, remat segments under it) run :func:`elman_layer`, which stores
    one carry per step; other unrolls run the same loop under JAX's own autodiff (``jax.jvp`` works).
    ``options`` are :func:`jbptt.cells.elman`'s.
    """
    cell = cells.elman(hidden, activation=activation, **options)

    def fused(params, xs, carry, valid, reset, *, readout=None, reverse_mode_only=False):
        if reverse_mode_only:
            return elman_layer(params, xs, carry, valid, reset, activation=activation, readout=readout)
        ro = None if readout is None else (readout["w"], readout["b"])
        h, _, ys = elman_forward(activation, params["w_x"], params["w_h"], params["b"], ro, xs, carry, valid, reset, 1)
        return h, ys

    return cell._replace(fused=fused)
