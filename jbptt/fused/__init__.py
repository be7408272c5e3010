"""Fused, layer-level LSTM and GRU unrolls: the fast path behind :func:`jbptt.unroll.unroll`.

A per-step cell unrolled by ``lax.scan`` does every matrix product one time step at a time, and its autodiff
backward pass carries the full per-step Jacobian structure. The layer functions here run a whole ``[T, B, I]``
sequence at once:

``"hoist"``
    The input projection ``xs W_x + b`` of all time steps is one ``[T*B, I] x [I, G]`` product outside the
    recurrence; the scan does only ``h W_h``. Differentiated by plain autodiff.
``"jvp"`` (the default)
    A ``jax.custom_jvp`` rule whose tangent recurrence carries only ``(dh, dc)``: the tangents of the input and
    weight products are precomputed as large products, and everything inside the tangent scan is an element-wise
    product with a residual saved by the forward loop, plus one ``[B, H] x [H, G]`` product. Reverse mode
    transposes this linear recurrence into the fused backward pass of cuDNN-style RNN libraries: a backward scan
    that carries ``dL/dh`` (and ``dL/dc``), emits the per-step gate gradients, after which ``dW_x``, ``dW_h``, the
    biases and ``dL/dxs`` are each one large product. Forward mode (``jax.jvp``) and higher derivatives work.
    The forward loop does one ``[x_t, h] [W_x; W_h]`` product per step (LSTM; the GRU does ``x_t W_x`` and
    ``h W_h``) instead of hoisting the input projection: on the CPU, writing and re-reading the ``[T, B, G]``
    projections costs more than it saves (``experiments/PERFORMANCE.md``).
``"vjp"``
    The same backward pass written out by hand as a ``jax.custom_vjp`` (reverse mode only: ``jax.jvp`` of it
    raises).

Every method computes exactly the plain :func:`jbptt.cells.lstm` / :func:`jbptt.cells.gru` recurrence, with
``valid`` (sequence lengths) and ``reset`` (episode boundaries, carry re-initialised to zeros before the flagged
step) masks. Layer functions are time-major: ``xs: [T, B, I]``; they return ``(carry, ys)`` with ``ys: [T, B, H]``,
zero at steps where ``valid`` is False. Safe under ``jit``, ``grad`` and ``vmap`` (and ``jvp`` except ``"vjp"``).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

METHODS = ("hoist", "jvp", "vjp")


def auto_unroll(T: int, B: int, H: int) -> int:
    """The ``lax.scan`` unroll factor the fused layers use when the caller does not ask for one.

    Measured with ``experiments/bench_throughput.py`` (see ``experiments/PERFORMANCE.md``): on the CPU, unrolling
    the fused loops did not pay at any grid shape (the loop bodies are already a few large fusions and one
    product; unrolling only grows the program), so this returns 1.
    """
    del T, B, H
    return 1


def check_method(method: str) -> str:
    """Returns ``method`` if it is one of :data:`METHODS`, else raises one clear error."""
    if method not in METHODS:
        raise ValueError(f"unknown fused method {method!r}; choose from {METHODS}")
    return method


# ----------------------------------------------------------------------------------------------------------------
# Helpers shared by both cells.


def _col(mask):
    """``[B]`` booleans -> ``[B, 1]`` for broadcasting against ``[B, H]``."""
    return mask[:, None]


def _entering(outs, init, reset):
    """The carry entering every step: ``[init, outs[:-1]]`` (``[T, B, H]``), zeroed where ``reset``."""
    prev = jnp.concatenate([init[None], outs[:-1]], axis=0)
    return prev if reset is None else jnp.where(reset[..., None], jnp.zeros((), prev.dtype), prev)


def _mask_ys(hs, valid):
    return hs if valid is None else jnp.where(valid[..., None], hs, jnp.zeros((), hs.dtype))


def _mm(a, w):
    """``a [..., K] @ w [K, N]`` as one 2-D product over the flattened leading axes."""
    return jnp.reshape(jnp.reshape(a, (-1, a.shape[-1])) @ w, (*a.shape[:-1], w.shape[-1]))


def dense(a, w, b):
    """``a [..., K] @ w [K, N] + b [N]`` as one 2-D product over the flattened leading axes."""
    return _mm(a, w) + b


def _tmm(a, b):
    """``sum_{t,b} a[t, b, :, None] * b[t, b, None, :]``: ``a [..., K]``, ``b [..., N]`` -> ``[K, N]``."""
    return jnp.reshape(a, (-1, a.shape[-1])).T @ jnp.reshape(b, (-1, b.shape[-1]))


def _times_transposed(a, w_t):
    """``a @ w_t.T`` written so that its transpose (reverse mode) is ``g @ w_t``: a product with the matrix in its
    stored row-major layout, which the CPU backend runs faster than one that contracts over its last axis."""
    return lax.dot_general(a, w_t, (((a.ndim - 1,), (1,)), ((), ())))


def _is_zero(t):
    return isinstance(t, SymbolicZero)


def _zero_where(mask, a):
    return a if mask is None else jnp.where(_col(mask), jnp.zeros((), a.dtype), a)


def _float0_like(masks):
    return jax.tree.map(lambda m: jnp.zeros(m.shape, jax.dtypes.float0), masks)


def _scan_inputs(*arrays):
    """Scan ``xs``: ``None`` entries (absent masks) stay ``None``."""
    return tuple(arrays)


# ----------------------------------------------------------------------------------------------------------------
# Elman: h' = act(x W_x + h W_h + b). The derivative of each activation is a function of its output (tanh: 1 - y^2,
# relu: y > 0, identity: 1), so a step's backward needs only its input and output carries: the layer's custom VJP
# keeps the carry sequence and nothing else (one carry per step, "alpha = 1" in the terms of jbptt.remat).

ELMAN_ACTIVATIONS = ("tanh", "relu", "identity")

_ELMAN_ACT = {"tanh": jnp.tanh, "relu": jax.nn.relu, "identity": lambda z: z}


def _elman_act_grad(name, y):
    """``act'(z)`` written as a function of ``y = act(z)``."""
    if name == "tanh":
        return 1.0 - y * y
    if name == "relu":
        return (y > 0).astype(y.dtype)
    return jnp.ones((), y.dtype)


