"""Opt-in fused whole-sequence layers for the Elman, LSTM and GRU cells: the one fast path of
:func:`jbptt.unroll.unroll`.

``fused.elman(H)``, ``fused.lstm(H)`` and ``fused.gru(H)`` are the plain cells of :mod:`jbptt.cells` with the
``fused`` field attached (same parameters, same ``step``); :func:`cell` builds any cell by name with its fused path
where one exists, :func:`jbptt.cells.plain` removes it. Stacks, readouts and learned initial carries of fused cells
stay fused. Every fused layer is tested against scanning the plain step.

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
    projections costs more than it saves (``docs/performance.md``).
``"vjp"``
    The same backward pass written out by hand as a ``jax.custom_vjp`` (reverse mode only: ``jax.jvp`` of it
    raises).

The Elman layer (:func:`elman_layer`) is a custom VJP that stores only the carries. Every method computes
exactly the plain :func:`jbptt.cells.elman` / :func:`jbptt.cells.lstm` / :func:`jbptt.cells.gru` recurrence, with
``valid`` (sequence lengths) and ``reset`` (episode boundaries, carry re-initialised to zeros before the flagged
step) masks. Layer functions are time-major: ``xs: [T, B, I]``; they return ``(carry, ys)`` with ``ys: [T, B, H]``,
zero at steps where ``valid`` is False. Safe under ``jit``, ``grad`` and ``vmap`` (and ``jvp`` except ``"vjp"``).
"""


from __future__ import annotations

from jbptt import cells as _cells
from jbptt.cells import Cell, plain
from jbptt.fused._common import METHODS, check_method, dense
from jbptt.fused._elman import ELMAN_ACTIVATIONS, elman, elman_layer
from jbptt.fused._gru import gru, gru_layer
from jbptt.fused._lstm import lstm, lstm_layer

CELLS = {"elman": elman, "lstm": lstm, "gru": gru}
"""The cells that have a fused fast path, by :data:`jbptt.cells.CELLS` name."""


def cell(name: str, hidden: int, **options) -> Cell:
    """``jbptt.cells.CELLS[name](hidden, **options)`` with its fused fast path attached where one exists.

    Returns:
      A :class:`~jbptt.cells.Cell`; for names without a fused layer the plain cell.
    """
    if name in CELLS:
        return CELLS[name](hidden, **options)
    if name not in _cells.CELLS:
        raise ValueError(f"unknown cell {name!r}; choose from {sorted(_cells.CELLS)}")
    return _cells.CELLS[name](hidden, **options)


__all__ = ["CELLS", "ELMAN_ACTIVATIONS", "METHODS", "cell", "check_method", "dense", "elman", "elman_layer", "gru",
           "gru_layer", "lstm", "lstm_layer", "plain"]
