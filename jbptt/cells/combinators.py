"""Combinators: functions from cells to cells (stack, readout, learned initial carry, Flax adapter), dropout
between layers, and the trainable mask.

A combinator keeps the fused fast path of its parts when it can express its own with them: a stack of fused
cells is fused layer by layer, a readout is passed to the core's fused function, and a learned initial carry
uses the core's fused function when there are no resets (it falls back to scanning the step otherwise).
Parameters under a dict key named ``"fixed"`` are not trained: steps read them through ``lax.stop_gradient`` and
:func:`trainable_mask` marks them ``False`` so optimizers (``optax.masked``) leave them alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jbptt.cells.base import Cell, scan_steps
from jbptt.cells.initializers import get_initializer, lecun


def split_step_key(x):
    """Splits a step input into ``(x, key)``: ``key`` is ``None`` unless ``x`` is a ``(x, key)`` tuple."""
    if isinstance(x, tuple) and len(x) == 2:
        return x
    return x, None


def dropout(key, y, rate: float):
    """Inverted dropout on ``y: [*batch, H]`` with one PRNG key per batch element (``key: [*batch]`` typed keys).

    Returns ``y`` unchanged when ``key`` is ``None`` or ``rate == 0`` (evaluation).
    """
    if key is None or rate == 0.0:
        return y
    keys = jnp.reshape(key, (-1,))
    flat = jnp.reshape(y, (keys.shape[0], -1))
    keep = jax.vmap(lambda k, v: jax.random.bernoulli(k, 1.0 - rate, v.shape))(keys, flat)
    return jnp.reshape(jnp.where(keep, flat / (1.0 - rate), 0.0), y.shape)


def stack(cells: Sequence[Cell], *, residual: bool = False, dropout_rate: float = 0.0) -> Cell:
    """Multi-layer cell: layer ``l`` reads layer ``l-1``'s output at the same time step.

    Args:
      cells: the layers, bottom first.
      residual: add each layer's input to its output where the sizes match (from the second layer on).
      dropout_rate: dropout between layers. It is active only when the step input is a tuple ``(x, key)`` with
        ``key: [*batch]`` typed PRNG keys (see :func:`jbptt.unroll.with_step_keys`); a plain ``x`` means no dropout.

    Returns:
      A :class:`Cell` with params and carry as tuples over layers and ``y`` the top layer's output.
    """
    cells = tuple(cells)
    if not cells:
        raise ValueError("stack needs at least one cell")

    def init(key, input_size):
        params, size = [], input_size
        for cell, k in zip(cells, jax.random.split(key, len(cells)), strict=True):
            params.append(cell.init(k, size))
            size = cell.output_size
        return tuple(params)

    def initial_carry(params, batch_shape):
        return tuple(c.initial_carry(p, batch_shape) for c, p in zip(cells, params, strict=True))

    def step(params, carry, x):
        x, key = split_step_key(x)
        keys = [None] * len(cells) if key is None else _split_batched_keys(key, len(cells))
        new_carry = []
        for l, (cell, p, c) in enumerate(zip(cells, params, carry, strict=True)):
            if l > 0:
                x = dropout(keys[l], x, dropout_rate)
            c, y = cell.step(p, c, x)
            if residual and l > 0 and y.shape[-1] == x.shape[-1]:
                y = y + x
            new_carry.append(c)
            x = y
        return tuple(new_carry), x

    fused = None
    if all(c.fused is not None for c in cells):  # layer by layer over the whole sequence (no dropout: see unroll)
        def fused(params, xs, carry, valid, reset, *, readout=None, reverse_mode_only=False):
            new_carry, x = [], xs
            for l, (cell, p, c) in enumerate(zip(cells, params, carry, strict=True)):
                last = l == len(cells) - 1
                c, y = cell.fused(p, x, c, valid, reset, readout=readout if last and not residual else None,
                                  reverse_mode_only=reverse_mode_only)
                if residual and l > 0 and y.shape[-1] == x.shape[-1]:
                    y = y + x
                new_carry.append(c)
                x = y
            if residual and readout is not None:
                x = _dense_masked(x, readout, valid)
            return tuple(new_carry), x

    return Cell(init, initial_carry, step, sum(c.hidden_size for c in cells), cells[-1].output_size, fused)


def _split_batched_keys(key, n: int):
    flat = jnp.reshape(key, (-1,))
    split = jax.vmap(lambda k: jax.random.split(k, n))(flat)  # [B, n]
    return [jnp.reshape(split[:, i], jnp.shape(key)) for i in range(n)]


def with_readout(cell: Cell, output_size: int, *, init=lecun) -> Cell:
    """Adds a linear readout ``y = cell_y W + b`` to a cell (logits for classification, values for regression).

    Returns:
      A :class:`Cell` with params ``{"core": ..., "readout": {"w": [O_cell, output_size], "b": [output_size]}}``.
    """
    winit = get_initializer(init)

    def init_fn(key, input_size):
        kc, kr = jax.random.split(key)
        core = cell.init(kc, input_size)
        dtype = jax.tree_util.tree_leaves(core)[0].dtype
        return {"core": core,
                "readout": {"w": winit(kr, (cell.output_size, output_size), dtype),
                            "b": jnp.zeros((output_size,), dtype)}}

    def initial_carry(params, batch_shape):
        return cell.initial_carry(params["core"], batch_shape)

    def step(params, carry, x):
        carry, y = cell.step(params["core"], carry, x)
        return carry, y @ params["readout"]["w"] + params["readout"]["b"]

    fused = None
    if cell.fused is not None:
        def fused(params, xs, carry, valid, reset, *, readout=None, reverse_mode_only=False):
            carry, ys = cell.fused(params["core"], xs, carry, valid, reset, readout=params["readout"],
                                   reverse_mode_only=reverse_mode_only)
            return carry, ys if readout is None else _dense_masked(ys, readout, valid)

    return Cell(init_fn, initial_carry, step, cell.hidden_size, output_size, fused)


def learned_initial_carry(cell: Cell) -> Cell:
    """Makes the initial carry a trained parameter ``params["carry0"]`` broadcast over the batch.

    Returns:
      A :class:`Cell` with params ``{"core": cell_params, "carry0": carry}`` (carry0 starts at the cell's own
      initial carry for an empty batch shape).
    """

    def init(key, input_size):
        core = cell.init(key, input_size)
        return {"core": core, "carry0": cell.initial_carry(core, ())}

    def initial_carry(params, batch_shape):
        return jax.tree.map(lambda c: jnp.broadcast_to(c, (*tuple(batch_shape), *c.shape)), params["carry0"])

    def step(params, carry, x):
        return cell.step(params["core"], carry, x)

    learned = Cell(init, initial_carry, step, cell.hidden_size, cell.output_size)
    if cell.fused is None:
        return learned

    def fused(params, xs, carry, valid, reset, *, readout=None, reverse_mode_only=False):
        if reset is None:  # the core's fused function resets to its own initial carry, not to carry0
            return cell.fused(params["core"], xs, carry, valid, None, readout=readout,
                              reverse_mode_only=reverse_mode_only)
        carry, ys = scan_steps(learned, params, xs, carry, valid, reset)
        return carry, ys if readout is None else _dense_masked(ys, readout, valid)

    return learned._replace(fused=fused)


def from_flax(module, *, output_size: int | None = None) -> Cell:
    """Adapts a ``flax.linen`` recurrent cell (``RNNCellBase``: ``LSTMCell``, ``GRUCell``, ...) into a Cell.

    The params are the module's variables dict; ``step`` is ``module.apply``, so outputs equal
    ``flax.linen.RNN(module)`` on the same parameters.

    Args:
      module: a ``flax.linen.RNNCellBase`` instance (e.g. ``nn.LSTMCell(features=32)``).
      output_size: size of ``y`` (default: ``module.features``).

    Returns:
      A :class:`Cell` whose carry is the module's carry for ``batch_shape``.
    """
    features = getattr(module, "features", None)
    if output_size is None:
        if features is None:
            raise ValueError("from_flax: the module has no `features`; pass output_size")
        output_size = features

    def init(key, input_size):
        carry = module.initialize_carry(key, (1, input_size))
        return module.init(key, carry, jnp.zeros((1, input_size)))

    def initial_carry(params, batch_shape):
        del params
        # The carry's shape depends only on the batch dims (input_shape[:-1]) and module.features.
        return module.initialize_carry(jax.random.key(0), (*tuple(batch_shape), 1))

    def step(params, carry, x):
        return module.apply(params, carry, x)

    hidden = features * (2 if "LSTM" in type(module).__name__ else 1) if features else output_size
    return Cell(init, initial_carry, step, hidden, output_size)


def trainable_mask(params) -> Any:
    """A pytree of booleans like ``params``: ``False`` for leaves under a ``"fixed"`` dict key, else ``True``.

    Use with ``optax.masked`` so that optimizers and weight decay leave fixed (e.g. ESN reservoir) weights alone.
    """

    def is_trainable(path, leaf):
        del leaf
        return not any(getattr(k, "key", None) == "fixed" for k in path)

    return jax.tree_util.tree_map_with_path(is_trainable, params)


def _dense_masked(ys, readout, valid):
    """``ys [T, B, H] @ w + b`` as one product, zero where ``valid: [T, B]`` is False (a fused readout)."""
    out = jnp.reshape(jnp.reshape(ys, (-1, ys.shape[-1])) @ readout["w"], (*ys.shape[:-1], -1)) + readout["b"]
    return out if valid is None else jnp.where(valid[..., None], out, jnp.zeros((), out.dtype))