def _elman_forward(act, w_x, w_h, b, readout, xs, h0, valid, reset, unroll):
    """The recurrence over ``xs [T, B, I]``: returns ``(h_T, hs, ys)`` with ``hs [T, B, H]`` the carry after each
    step and ``ys`` the (masked) outputs: ``hs`` itself, or with ``readout = (w_o, b_o)`` each step's
    ``h W_o + b_o`` computed inside the loop."""
    f = _ELMAN_ACT[act]

    def body(h, inp):
        x, v, r = inp
        h = _zero_where(r, h)
        h_new = f(x @ w_x + h @ w_h + b)
        y = h_new
        if readout is not None:
            y = h_new @ readout[0] + readout[1]
        if v is not None:
            h_new, y = jnp.where(_col(v), h_new, h), jnp.where(_col(v), y, jnp.zeros((), y.dtype))
        return h_new, (h_new, y if readout is not None else None)

    hT, (hs, ys) = lax.scan(body, h0, (xs, valid, reset), unroll=unroll)
    return hT, hs, _mask_ys(hs, valid) if readout is None else ys


@partial(jax.custom_vjp, nondiff_argnums=(0, 8))
def _elman_vjp(act, w_x, w_h, b, readout, xs, h0, masks, unroll):
    hT, _, ys = _elman_forward(act, w_x, w_h, b, readout, xs, h0, *masks, unroll)
    return hT, ys


def _elman_vjp_fwd(act, w_x, w_h, b, readout, xs, h0, masks, unroll):
    hT, hs, ys = _elman_forward(act, w_x, w_h, b, readout, xs, h0, *masks, unroll)
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
            g_y = jnp.where(_col(v), g_y, 0.0)
        if readout is not None:
            g_ro = (g_ro[0] + h_out.T @ g_y, g_ro[1] + jnp.sum(g_y, axis=0))
            g_y = g_y @ w_oT
        g = g_h + g_y
        if v is not None:
            g = jnp.where(_col(v), g, 0.0)
        delta = g * _elman_act_grad(act, h_out)  # dL/dz at this step
        g_prev = delta @ w_hT
        if v is not None:
            g_prev = g_prev + jnp.where(_col(v), 0.0, g_h)  # invalid steps pass the carry (and its gradient) on
        g_prev, h_in = _zero_where(r, g_prev), _zero_where(r, h_prev)
        carry = (g_prev, g_wx + x.T @ delta, g_wh + h_in.T @ delta, g_b + jnp.sum(delta, axis=0), g_ro)
        return carry, delta @ w_xT

    zeros = (jnp.zeros_like(w_x), jnp.zeros_like(w_h), jnp.zeros(w_h.shape[-1:], w_h.dtype),
             jax.tree.map(jnp.zeros_like, readout))
    (g_h0, g_wx, g_wh, g_b, g_ro), g_xs = lax.scan(body, (g_hT, *zeros), (jnp.arange(T), xs, g_ys, valid, reset),
                                                   reverse=True, unroll=unroll)
    return g_wx, g_wh, g_b, g_ro, g_xs, g_h0, _float0_like(masks)


