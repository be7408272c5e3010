"""Recurrent cells as values: the :class:`Cell` protocol, the plain cells, combinators and initialisers.

``base`` holds the protocol (three pure functions and an optional fused fast path), ``recurrent`` the plain
cells, ``combinators`` the functions from cells to cells, ``initializers`` the initialisers and activations.
"""

from collections.abc import Callable

from jbptt.cells.base import Carry, Cell, FusedFn, Params, masked_step, params_dtype, plain, scan_steps, zeros_carry
from jbptt.cells.combinators import (
    dropout,
    from_flax,
    learned_initial_carry,
    split_step_key,
    stack,
    trainable_mask,
    with_readout,
)
from jbptt.cells.initializers import (
    ACTIVATIONS,
    INITIALIZERS,
    get_activation,
    get_initializer,
    glorot,
    identity,
    lecun,
    orthogonal,
    scale_to_spectral_radius,
    spectral_radius,
)
from jbptt.cells.recurrent import diagonal_linear, elman, esn, gru, indrnn, lstm
from jbptt.cells.sparse import sparse_elman, sparse_gru, sparse_lstm

CELLS: dict[str, Callable[..., Cell]] = {
    "elman": elman,
    "lstm": lstm,
    "gru": gru,
    "diagonal_linear": diagonal_linear,
    "lru": diagonal_linear,
    "indrnn": indrnn,
    "esn": esn,
    "sparse_elman": sparse_elman,
    "sparse_lstm": sparse_lstm,
    "sparse_gru": sparse_gru,
}
"""Every cell by the name configs use (``model.cell``); each is ``factory(hidden, **options)``."""

__all__ = [
    "ACTIVATIONS", "CELLS", "Carry", "Cell", "FusedFn", "INITIALIZERS", "Params", "diagonal_linear", "dropout",
    "elman", "esn", "from_flax", "get_activation", "get_initializer", "glorot", "gru", "identity", "indrnn",
    "learned_initial_carry", "lecun", "lstm", "masked_step", "orthogonal", "params_dtype", "plain",
    "scale_to_spectral_radius", "scan_steps", "sparse_elman", "sparse_gru", "sparse_lstm", "spectral_radius",
    "split_step_key", "stack", "trainable_mask",
    "with_readout", "zeros_carry",
]
