"""Helpers shared by the fused layers: masks, 2-D products, symbolic zeros, and the method names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

METHODS = ("auto", "hoist", "jvp", "vjp")


def check_method(method: str) -> str:
    """Returns ``method`` if it is one of :data:`METHODS`, else raises one clear error."""
    if method not in METHODS:
        raise ValueError(f"unknown fused method {method!r}; choose from {METHODS}")
    return method


def col(mask):
    """``[B]`` booleans -> ``[B, 1]`` for broadcasting against ``[B, H]``."""
    return mask[:, None]


def entering(outs, init, reset):
    """The carry entering every step: ``[init, outs[:-1]]`` (``[T, B, H]``), zeroed where ``reset``."""
    prev = jnp.concatenate([init[None], outs[:-1]], axis=0)
    return prev if reset is None else jnp.where(reset[..., None], jnp.zeros((), prev.dtype), prev)


def mask_ys(hs, valid):
    return hs if valid is None else jnp.where(valid[..., None], hs, jnp.zeros((), hs.dtype))


def mm(a, w):
    """``a [..., K] @ w [K, N]`` as one 2-D product over the flattened leading axes."""
    return jnp.reshape(jnp.reshape(a, (-1, a.shape[-1])) @ w, (*a.shape[:-1], w.shape[-1]))


def dense(a, w, b):
    """``a [..., K] @ w [K, N] + b [N]`` as one 2-D product over the flattened leading axes."""
    return mm(a, w) + b


def tmm(a, b):
    """``sum_{t,b} a[t, b, :, None] * b[t, b, None, :]``: ``a [..., K]``, ``b [..., N]`` -> ``[K, N]``."""
    return jnp.reshape(a, (-1, a.shape[-1])).T @ jnp.reshape(b, (-1, b.shape[-1]))


def times_transposed(a, w_t):
    """``a @ w_t.T`` written so that its transpose (reverse mode) is ``g @ w_t``: a product with the matrix in its
    stored row-major layout, which the CPU backend runs faster than one that contracts over its last axis."""
    return lax.dot_general(a, w_t, (((a.ndim - 1,), (1,)), ((), ())))


def is_zero(t):
    return isinstance(t, SymbolicZero)


def zero_where(mask, a):
    return a if mask is None else jnp.where(col(mask), jnp.zeros((), a.dtype), a)


def float0_like(masks):
    return jax.tree.map(lambda m: jnp.zeros(m.shape, jax.dtypes.float0), masks)


def sum_terms(terms, like):
    """Sum of the non-``None`` arrays in ``terms`` (zeros like ``like`` when there are none)."""
    out = None
    for t in terms:
        if t is not None:
            out = t if out is None else out + t
    return jnp.zeros(like.shape, like.dtype) if out is None else out


def dense_masked(ys, readout, valid):
    """The fused readout: ``ys [T, B, H] @ w + b`` as one product, zero where ``valid: [T, B]`` is False."""
    out = dense(ys, readout["w"], readout["b"])
    return mask_ys(out, valid)
