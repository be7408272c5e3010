"""The Cell protocol: one recurrent step as three pure functions over pytrees.

A :class:`Cell` is one recurrent step::

    params = cell.init(key, input_size)
    carry = cell.initial_carry(params, batch_shape)      # e.g. batch_shape=(B,)
    carry, y = cell.step(params, carry, x)               # x: [*batch_shape, input_size]

Every ``step`` works for any leading batch shape (including none), so ``jax.vmap`` of the unbatched step equals
the batched call. Steps are safe under ``jit``, ``grad``, ``vmap``, ``jvp`` and ``pmap``.

A cell may carry one opt-in fast path, ``fused``: a whole-sequence function that computes exactly what scanning
``step`` computes (see :data:`FusedFn`). :func:`jbptt.unroll.unroll` uses it where it can; :func:`plain` removes
it, and every reference in jbptt runs the plain cell. The fused cells live in :mod:`jbptt.fused`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jbptt.batch import batch_where

Params = Any
Carry = Any
PRNGKey = jax.Array

FusedFn = Callable[..., tuple[Any, jax.Array]]
"""``fused(params, xs, carry, valid, reset, *, readout=None, reverse_mode_only=False) -> (carry, ys)``.

Runs the cell's recurrence over a whole time-major sequence ``xs: [T, B, I]`` from ``carry`` (batch shape
``(B,)``) and returns the final carry and ``ys: [T, B, O]``, exactly as scanning :func:`masked_step` does:
``valid: [T, B]`` (or ``None``) marks real steps (invalid steps keep the carry and output zeros), ``reset: [T, B]``
(or ``None``) re-initialises the carry to ``initial_carry`` before flagged steps. ``readout`` (optional
``{"w": [O, R], "b": [R]}``) asks for ``ys @ w + b`` instead of ``ys``, which a layer may compute inside its
loops. ``reverse_mode_only=True`` promises that only reverse-mode derivatives are taken, so the function may use a
``jax.custom_vjp`` (``jax.jvp`` through it then raises)."""


class Cell(NamedTuple):
    """One recurrent step as pure functions.

    Attributes:
      init: ``init(key, input_size) -> params``.
      initial_carry: ``initial_carry(params, batch_shape) -> carry`` (zeros, or a learned state in params).
      step: ``step(params, carry, x) -> (carry, y)`` with ``x: [*batch, input_size]`` and ``y: [*batch, output_size]``.
      hidden_size: size of the (real) recurrent state, for diagnostics and influence-size estimates.
      output_size: size of ``y``.
      fused: optional :data:`FusedFn`, the opt-in whole-sequence fast path (``None`` for a plain cell). Replacing
        ``step`` does not update it: use ``plain(cell)._replace(step=...)``.
    """

    init: Callable[[PRNGKey, int], Params]
    initial_carry: Callable[[Params, tuple[int, ...]], Carry]
    step: Callable[[Params, Carry, Any], tuple[Carry, jax.Array]]
    hidden_size: int
    output_size: int
    fused: FusedFn | None = None


def check_size(name: str, size) -> int:
    """Returns ``size`` if it is a positive int, else raises one clear ``ValueError`` naming the cell."""
    try:
        value = operator.index(size)
    except TypeError:
        value = None
    if value is None or isinstance(size, bool) or value < 1:
        raise ValueError(f"{name}: the state size must be a positive int, got {size!r}")
    return value


def plain(cell: Cell) -> Cell:
    """``cell`` without its fused fast path: every unroll scans ``cell.step``."""
    return cell._replace(fused=None)


def params_dtype(params):
    """The floating dtype of a cell's parameters (the carry is created in it, so float64 params run in float64)."""
    return jnp.result_type(*jax.tree_util.tree_leaves(params))


def zeros_carry(hidden: int) -> Callable:
    """``initial_carry`` of a cell whose carry is one ``[*batch, hidden]`` array of zeros."""

    def initial_carry(params, batch_shape):
        return jnp.zeros((*tuple(batch_shape), hidden), params_dtype(params))

    return initial_carry


def masked_step(step: Callable, params, carry, x, valid=None, reset=None, fresh=None):
    """One step with the masks every unroll applies. Leaves are ``[B, ...]``.

    Args:
      step: the cell's ``step``.
      valid: optional ``[B]`` booleans; where False the carry is kept and the output is zero.
      reset: optional ``[B]`` booleans; where True the carry is replaced by ``fresh`` before the step.
      fresh: the carry to reset to (``initial_carry``), needed with ``reset``.

    Returns:
      ``(carry, y)``; the carry keeps its incoming dtype.
    """
    if reset is not None:
        carry = batch_where(reset, fresh, carry)
    new, y = step(params, carry, x)
    new = jax.tree.map(lambda n, o: n.astype(o.dtype), new, carry)
    if valid is not None:
        new = batch_where(valid, new, carry)
        y = batch_where(valid, y, jnp.zeros_like(y))
    return new, y


def scan_steps(cell: Cell, params, xs, carry, valid=None, reset=None, *, scan: Callable = lax.scan,
               reverse: bool = False, unroll: int = 1):
    """Scans :func:`masked_step` of ``cell.step`` over time-major ``xs`` (leaves ``[T, B, ...]``).

    ``valid`` / ``reset`` are ``[T, B]`` or ``None``; ``scan`` is ``lax.scan`` or a drop-in replacement. Returns
    ``(carry, ys)`` with ``ys: [T, B, O]``. This is the plain path of :func:`jbptt.unroll.unroll`.
    """
    fresh = None if reset is None else cell.initial_carry(params, jnp.shape(jax.tree.leaves(xs)[0])[1:2])

    def body(c, inp):
        x, v, r = inp
        return masked_step(cell.step, params, c, x, v, r, fresh)

    return scan(body, carry, (xs, valid, reset), reverse=reverse, unroll=unroll)
