"""The fused LSTM layer (gates ``[i, f, g, o]``; ``c' = sig(f) c + sig(i) tanh(g)``; ``h' = sig(o) tanh(c')``).

With u the tangent of the gate pre-activations z = x W_x + h W_h + b, one step's tangent is
  dc' = k_i u_i + k_f u_f + k_g u_g + f dc,   dh' = k_o u_o + q dc'
with k = [i'(z_i) g, f'(z_f) c, g'(z_g) i, o'(z_o) tanh(c')] and q = o (1 - tanh(c')^2). The forward scan emits
(k, f, q) per step, the only residuals either derivative rule needs: the tangent scan does one element-wise
product with k, and its transpose (the backward pass) is
  g_c' = g_c + q g_h,   g_u = k * [g_c', g_c', g_c', g_h],   g_c <- f g_c',   g_h <- g_u W_h^T.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jbptt import cells
from jbptt.cells import Cell
from jbptt.fused._common import (
    check_method,
    col,
    dense_masked,
    entering,
    float0_like,
    is_zero,
    mask_ys,
    mm,
    sum_terms,
    times_transposed,
    tmm,
    zero_where,
)


def _lstm_acts(z):
    """Gate activations of pre-activations ``z [..., 4H]``: sigmoid on i, f, o and tanh on g (one pass)."""
    H = z.shape[-1] // 4
    scale = jnp.concatenate([jnp.ones((2 * H,), z.dtype), jnp.full((H,), 2.0, z.dtype), jnp.ones((H,), z.dtype)])
    s = jax.nn.sigmoid(z * scale)
    return s * scale - (scale - 1.0)  # tanh(x) = 2 sigmoid(2x) - 1 on the g block


def _lstm_forward(w_x, w_h, b, xs, h0, c0, valid, reset, unroll, residuals: bool, hoist: bool):
    """The recurrence over ``xs [T, B, I]``.

    With ``hoist`` the input projection ``xs W_x + b`` of all steps is one product before the loop; without, each
    step does one product ``[x_t, h] [W_x; W_h]`` (on the CPU this avoids writing and re-reading the ``[T, B, 4H]``
    projections, which costs more than the larger per-step product saves; see docs/performance.md).

    Returns ``((hT, cT), hs)``, or ``((hT, cT), (hs, k, f, q))`` with the derivative residuals (see above) when
    ``residuals``; ``hs`` are the carries after every step ``[T, B, H]``.
    """
    if hoist:
        seq = mm(xs, w_x) + b
        pre = lambda z, h: z + h @ w_h
    else:
        seq, w_cat = xs, jnp.concatenate([w_x, w_h], axis=0)
        pre = lambda x, h: jnp.concatenate([x, h], axis=-1) @ w_cat + b

    def body(carry, inp):
        h, c = carry
        z, v, r = inp
        if r is not None:
            h = jnp.where(col(r), jnp.zeros((), h.dtype), h)
            c = jnp.where(col(r), jnp.zeros((), c.dtype), c)
        i, f, g, o = jnp.split(_lstm_acts(pre(z, h)), 4, axis=-1)
        c_new = f * c + i * g
        tc = jnp.tanh(c_new)
        h_new = o * tc
        if v is not None:
            h_new = jnp.where(col(v), h_new, h)
            c_new = jnp.where(col(v), c_new, c)
        if not residuals:
            return (h_new, c_new), h_new
        k = jnp.concatenate([i * (1.0 - i) * g, f * (1.0 - f) * c, (1.0 - g * g) * i, o * (1.0 - o) * tc], -1)
        return (h_new, c_new), (h_new, k, f, o * (1.0 - tc * tc))

    return lax.scan(body, (h0, c0), (seq, valid, reset), unroll=unroll)


def _lstm_hoist(params, xs, h0, c0, valid, reset, unroll, hoist=True):
    (h, c), hs = _lstm_forward(params["w_x"], params["w_h"], params["b"], xs, h0, c0, valid, reset, unroll,
                               residuals=False, hoist=hoist)
    return (h, c), mask_ys(hs, valid)



@partial(jax.custom_jvp, nondiff_argnums=(7,))
def _lstm_jvp(w_x, w_h, b, xs, h0, c0, masks, unroll):
    valid, reset = masks
    return _lstm_hoist({"w_x": w_x, "w_h": w_h, "b": b}, xs, h0, c0, valid, reset, unroll, hoist=False)


def _lstm_jvp_rule(unroll, primals, tangents):
    w_x, w_h, b, xs, h0, c0, masks = primals
    dw_x, dw_h, db, dxs, dh0, dc0, _ = tangents
    valid, reset = masks
    H = h0.shape[-1]
    (hT, cT), (hs, k, f, q) = _lstm_forward(w_x, w_h, b, xs, h0, c0, valid, reset, unroll, residuals=True,
                                            hoist=False)
    zx = jax.ShapeDtypeStruct((*xs.shape[:2], w_h.shape[-1]), w_h.dtype)
    # Tangents of the non-recurrent products: a few large products outside the loop.
    du = sum_terms([None if is_zero(dxs) else mm(dxs, w_x), None if is_zero(dw_x) else mm(xs, dw_x),
                     None if is_zero(db) else jnp.broadcast_to(db, zx.shape),
                     None if is_zero(dw_h) else mm(entering(hs, h0, reset), dw_h)], zx)
    dh = jnp.zeros_like(h0) if is_zero(dh0) else dh0
    dc = jnp.zeros_like(c0) if is_zero(dc0) else dc0
    w_hT = w_h.T  # the transposed loop multiplies by w_hT in its stored layout (see _times_transposed)

    def body(carry, inp):
        dh, dc = carry
        du, k, f, q, v, r = inp
        dh, dc = zero_where(r, dh), zero_where(r, dc)
        p = k * (du + times_transposed(dh, w_hT))
        dc_new = p[:, :H] + p[:, H:2 * H] + p[:, 2 * H:3 * H] + f * dc
        dh_new = p[:, 3 * H:] + q * dc_new
        if v is not None:
            dh_new = jnp.where(col(v), dh_new, dh)
            dc_new = jnp.where(col(v), dc_new, dc)
        return (dh_new, dc_new), dh_new

    (dhT, dcT), dhs = lax.scan(body, (dh, dc), (du, k, f, q, valid, reset), unroll=unroll)
    return ((hT, cT), mask_ys(hs, valid)), ((dhT, dcT), mask_ys(dhs, valid))


_lstm_jvp.defjvp(_lstm_jvp_rule, symbolic_zeros=True)


@partial(jax.custom_vjp, nondiff_argnums=(7,))
def _lstm_vjp(w_x, w_h, b, xs, h0, c0, masks, unroll):
    valid, reset = masks
    return _lstm_hoist({"w_x": w_x, "w_h": w_h, "b": b}, xs, h0, c0, valid, reset, unroll, hoist=False)


def _lstm_vjp_fwd(w_x, w_h, b, xs, h0, c0, masks, unroll):
    valid, reset = masks
    (hT, cT), (hs, k, f, q) = _lstm_forward(w_x, w_h, b, xs, h0, c0, valid, reset, unroll, residuals=True,
                                            hoist=False)
    return ((hT, cT), mask_ys(hs, valid)), (w_x, w_h, xs, h0, masks, hs, k, f, q)


def _lstm_vjp_bwd(unroll, res, cts):
    w_x, w_h, xs, h0, masks, hs, k, f, q = res
    (g_hT, g_cT), g_ys = cts
    valid, reset = masks
    w_hT = w_h.T

    def body(carry, inp):
        g_h, g_c = carry
        g_y, k, f, q, v, r = inp
        g_h = g_h + (g_y if v is None else jnp.where(col(v), g_y, 0.0))  # ys are zero at invalid steps
        g_hs, g_cs = (g_h, g_c) if v is None else (jnp.where(col(v), g_h, 0.0), jnp.where(col(v), g_c, 0.0))
        g_cn = g_cs + q * g_hs
        g_u = k * jnp.concatenate([g_cn, g_cn, g_cn, g_hs], axis=-1)
        g_h_prev, g_c_prev = g_u @ w_hT, f * g_cn
        if v is not None:
            g_h_prev = g_h_prev + jnp.where(col(v), 0.0, g_h)
            g_c_prev = g_c_prev + jnp.where(col(v), 0.0, g_c)
        return (zero_where(r, g_h_prev), zero_where(r, g_c_prev)), g_u

    (g_h0, g_c0), g_u = lax.scan(body, (g_hT, g_cT), (g_ys, k, f, q, valid, reset), reverse=True, unroll=unroll)
    return (tmm(xs, g_u), tmm(entering(hs, h0, reset), g_u), jnp.sum(g_u, axis=(0, 1)), mm(g_u, w_x.T),
            g_h0, g_c0, float0_like(masks))


_lstm_vjp.defvjp(_lstm_vjp_fwd, _lstm_vjp_bwd)


def lstm_layer(params, xs, carry, valid=None, reset=None, *, unroll: int = 1, method: str = "jvp"):
    """Runs the :func:`jbptt.cells.lstm` recurrence over a whole time-major sequence.

    Args:
      params: ``{"w_x": [I, 4H], "w_h": [H, 4H], "b": [4H]}`` (gate order ``[i, f, g, o]``).
      xs: ``[T, B, I]`` inputs.
      carry: ``(h, c)``, each ``[B, H]``.
      valid: optional ``[T, B]`` booleans; at invalid steps the carry is left unchanged and ``ys`` is zero.
      reset: optional ``[T, B]`` booleans; the carry is zeroed before flagged steps.
      unroll: ``lax.scan`` unroll factor.
      method: ``"hoist"``, ``"jvp"`` or ``"vjp"`` (see :mod:`jbptt.fused`).

    Returns:
      ``((h, c), ys)`` with ``ys: [T, B, H]``.
    """
    h0, c0 = carry
    if check_method(method) == "hoist":
        return _lstm_hoist(params, xs, h0, c0, valid, reset, unroll)
    fn = _lstm_jvp if method == "jvp" else _lstm_vjp
    return fn(params["w_x"], params["w_h"], params["b"], xs, h0, c0, (valid, reset), unroll)




def lstm(hidden: int, *, method: str = "auto", **options) -> Cell:
    """:func:`jbptt.cells.lstm` with its fused fast path attached (same params, same ``step``).

    Args:
      method: ``"auto"`` (the hand-written VJP for reverse-mode-only unrolls, the custom-JVP layer otherwise),
        or one of ``"hoist"``, ``"jvp"``, ``"vjp"`` for every unroll (see :mod:`jbptt.fused`).
      options: :func:`jbptt.cells.lstm`'s.
    """
    check_method(method)
    cell = cells.lstm(hidden, **options)

    def fused(params, xs, carry, valid, reset, *, readout=None, reverse_mode_only=False):
        m = ("vjp" if reverse_mode_only else "jvp") if method == "auto" else method
        carry, ys = lstm_layer(params, xs, carry, valid, reset, method=m)
        return carry, ys if readout is None else dense_masked(ys, readout, valid)

    return cell._replace(fused=fused)
