"""The fused GRU layer (cuDNN form): ``r, z = sig(x W_x + b_x + h W_h + b_h)`` blocks;
``n = tanh(xn + r * hn)``; ``h' = (1 - z) n + z h``.

With s = [s_r, s_z, s_hn] the tangents of the r and z pre-activations and of hn = h W_hn + b_hn, and s_xn that of
x W_xn + b_xn, one step's tangent is
  dh' = k_r s_r + k_z s_z + k_hn s_hn + m s_xn + z dh
with m = (1 - z)(1 - n^2) and k = [m hn r'(.), z'(.)(h - n), m r]. The forward scan emits (k, z, m) per step.
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


def _gru_forward(w_x, w_h, b_x, b_h, xs, h0, valid, reset, unroll, residuals: bool, hoist: bool):
    """The recurrence over ``xs [T, B, I]``; ``hoist`` as in :func:`_lstm_forward` (without it each step does
    the two products ``x_t W_x`` and ``h W_h``).

    Returns ``(hT, hs)``, or ``(hT, (hs, k, z, m))`` with the derivative residuals (see above) when ``residuals``.
    """
    seq = mm(xs, w_x) + b_x if hoist else xs

    def body(h, inp):
        x_t, v, r_mask = inp
        h = zero_where(r_mask, h)
        zx_t = x_t if hoist else x_t @ w_x + b_x
        zh = h @ w_h + b_h
        xr, xz, xn = jnp.split(zx_t, 3, axis=-1)
        hr, hz, hn = jnp.split(zh, 3, axis=-1)
        r, z = jnp.split(jax.nn.sigmoid(jnp.concatenate([xr + hr, xz + hz], axis=-1)), 2, axis=-1)
        n = jnp.tanh(xn + r * hn)
        h_new = (1.0 - z) * n + z * h
        if v is not None:
            h_new = jnp.where(col(v), h_new, h)
        if not residuals:
            return h_new, h_new
        m = (1.0 - z) * (1.0 - n * n)
        k = jnp.concatenate([m * hn * r * (1.0 - r), z * (1.0 - z) * (h - n), m * r], axis=-1)
        return h_new, (h_new, k, z, m)

    return lax.scan(body, h0, (seq, valid, reset), unroll=unroll)


def _gru_hoist(params, xs, h0, valid, reset, unroll, hoist=True):
    h, hs = _gru_forward(params["w_x"], params["w_h"], params["b_x"], params["b_h"], xs, h0, valid, reset, unroll,
                         residuals=False, hoist=hoist)
    return h, mask_ys(hs, valid)


@partial(jax.custom_jvp, nondiff_argnums=(7,))
def _gru_jvp(w_x, w_h, b_x, b_h, xs, h0, masks, unroll):
    valid, reset = masks
    return _gru_hoist({"w_x": w_x, "w_h": w_h, "b_x": b_x, "b_h": b_h}, xs, h0, valid, reset, unroll, hoist=False)


def _gru_jvp_rule(unroll, primals, tangents):
    w_x, w_h, b_x, b_h, xs, h0, masks = primals
    dw_x, dw_h, db_x, db_h, dxs, dh0, _ = tangents
    valid, reset = masks
    H = h0.shape[-1]
    hT, (hs, k, z, m) = _gru_forward(w_x, w_h, b_x, b_h, xs, h0, valid, reset, unroll, residuals=True, hoist=False)
    zx = jax.ShapeDtypeStruct((*xs.shape[:2], w_h.shape[-1]), w_h.dtype)
    dzx = sum_terms([None if is_zero(dxs) else mm(dxs, w_x), None if is_zero(dw_x) else mm(xs, dw_x),
                      None if is_zero(db_x) else jnp.broadcast_to(db_x, zx.shape)], zx)
    dzh = sum_terms([None if is_zero(dw_h) else mm(entering(hs, h0, reset), dw_h),
                      None if is_zero(db_h) else jnp.broadcast_to(db_h, zx.shape)], zx)
    ds = jnp.concatenate([dzx[..., :2 * H] + dzh[..., :2 * H], dzh[..., 2 * H:]], axis=-1)
    e = m * dzx[..., 2 * H:]  # the non-recurrent term m s_xn, one element-wise pass
    dh = jnp.zeros_like(h0) if is_zero(dh0) else dh0
    w_hT = w_h.T

    def body(dh, inp):
        ds, e, k, z, v, r_mask = inp
        dh = zero_where(r_mask, dh)
        p = k * (ds + times_transposed(dh, w_hT))
        dh_new = p[:, :H] + p[:, H:2 * H] + p[:, 2 * H:] + e + z * dh
        if v is not None:
            dh_new = jnp.where(col(v), dh_new, dh)
        return dh_new, dh_new

    dhT, dhs = lax.scan(body, dh, (ds, e, k, z, valid, reset), unroll=unroll)
    return (hT, mask_ys(hs, valid)), (dhT, mask_ys(dhs, valid))


_gru_jvp.defjvp(_gru_jvp_rule, symbolic_zeros=True)


@partial(jax.custom_vjp, nondiff_argnums=(7,))
def _gru_vjp(w_x, w_h, b_x, b_h, xs, h0, masks, unroll):
    valid, reset = masks
    return _gru_hoist({"w_x": w_x, "w_h": w_h, "b_x": b_x, "b_h": b_h}, xs, h0, valid, reset, unroll, hoist=False)


def _gru_vjp_fwd(w_x, w_h, b_x, b_h, xs, h0, masks, unroll):
    valid, reset = masks
    hT, (hs, k, z, m) = _gru_forward(w_x, w_h, b_x, b_h, xs, h0, valid, reset, unroll, residuals=True, hoist=False)
    return (hT, mask_ys(hs, valid)), (w_x, w_h, xs, h0, masks, hs, k, z, m)


def _gru_vjp_bwd(unroll, res, cts):
    w_x, w_h, xs, h0, masks, hs, k, z, m = res
    g_hT, g_ys = cts
    valid, reset = masks
    H = h0.shape[-1]
    w_hT = w_h.T

    def body(g_h, inp):
        g_y, k, z, m, v, r_mask = inp
        g_h = g_h + (g_y if v is None else jnp.where(col(v), g_y, 0.0))
        g_hs = g_h if v is None else jnp.where(col(v), g_h, 0.0)
        g_s = k * jnp.concatenate([g_hs, g_hs, g_hs], axis=-1)
        g_h_prev = g_s @ w_hT + z * g_hs
        if v is not None:
            g_h_prev = g_h_prev + jnp.where(col(v), 0.0, g_h)
        return zero_where(r_mask, g_h_prev), (g_s, m * g_hs)

    g_h0, (g_s, g_xn) = lax.scan(body, g_hT, (g_ys, k, z, m, valid, reset), reverse=True, unroll=unroll)
    g_zx = jnp.concatenate([g_s[..., :2 * H], g_xn], axis=-1)
    return (tmm(xs, g_zx), tmm(entering(hs, h0, reset), g_s), jnp.sum(g_zx, axis=(0, 1)),
            jnp.sum(g_s, axis=(0, 1)), mm(g_zx, w_x.T), g_h0, float0_like(masks))


_gru_vjp.defvjp(_gru_vjp_fwd, _gru_vjp_bwd)


def gru_layer(params, xs, carry, valid=None, reset=None, *, unroll: int = 1, method: str = "jvp"):
    """Runs the :func:`jbptt.cells.gru` recurrence over a whole time-major sequence.

    Args:
      params: ``{"w_x": [I, 3H], "w_h": [H, 3H], "b_x": [3H], "b_h": [3H]}`` (gate order ``[r, z, n]``).
      xs: ``[T, B, I]`` inputs.
      carry: ``h: [B, H]``.
      valid, reset, unroll, method: as in :func:`lstm_layer`.

    Returns:
      ``(h, ys)`` with ``ys: [T, B, H]``.
    """
    if check_method(method) == "hoist":
        return _gru_hoist(params, xs, carry, valid, reset, unroll)
    fn = _gru_jvp if method == "jvp" else _gru_vjp
    return fn(params["w_x"], params["w_h"], params["b_x"], params["b_h"], xs, carry, (valid, reset), unroll)


def gru(hidden: int, *, method: str = "auto", **options) -> Cell:
    """:func:`jbptt.cells.gru` with its fused fast path attached (same params, same ``step``).

    Args:
      method: ``"auto"`` (the custom-JVP layer for every unroll) or one of ``"hoist"``, ``"jvp"``, ``"vjp"``.
      options: :func:`jbptt.cells.gru`'s.
    """
    check_method(method)
    cell = cells.gru(hidden, **options)

    def fused(params, xs, carry, valid, reset, *, readout=None, reverse_mode_only=False):
        del reverse_mode_only  # the custom-JVP layer serves both modes (its transpose is the fused backward)
        carry, ys = gru_layer(params, xs, carry, valid, reset, method="jvp" if method == "auto" else method)
        return carry, ys if readout is None else dense_masked(ys, readout, valid)

    return cell._replace(fused=fused)