_elman_vjp.defvjp(_elman_vjp_fwd, _elman_vjp_bwd)


def elman_layer(params, xs, carry, valid=None, reset=None, *, activation: str = "tanh", readout=None,
                unroll: int | None = None):
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
      unroll: ``lax.scan`` unroll factor (default :func:`auto_unroll`).

    Returns:
      ``(h, ys)`` with ``h: [B, H]`` the final carry and ``ys: [T, B, H]`` (``[T, B, O]`` with a readout).
    """
    if activation not in ELMAN_ACTIVATIONS:
        raise ValueError(f"elman_layer: unknown activation {activation!r}; choose from {ELMAN_ACTIVATIONS}")
    T, B = xs.shape[:2]
    unroll = auto_unroll(T, B, carry.shape[-1]) if unroll is None else unroll
    ro = None if readout is None else (readout["w"], readout["b"])
    return _elman_vjp(activation, params["w_x"], params["w_h"], params["b"], ro, xs, carry, (valid, reset), unroll)


# ----------------------------------------------------------------------------------------------------------------
# LSTM: gates [i, f, g, o]; c' = sig(f) c + sig(i) tanh(g); h' = sig(o) tanh(c').
#
# With u the tangent of the gate pre-activations z = x W_x + h W_h + b, one step's tangent is
#   dc' = k_i u_i + k_f u_f + k_g u_g + f dc,   dh' = k_o u_o + q dc'
# with k = [i'(z_i) g, f'(z_f) c, g'(z_g) i, o'(z_o) tanh(c')] and q = o (1 - tanh(c')^2). The forward scan emits
# (k, f, q) per step, the only residuals either derivative rule needs: the tangent scan does one element-wise
# product with k, and its transpose (the backward pass) is
#   g_c' = g_c + q g_h,   g_u = k * [g_c', g_c', g_c', g_h],   g_c <- f g_c',   g_h <- g_u W_h^T.


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
    projections, which costs more than the larger per-step product saves; see experiments/PERFORMANCE.md).

    Returns ``((hT, cT), hs)``, or ``((hT, cT), (hs, k, f, q))`` with the derivative residuals (see above) when
    ``residuals``; ``hs`` are the carries after every step ``[T, B, H]``.
    """
    if hoist:
        seq = _mm(xs, w_x) + b
        pre = lambda z, h: z + h @ w_h
    else:
        seq, w_cat = xs, jnp.concatenate([w_x, w_h], axis=0)
        pre = lambda x, h: jnp.concatenate([x, h], axis=-1) @ w_cat + b

    def body(carry, inp):
        h, c = carry
        z, v, r = inp
        if r is not None:
            h = jnp.where(_col(r), jnp.zeros((), h.dtype), h)
            c = jnp.where(_col(r), jnp.zeros((), c.dtype), c)
        i, f, g, o = jnp.split(_lstm_acts(pre(z, h)), 4, axis=-1)
        c_new = f * c + i * g
        tc = jnp.tanh(c_new)
        h_new = o * tc
        if v is not None:
            h_new = jnp.where(_col(v), h_new, h)
            c_new = jnp.where(_col(v), c_new, c)
        if not residuals:
            return (h_new, c_new), h_new
        k = jnp.concatenate([i * (1.0 - i) * g, f * (1.0 - f) * c, (1.0 - g * g) * i, o * (1.0 - o) * tc], -1)
        return (h_new, c_new), (h_new, k, f, o * (1.0 - tc * tc))

    return lax.scan(body, (h0, c0), (seq, valid, reset), unroll=unroll)


def _lstm_hoist(params, xs, h0, c0, valid, reset, unroll, hoist=True):
    (h, c), hs = _lstm_forward(params["w_x"], params["w_h"], params["b"], xs, h0, c0, valid, reset, unroll,
                               residuals=False, hoist=hoist)
    return (h, c), _mask_ys(hs, valid)


