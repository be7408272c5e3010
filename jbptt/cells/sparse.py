"""Sparse recurrent cells: Elman, LSTM and GRU whose recurrent matrix has a fixed random sparsity pattern.

As Menick et al. (2020) train them, only the non-zero recurrent weights are parameters: the pattern is a static
numpy index array built at factory time from ``seed`` (it is part of the cell, not of the params), and the params
hold the non-zero weights as one flat vector ``w_h_values: [nnz]``, so the parameter count shrinks with the
density. Input weights and biases stay dense. The recurrences are exactly those of
:func:`jbptt.cells.recurrent.elman`, :func:`~jbptt.cells.recurrent.lstm` and :func:`~jbptt.cells.recurrent.gru`
with ``w_h`` replaced by ``densify(w_h_values, pattern)``.

The pattern. The dense recurrent matrix is ``w_h: [H, G * H]`` (``G`` = 1, 4, 3 gate blocks for Elman, LSTM,
GRU; row = source unit, column = ``gate * H + target unit``, as in the dense cells). Each ``H x H`` gate block
independently keeps its whole diagonal (so every unit has at least one recurrent input and output in every gate,
and a pattern is well defined for any density) plus ``max(0, round(density * H * H) - H)`` off-diagonal entries
drawn uniformly without replacement. ``pattern[k]`` is the flat index ``row * G * H + col`` of ``w_h_values[k]``;
it is sorted, so at ``density=1`` ``w_h_values == w_h.ravel()`` and the sparse cell is the dense cell.

The step forms ``w_h`` by one scatter of the values at the static pattern into zeros and a dense product; that is
a gather in the backward pass and linear in the values, so it is safe under ``jit``, ``grad``, ``vmap`` and ``jvp``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jbptt.cells.base import Cell, params_dtype, zeros_carry
from jbptt.cells.initializers import get_activation, get_initializer
from jbptt.cells.recurrent import gru_update, lstm_update

_GATES = {"elman": 1, "lstm": 4, "gru": 3}


def sparse_pattern(hidden: int, *, density: float, seed: int = 0, gates: int = 1) -> np.ndarray:
    """The static sparsity pattern of a ``[hidden, gates * hidden]`` recurrent matrix (see the module docstring).

    Args:
      hidden: state size H.
      density: fraction of each ``H x H`` gate block kept, in ``(0, 1]``; the diagonal is always kept, so the
        actual density is ``max(density, 1 / H)`` up to rounding.
      seed: seed of the numpy generator that draws the off-diagonal entries.
      gates: number of gate blocks G (1 Elman, 4 LSTM, 3 GRU).

    Returns:
      ``pattern: [nnz]`` int64 numpy array of sorted flat indices ``row * G * H + col``.

    Raises:
      ValueError: if ``density`` is not in ``(0, 1]`` or ``hidden`` / ``gates`` is not positive.
    """
    try:
        ok = 0.0 < float(density) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"sparse cell density must be a number in (0, 1], got {density!r}")
    if hidden < 1 or gates < 1:
        raise ValueError(f"sparse cell needs hidden >= 1 and gates >= 1, got hidden={hidden}, gates={gates}")
    rng = np.random.default_rng(seed)
    n_off = min(max(0, round(float(density) * hidden * hidden) - hidden), hidden * (hidden - 1))
    rows_d = np.arange(hidden)
    off = np.flatnonzero(~np.eye(hidden, dtype=bool))  # flat indices r * H + c of the off-diagonal entries
    flat = []
    for g in range(gates):
        pick = np.sort(rng.choice(off, size=n_off, replace=False)) if n_off else np.zeros(0, np.int64)
        rows = np.concatenate([rows_d, pick // hidden])
        cols = np.concatenate([rows_d, pick % hidden])
        flat.append(rows * (gates * hidden) + g * hidden + cols)
    return np.sort(np.concatenate(flat)).astype(np.int64)


def densify(values, pattern: np.ndarray, hidden: int, gates: int = 1):
    """The dense recurrent matrix ``w_h: [H, G * H]`` with ``values: [nnz]`` at ``pattern`` and zeros elsewhere.

    Linear in ``values`` (a scatter with static, unique, sorted indices), so safe under every transformation.
    """
    flat = jnp.zeros((hidden * gates * hidden,), values.dtype)
    flat = flat.at[pattern].set(values, indices_are_sorted=True, unique_indices=True)
    return flat.reshape(hidden, gates * hidden)


def to_dense_params(params: dict, pattern: np.ndarray, hidden: int, gates: int = 1) -> dict:
    """Sparse-cell params as the params of the matching dense cell: ``w_h_values`` replaced by ``w_h``."""
    out = {k: v for k, v in params.items() if k != "w_h_values"}
    out["w_h"] = densify(params["w_h_values"], pattern, hidden, gates)
    return out


def _init_values(rinit, key, pattern, hidden, gates, scale, rescale, dtype):
    """The dense initialiser (one ``H x H`` block per gate, as the dense cells draw them) gathered at the pattern,
    times ``scale`` and, with ``rescale``, ``1 / sqrt(actual density)`` so that rows keep their expected norm."""
    keys = jax.random.split(key, gates) if gates > 1 else [key]
    w = jnp.concatenate([rinit(k, (hidden, hidden), dtype) for k in keys], axis=1)
    if rescale:
        scale = scale / math.sqrt(len(pattern) / (gates * hidden * hidden))
    return scale * w.reshape(-1)[pattern]


def sparse_elman(hidden: int, *, density: float, seed: int = 0, activation: str = "tanh",
                 recurrent_init="orthogonal", input_init="lecun", recurrent_scale: float = 1.0,
                 rescale: bool = True, dtype=jnp.float32) -> Cell:
    """Elman RNN with a sparse recurrent matrix: ``h' = act(x W_x + h densify(w_h_values) + b)``; ``y = h'``.

    Args:
      hidden: state size H.
      density: fraction of recurrent weights kept, in ``(0, 1]`` (diagonal always kept; see :func:`sparse_pattern`).
      seed: seed of the fixed pattern.
      activation: ``"tanh"``, ``"relu"`` or ``"identity"``.
      recurrent_init / input_init: initialiser names or callables; the recurrent one draws a dense ``[H, H]``
        matrix that is gathered at the pattern.
      recurrent_scale: multiplies the initial recurrent values.
      rescale: also multiply them by ``1 / sqrt(actual density)`` (set False with ``recurrent_init="identity"``).

    Returns:
      A :class:`Cell` with params ``{"w_x": [I, H], "w_h_values": [nnz], "b": [H]}``, carry ``[*batch, H]``.
    """
    act = get_activation(activation)
    rinit, iinit = get_initializer(recurrent_init), get_initializer(input_init)
    pattern = sparse_pattern(hidden, density=density, seed=seed, gates=1)

    def init(key, input_size):
        kx, kh = jax.random.split(key)
        return {"w_x": iinit(kx, (input_size, hidden), dtype),
                "w_h_values": _init_values(rinit, kh, pattern, hidden, 1, recurrent_scale, rescale, dtype),
                "b": jnp.zeros((hidden,), dtype)}

    def step(params, h, x):
        w_h = densify(params["w_h_values"], pattern, hidden, 1)
        h = act(x @ params["w_x"] + h @ w_h + params["b"])
        return h, h

    return Cell(init, zeros_carry(hidden), step, hidden, hidden)


def sparse_lstm(hidden: int, *, density: float, seed: int = 0, forget_bias: float = 1.0,
                recurrent_init="orthogonal", input_init="lecun", rescale: bool = True, dtype=jnp.float32) -> Cell:
    """LSTM (gate layout ``[i, f, g, o]`` as :func:`jbptt.cells.recurrent.lstm`) with a sparse recurrent matrix.

    Each of the four ``H x H`` recurrent gate blocks has its own pattern (see :func:`sparse_pattern`, ``gates=4``).

    Returns:
      A :class:`Cell` with params ``{"w_x": [I, 4H], "w_h_values": [nnz], "b": [4H]}``, carry ``(h, c)`` each
      ``[*batch, H]`` and ``y = h'``.
    """
    rinit, iinit = get_initializer(recurrent_init), get_initializer(input_init)
    pattern = sparse_pattern(hidden, density=density, seed=seed, gates=4)

    def init(key, input_size):
        kx, kh = jax.random.split(key)
        b = jnp.zeros((4 * hidden,), dtype).at[hidden:2 * hidden].set(forget_bias)
        return {"w_x": iinit(kx, (input_size, 4 * hidden), dtype),
                "w_h_values": _init_values(rinit, kh, pattern, hidden, 4, 1.0, rescale, dtype), "b": b}

    def initial_carry(params, batch_shape):
        z = jnp.zeros((*tuple(batch_shape), hidden), params_dtype(params))
        return (z, z)

    def step(params, carry, x):
        h, c = carry
        z = x @ params["w_x"] + h @ densify(params["w_h_values"], pattern, hidden, 4) + params["b"]
        h, c = lstm_update(z, c)
        return (h, c), h

    return Cell(init, initial_carry, step, 2 * hidden, hidden)


def sparse_gru(hidden: int, *, density: float, seed: int = 0, recurrent_init="orthogonal", input_init="lecun",
               rescale: bool = True, dtype=jnp.float32) -> Cell:
    """GRU (cuDNN form, gate layout ``[r, z, n]`` as :func:`jbptt.cells.recurrent.gru`) with a sparse recurrent matrix.

    Each of the three ``H x H`` recurrent gate blocks has its own pattern (see :func:`sparse_pattern`, ``gates=3``).

    Returns:
      A :class:`Cell` with params ``{"w_x": [I, 3H], "w_h_values": [nnz], "b_x": [3H], "b_h": [3H]}``, carry
      ``[*batch, H]`` and ``y = h'``.
    """
    rinit, iinit = get_initializer(recurrent_init), get_initializer(input_init)
    pattern = sparse_pattern(hidden, density=density, seed=seed, gates=3)

    def init(key, input_size):
        kx, kh = jax.random.split(key)
        return {"w_x": iinit(kx, (input_size, 3 * hidden), dtype),
                "w_h_values": _init_values(rinit, kh, pattern, hidden, 3, 1.0, rescale, dtype),
                "b_x": jnp.zeros((3 * hidden,), dtype), "b_h": jnp.zeros((3 * hidden,), dtype)}

    def step(params, h, x):
        zx = x @ params["w_x"] + params["b_x"]
        zh = h @ densify(params["w_h_values"], pattern, hidden, 3) + params["b_h"]
        h = gru_update(zx, zh, h)
        return h, h

    return Cell(init, zeros_carry(hidden), step, hidden, hidden)
