"""What tests and benchmarks share: the cell zoo, random problems, float64 helpers and counting cells.

- :func:`zoo` lists one small cell of every kind jbptt has (plain, element-wise, stacked, with a readout, with a
  learned initial carry, fused, ESN, Flax), each with the structural facts an estimator may depend on;
- :func:`random_problem` builds a float64 problem (params, a random batch with optional lengths, resets and a
  loss mask) around any cell: the one problem builder of the test suite;
- :func:`to_f64`, :func:`init_f64` and :func:`finite_difference_grad` are the float64 helpers of the references;
- :func:`counting_cell` (from :mod:`jbptt.remat`) counts the step evaluations of a compiled program.

Call the float64 helpers with ``jax_enable_x64`` on (the test suite's ``conftest.py`` turns it on).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.flatten_util import ravel_pytree

from jbptt import cells, fused, losses
from jbptt.batch import Batch
from jbptt.cells import Cell
from jbptt.losses import LossFn
from jbptt.remat import counting_cell

__all__ = ["ZooCell", "cell_zoo", "counting_cell", "finite_difference_grad", "init_f64", "random_problem", "to_f64",
           "zoo"]


class ZooCell(NamedTuple):
    """One cell of the zoo and the structural facts about it that decide which estimators apply.

    Attributes:
      name: a short identifier (used as a test id).
      cell: the :class:`~jbptt.cells.Cell`.
      elementwise: every parameter drives one unit and the carry Jacobian is block-diagonal per unit (diagonal
        linear, IndRNN): SnAp-1 and ``rtrl(diagonal=True)`` are exact RTRL on it.
      rank_one: the immediate influence of the recurrent parameters factorises as ``a ⊗ psi`` (an Elman-type cell
        ``h' = f([x, h, 1] W)``), what KF-RTRL needs.
      reads_h: the output is the carry's first component ``h`` (or, after :func:`random_problem`, a linear readout
        of it), which e-prop's and RFLO's learning signal ``dl/dh`` assumes.
    """

    name: str
    cell: Cell
    elementwise: bool = False
    rank_one: bool = False
    reads_h: bool = False


def zoo(hidden: int = 3) -> list[ZooCell]:
    """Every cell kind and combinator of jbptt, small: the cells a conformance test runs every estimator on.

    Args:
      hidden: units per layer.

    Returns:
      A list of :class:`ZooCell` with distinct names. Plain and fused variants of Elman, LSTM and GRU are separate
      entries (the fused ones carry the opt-in whole-sequence path of :mod:`jbptt.fused`).
    """
    H = hidden
    flax_lstm = cells.from_flax(nn.LSTMCell(features=H, param_dtype=jnp.float64))
    return [
        ZooCell("elman_tanh", cells.elman(H), rank_one=True, reads_h=True),
        ZooCell("elman_irnn", cells.elman(H, activation="relu", recurrent_init="identity"), rank_one=True,
                reads_h=True),
        ZooCell("lstm", cells.lstm(H), reads_h=True),
        ZooCell("gru", cells.gru(H), reads_h=True),
        ZooCell("lru_complex", cells.diagonal_linear(H, 2), elementwise=True),
        ZooCell("lru_real", cells.diagonal_linear(H, 2, complex_valued=False), elementwise=True),
        ZooCell("indrnn", cells.indrnn(H, activation="tanh"), elementwise=True, reads_h=True),
        ZooCell("stack", cells.stack([cells.lstm(H), cells.gru(H), cells.elman(H)], residual=True)),
        ZooCell("readout_lstm", cells.with_readout(cells.lstm(H), 2), reads_h=True),
        ZooCell("learned_carry_gru", cells.learned_initial_carry(cells.gru(H)), reads_h=True),
        ZooCell("fused_elman", fused.elman(H), rank_one=True, reads_h=True),
        ZooCell("fused_lstm", fused.lstm(H), reads_h=True),
        ZooCell("fused_gru", fused.gru(H), reads_h=True),
        ZooCell("fused_stack_learned_carry",
                cells.learned_initial_carry(cells.stack([fused.elman(H), fused.lstm(H), fused.gru(H)]))),
        ZooCell("esn", cells.esn(H, density=1.0), rank_one=True, reads_h=True),
        ZooCell("flax_lstm", flax_lstm),
    ]


def cell_zoo(hidden: int = 3) -> list[tuple[str, Cell]]:
    """``(name, cell)`` pairs of :func:`zoo`, for ``pytest.mark.parametrize("name,cell", cell_zoo())``."""
    return [(z.name, z.cell) for z in zoo(hidden)]


def to_f64(tree):
    """Casts every floating leaf of a pytree to float64 (other leaves unchanged). Returns the new pytree."""
    return jax.tree.map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def init_f64(cell: Cell, key, input_size: int):
    """``cell.init(key, input_size)`` cast to float64, with a learned initial carry set to 0.3 (so that its
    gradient is not taken at the cell's own zero carry). Returns the params pytree."""
    params = to_f64(cell.init(key, input_size))
    if isinstance(params, dict) and "carry0" in params:
        params["carry0"] = jax.tree.map(lambda c: 0.3 * jnp.ones_like(c), params["carry0"])
    return params


def finite_difference_grad(f, params, eps: float = 1e-6):
    """Central finite differences of a scalar ``f(params)`` with respect to every parameter leaf.

    The ``2 P`` evaluations are one vmapped, jitted call (``P`` the number of parameters), in float64.

    Returns:
      A pytree like ``params``.
    """
    flat, unravel = ravel_pytree(params)
    basis = eps * jnp.eye(flat.size, dtype=flat.dtype)
    fv = jax.jit(jax.vmap(lambda v: f(unravel(v))))
    return unravel((fv(flat + basis) - fv(flat - basis)) / (2 * eps))


def random_problem(cell: Cell, key, *, B: int = 2, T: int = 6, input_size: int = 2, output_size: int = 2,
                   lengths: bool = False, resets: bool = False, mask: bool = False,
                   loss: LossFn = losses.mse) -> tuple[Cell, object, Batch]:
    """A float64 problem around ``cell``: params with no exactly-zero trainable entry and a random batch.

    A readout ``with_readout(cell, output_size)`` is added unless ``cell.output_size == output_size`` already.
    The trainable params of :func:`init_f64` are perturbed by ``0.1 * N(0, 1)`` (zero-initialised biases would
    hide structure), a learned initial carry starts near 0.3. Random numbers come from a host generator seeded
    by ``key``, so building a problem compiles nothing.

    Args:
      cell: any cell.
      key: a PRNG key (typed or raw).
      B, T, input_size, output_size: batch size, steps, input and output sizes.
      lengths: add ``seq_lengths: [B]`` (example 0 runs all ``T`` steps, the others ``T // 2 .. T - 1``).
      resets: add ``resets: [B, T]`` booleans (about one step in four, and at least one inside every sequence).
      mask: add a loss ``mask: [B, T]`` of 0./1. (about 70 % ones, never all zero).
      loss: the per-step loss the targets are drawn for: integer labels in ``[0, output_size)`` for
        :func:`jbptt.losses.cross_entropy`, values in ``[0, 1]`` for :func:`jbptt.losses.binary_cross_entropy`,
        ``N(0, 1)`` otherwise.

    Returns:
      ``(cell_with_readout, params, batch)`` with ``batch.inputs: [B, T, input_size]`` and ``batch.targets:
      [B, T, output_size]`` (``[B, T]`` labels for cross-entropy).
    """
    model = cell if cell.output_size == output_size else cells.with_readout(cell, output_size)
    data = np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key)
    rng = np.random.default_rng(data.ravel().astype(np.uint64))
    params = init_f64(model, key, input_size)
    trainable = cells.trainable_mask(params)
    params = jax.tree.map(lambda a, m: a + 0.1 * rng.standard_normal(a.shape) if m else a, params, trainable)
    inputs = jnp.asarray(rng.standard_normal((B, T, input_size)))
    if loss is losses.cross_entropy:
        targets = jnp.asarray(rng.integers(0, output_size, (B, T)))
    elif loss is losses.binary_cross_entropy:
        targets = jnp.asarray(rng.random((B, T, output_size)))
    else:
        targets = jnp.asarray(rng.standard_normal((B, T, output_size)))
    seq_lengths = None
    if lengths:
        lens = rng.integers(max(T // 2, 1), max(T, 2), (B,))
        lens[0] = T
        seq_lengths = jnp.asarray(lens)
    reset_flags = None
    if resets:
        flags = rng.random((B, T)) < 0.25
        flags[:, max(T // 2 - 1, 0)] = True
        reset_flags = jnp.asarray(flags)
    loss_mask = None
    if mask:
        m = (rng.random((B, T)) < 0.7).astype(np.float64)
        m[:, 0] = 1.0
        loss_mask = jnp.asarray(m)
    return model, params, Batch(inputs, targets, mask=loss_mask, seq_lengths=seq_lengths, resets=reset_flags)