def _sum_terms(terms, like):
    """Sum of the non-``None`` arrays in ``terms`` (zeros like ``like`` when there are none)."""
    out = None
    for t in terms:
        if t is not None:
            out = t if out is None else out + t
    return jnp.zeros(like.shape, like.dtype) if out is None else out


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
    du = _sum_terms([None if _is_zero(dxs) else _mm(dxs, w_x), None if _is_zero(dw_x) else _mm(xs, dw_x),
                     None if _is_zero(db) else jnp.broadcast_to(db, zx.shape),
                     None if _is_zero(dw_h) else _mm(_entering(hs, h0, reset), dw_h)], zx)
    dh = jnp.zeros_like(h0) if _is_zero(dh0) else dh0
    dc = jnp.zeros_like(c0) if _is_zero(dc0) else dc0
    w_hT = w_h.T  # the transposed loop multiplies by w_hT in its stored layout (see _times_transposed)

    def body(carry, inp):
        dh, dc = carry
        du, k, f, q, v, r = inp
        dh, dc = _zero_where(r, dh), _zero_where(r, dc)
        p = k * (du + _times_transposed(dh, w_hT))
        dc_new = p[:, :H] + p[:, H:2 * H] + p[:, 2 * H:3 * H] + f * dc
        dh_new = p[:, 3 * H:] + q * dc_new
        if v is not None:
            dh_new = jnp.where(_col(v), dh_new, dh)
            dc_new = jnp.where(_col(v), dc_new, dc)
        return (dh_new, dc_new), dh_new

    (dhT, dcT), dhs = lax.scan(body, (dh, dc), (du, k, f, q, valid, reset), unroll=unroll)
    return ((hT, cT), _mask_ys(hs, valid)), ((dhT, dcT), _mask_ys(dhs, valid))


_lstm_jvp.defjvp(_lstm_jvp_rule, symbolic_zeros=True)


@partial(jax.custom_vjp, nondiff_argnums=(7,))
def _lstm_vjp(w_x, w_h, b, xs, h0, c0, masks, unroll):
    valid, reset = masks
    return _lstm_hoist({"w_x": w_x, "w_h": w_h, "b": b}, xs, h0, c0, valid, reset, unroll, hoist=False)


def _lstm_vjp_fwd(w_x, w_h, b, xs, h0, c0, masks, unroll):
    valid, reset = masks
    (hT, cT), (hs, k, f, q) = _lstm_forward(w_x, w_h, b, xs, h0, c0, valid, reset, unroll, residuals=True,
                                            hoist=False)
    return ((hT, cT), _mask_ys(hs, valid)), (w_x, w_h, xs, h0, masks, hs, k, f, q)


def _lstm_vjp_bwd(unroll, res, cts):
    w_x, w_h, xs, h0, masks, hs, k, f, q = res
    (g_hT, g_cT), g_ys = cts
    valid, reset = masks
    w_hT = w_h.T

    def body(carry, inp):
        g_h, g_c = carry
        g_y, k, f, q, v, r = inp
        g_h = g_h + (g_y if v is None else jnp.where(_col(v), g_y, 0.0))  # ys are zero at invalid steps
        g_hs, g_cs = (g_h, g_c) if v is None else (jnp.where(_col(v), g_h, 0.0), jnp.where(_col(v), g_c, 0.0))
        g_cn = g_cs + q * g_hs
        g_u = k * jnp.concatenate([g_cn, g_cn, g_cn, g_hs], axis=-1)
        g_h_prev, g_c_prev = g_u @ w_hT, f * g_cn
        if v is not None:
            g_h_prev = g_h_prev + jnp.where(_col(v), 0.0, g_h)
            g_c_prev = g_c_prev + jnp.where(_col(v), 0.0, g_c)
        return (_zero_where(r, g_h_prev), _zero_where(r, g_c_prev)), g_u

    (g_h0, g_c0), g_u = lax.scan(body, (g_hT, g_cT), (g_ys, k, f, q, valid, reset), reverse=True, unroll=unroll)
    return (_tmm(xs, g_u), _tmm(_entering(hs, h0, reset), g_u), jnp.sum(g_u, axis=(0, 1)), _mm(g_u, w_x.T),
            g_h0, g_c0, _float0_like(masks))


_lstm_vjp.defvjp(_lstm_vjp_fwd, _lstm_vjp_bwd)


def lstm_layer(params, xs, carry, valid=None, reset=None, *, unroll: int | None = None, method: str = "jvp"):
    """Runs the :func:`jbptt.cells.lstm` recurrence over a whole time-major sequence.

    Args:
      params: ``{"w_x": [I, 4H], "w_h": [H, 4H], "b": [4H]}`` (gate order ``[i, f, g, o]``).
      xs: ``[T, B, I]`` inputs.
      carry: ``(h, c)``, each ``[B, H]``.
      valid: optional ``[T, B]`` booleans; at invalid steps the carry is left unchanged and ``ys`` is zero.
      reset: optional ``[T, B]`` booleans; the carry is zeroed before flagged steps.
      unroll: ``lax.scan`` unroll factor (default :func:`auto_unroll`).
      method: ``"hoist"``, ``"jvp"`` or ``"vjp"`` (see the module docstring).

    Returns:
      ``((h, c), ys)`` with ``ys: [T, B, H]``.
    """
    h0, c0 = carry
    T, B = xs.shape[:2]
    unroll = auto_unroll(T, B, h0.shape[-1]) if unroll is None else unroll
    if check_method(method) == "hoist":
        return _lstm_hoist(params, xs, h0, c0, valid, reset, unroll)
    fn = _lstm_jvp if method == "jvp" else _lstm_vjp
    return fn(params["w_x"], params["w_h"], params["b"], xs, h0, c0, (valid, reset), unroll)


# ----------------------------------------------------------------------------------------------------------------
# GRU (cuDNN form): r, z = sig(x W_x + b_x + h W_h + b_h) blocks; n = tanh(xn + r * hn); h' = (1 - z) n + z h.
#
# With s = [s_r, s_z, s_hn] the tangents of the r and z pre-activations and of hn = h W_hn + b_hn, and s_xn that of
# x W_xn + b_xn, one step's tangent is
#   dh' = k_r s_r + k_z s_z + k_hn s_hn + m s_xn + z dh
# with m = (1 - z)(1 - n^2) and k = [m hn r'(.), z'(.)(h - n), m r]. The forward scan emits (k, z, m) per step.


def _gru_forward(w_x, w_h, b_x, b_h, xs, h0, valid, reset, unroll, residuals: bool, hoist: bool):
    """The recurrence over ``xs [T, B, I]``; ``hoist`` as in :func:`_lstm_forward` (without it each step does
    the two products ``x_t W_x`` and ``h W_h``).

    Returns ``(hT, hs)``, or ``(hT, (hs, k, z, m))`` with the derivative residuals (see above) when ``residuals``.
    """
    seq = _mm(xs, w_x) + b_x if hoist else xs

    def body(h, inp):
        x_t, v, r_mask = inp
        h = _zero_where(r_mask, h)
        zx_t = x_t if hoist else x_t @ w_x + b_x
        zh = h @ w_h + b_h
        xr, xz, xn = jnp.split(zx_t, 3, axis=-1)
        hr, hz, hn = jnp.split(zh, 3, axis=-1)
        r, z = jnp.split(jax.nn.sigmoid(jnp.concatenate([xr + hr, xz + hz], axis=-1)), 2, axis=-1)
        n = jnp.tanh(xn + r * hn)
        h_new = (1.0 - z) * n + z * h
        if v is not None:
            h_new = jnp.where(_col(v), h_new, h)
        if not residuals:
            return h_new, h_new
        m = (1.0 - z) * (1.0 - n * n)
        k = jnp.concatenate([m * hn * r * (1.0 - r), z * (1.0 - z) * (h - n), m * r], axis=-1)
        return h_new, (h_new, k, z, m)

    return lax.scan(body, h0, (seq, valid, reset), unroll=unroll)


def _gru_hoist(params, xs, h0, valid, reset, unroll, hoist=True):
    h, hs = _gru_forward(params["w_x"], params["w_h"], params["b_x"], params["b_h"], xs, h0, valid, reset, unroll,
                         residuals=False, hoist=hoist)
    return h, _mask_ys(hs, valid)


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
    dzx = _sum_terms([None if _is_zero(dxs) else _mm(dxs, w_x), None if _is_zero(dw_x) else _mm(xs, dw_x),
                      None if _is_zero(db_x) else jnp.broadcast_to(db_x, zx.shape)], zx)
    dzh = _sum_terms([None if _is_zero(dw_h) else _mm(_entering(hs, h0, reset), dw_h),
                      None if _is_zero(db_h) else jnp.broadcast_to(db_h, zx.shape)], zx)
    ds = jnp.concatenate([dzx[..., :2 * H] + dzh[..., :2 * H], dzh[..., 2 * H:]], axis=-1)
    e = m * dzx[..., 2 * H:]  # the non-recurrent term m s_xn, one element-wise pass
    dh = jnp.zeros_like(h0) if _is_zero(dh0) else dh0
    w_hT = w_h.T

    def body(dh, inp):
        ds, e, k, z, v, r_mask = inp
        dh = _zero_where(r_mask, dh)
        p = k * (ds + _times_transposed(dh, w_hT))
        dh_new = p[:, :H] + p[:, H:2 * H] + p[:, 2 * H:] + e + z * dh
        if v is not None:
            dh_new = jnp.where(_col(v), dh_new, dh)
        return dh_new, dh_new

    dhT, dhs = lax.scan(body, dh, (ds, e, k, z, valid, reset), unroll=unroll)
    return (hT, _mask_ys(hs, valid)), (dhT, _mask_ys(dhs, valid))


_gru_jvp.defjvp(_gru_jvp_rule, symbolic_zeros=True)


@partial(jax.custom_vjp, nondiff_argnums=(7,))
def _gru_vjp(w_x, w_h, b_x, b_h, xs, h0, masks, unroll):
    valid, reset = masks
    return _gru_hoist({"w_x": w_x, "w_h": w_h, "b_x": b_x, "b_h": b_h}, xs, h0, valid, reset, unroll, hoist=False)


def _gru_vjp_fwd(w_x, w_h, b_x, b_h, xs, h0, masks, unroll):
    valid, reset = masks
    hT, (hs, k, z, m) = _gru_forward(w_x, w_h, b_x, b_h, xs, h0, valid, reset, unroll, residuals=True, hoist=False)
    return (hT, _mask_ys(hs, valid)), (w_x, w_h, xs, h0, masks, hs, k, z, m)


def _gru_vjp_bwd(unroll, res, cts):
    w_x, w_h, xs, h0, masks, hs, k, z, m = res
    g_hT, g_ys = cts
    valid, reset = masks
    H = h0.shape[-1]
    w_hT = w_h.T

    def body(g_h, inp):
        g_y, k, z, m, v, r_mask = inp
        g_h = g_h + (g_y if v is None else jnp.where(_col(v), g_y, 0.0))
        g_hs = g_h if v is None else jnp.where(_col(v), g_h, 0.0)
        g_s = k * jnp.concatenate([g_hs, g_hs, g_hs], axis=-1)
        g_h_prev = g_s @ w_hT + z * g_hs
        if v is not None:
            g_h_prev = g_h_prev + jnp.where(_col(v), 0.0, g_h)
        return _zero_where(r_mask, g_h_prev), (g_s, m * g_hs)

    g_h0, (g_s, g_xn) = lax.scan(body, g_hT, (g_ys, k, z, m, valid, reset), reverse=True, unroll=unroll)
    g_zx = jnp.concatenate([g_s[..., :2 * H], g_xn], axis=-1)
    return (_tmm(xs, g_zx), _tmm(_entering(hs, h0, reset), g_s), jnp.sum(g_zx, axis=(0, 1)),
            jnp.sum(g_s, axis=(0, 1)), _mm(g_zx, w_x.T), g_h0, _float0_like(masks))


_gru_vjp.defvjp(_gru_vjp_fwd, _gru_vjp_bwd)


def gru_layer(params, xs, carry, valid=None, reset=None, *, unroll: int | None = None, method: str = "jvp"):
    """Runs the :func:`jbptt.cells.gru` recurrence over a whole time-major sequence.

    Args:
      params: ``{"w_x": [I, 3H], "w_h": [H, 3H], "b_x": [3H], "b_h": [3H]}`` (gate order ``[r, z, n]``).
      xs: ``[T, B, I]`` inputs.
      carry: ``h: [B, H]``.
      valid, reset, unroll, method: as in :func:`lstm_layer`.

    Returns:
      ``(h, ys)`` with ``ys: [T, B, H]``.
    """
    T, B = xs.shape[:2]
    unroll = auto_unroll(T, B, carry.shape[-1]) if unroll is None else unroll
    if check_method(method) == "hoist":
        return _gru_hoist(params, xs, carry, valid, reset, unroll)
    fn = _gru_jvp if method == "jvp" else _gru_vjp
    return fn(params["w_x"], params["w_h"], params["b_x"], params["b_h"], xs, carry, (valid, reset), unroll)
