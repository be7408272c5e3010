"""What a schedule costs: predicted cell evaluations per policy, a step's residual bytes, and a counting cell that
checks the predictions in the compiled program.

Evaluations of one gradient count the forward pass. With a checkpoint policy the segmented schedules also replay
each step once in the backward pass of its inner checkpoint (``+ T``), but only the part the policy did not save:
with ``"nonlinearities"`` elementwise ops, no matrix product (the compiled program has as many dot ops as without
the policy). A cell's fused path on the segments (no checkpoint policy) evaluates as many steps as the per-step
scan: its backward pass replays nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jbptt.cells import Cell
from jbptt.remat.planner import budget_units, optimal_schedule, revolve_evaluations
from jbptt.remat.schedules import every_k_lengths, nested_lengths

__all__ = ["EVALUATIONS", "counting_cell", "evaluations", "residual_bytes", "segmented_evaluations"]


# ----------------------------------------------------------------------------------------------------------
# Predicted evaluations, one function per policy.


def segmented_evaluations(T: int, seg_lens: Sequence[int]) -> int:
    """Cell evaluations of :func:`jbptt.remat.schedules.segmented` over ``T`` steps with segment lengths
    ``seg_lens`` (outermost first): each checkpointed segment runs once forward and once more when recomputed."""
    if len(seg_lens) <= 1 or T <= 1:
        return T
    k, inner = seg_lens[0], seg_lens[1:]
    n = T // k
    if n == 0:
        return segmented_evaluations(T, inner)
    return n * k + n * segmented_evaluations(k, inner) + segmented_evaluations(T - n * k, inner)


def _replay(T: int, checkpoint_policy) -> int:
    """The per-step replay of a checkpoint policy inside the segments (``T`` with one, else 0)."""
    return T if checkpoint_policy is not None else 0


def _none(T: int) -> int:
    return T


def _per_step(T: int, checkpoint_policy=None) -> int:
    return 2 * T


def _every_k(T: int, k: int | None = None, checkpoint_policy=None) -> int:
    return segmented_evaluations(T, every_k_lengths(T, k)) + _replay(T, checkpoint_policy)


def _sqrt(T: int, checkpoint_policy=None) -> int:
    return _every_k(T, None, checkpoint_policy)


def _nested(T: int, levels: int = 3, k: int | None = None, checkpoint_policy=None) -> int:
    return segmented_evaluations(T, nested_lengths(T, levels, k)) + _replay(T, checkpoint_policy)


def _binomial(T: int, slots: int = 10) -> int:
    return revolve_evaluations(T, min(slots, T))


def _plan(T: int, budget: float, alpha: float = 2.0) -> int:
    return optimal_schedule(T, *budget_units(T, budget, alpha=alpha)).evaluations


EVALUATIONS: dict[str, Callable[..., int]] = {
    "none": _none, "per_step": _per_step, "every_k": _every_k, "sqrt": _sqrt, "nested": _nested,
    "binomial": _binomial, "plan": _plan,
}
"""Policy name -> ``prediction(T, **options)``: the options are the policy's config keys (see
:func:`jbptt.remat.scan_from_config`)."""


def evaluations(policy: str, T: int, **options) -> int:
    """Predicted cell evaluations of one gradient through ``T`` steps under ``policy`` (forward included).

    Args:
      policy: a policy name of :data:`EVALUATIONS`.
      T: sequence length.
      **options: the policy's options (``k``, ``levels``, ``slots``, ``budget``/``alpha`` for ``plan``,
        ``checkpoint_policy`` for ``per_step``/``every_k``/``sqrt``/``nested``).

    Returns:
      The number of step evaluations (a fused segment of ``L`` steps counts ``L``).
    """
    if policy not in EVALUATIONS:
        raise ValueError(f"unknown remat policy {policy!r}; choose from {sorted(EVALUATIONS)}")
    return EVALUATIONS[policy](T, **options)


# ----------------------------------------------------------------------------------------------------------
# Measuring: residual bytes from XLA, evaluations by callback.


def residual_bytes(step: Callable, params, carry, x, lengths: tuple[int, int] = (16, 32)) -> float:
    """Bytes per step that the plain scan's gradient keeps for ``step(params, carry, x) -> (carry, y)``: the
    slope of XLA's temp memory (``memory_analysis().temp_size_in_bytes``) between two sequence lengths of the
    gradient w.r.t. ``params``. Divided by the carry's bytes it is the ``alpha`` of :func:`jbptt.remat.plan`.

    Args:
      step: the cell's step.
      params: its parameters.
      carry: one carry (e.g. ``[B, H]``).
      x: one step's input (e.g. ``[B, I]``).
      lengths: the two sequence lengths compiled.

    Returns:
      Bytes per step (a float).
    """

    def temp(L):
        xs = jax.tree.map(lambda a: jnp.broadcast_to(a, (L,) + jnp.shape(a)), x)

        def loss(p):
            c, ys = lax.scan(lambda c, xx: step(p, c, xx), carry, xs)
            return sum(jnp.sum(v) for v in jax.tree_util.tree_leaves((c, ys)))

        return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

    a, b = lengths
    return (temp(b) - temp(a)) / (b - a)


def counting_cell(cell: Cell, counter: list) -> Cell:
    """An instrumented copy of ``cell`` for checking what a schedule costs: every evaluation of its step in the
    compiled program adds 1 to ``counter[0]``, and every run of its fused path (``cell.fused``) adds the number of
    steps it runs (a fused layer's backward pass evaluates no step). The counts come from ``jax.debug.callback``
    calls whose argument depends on the carry, so XLA can neither hoist nor merge them; recomputations inside
    ``jax.checkpoint`` call back again. Read ``counter[0]`` after ``jax.effects_barrier()``.

    Args:
      cell: the cell to instrument (its fused path, if any, is instrumented too).
      counter: a one-element list, incremented in place.

    Returns:
      A :class:`~jbptt.cells.Cell` computing exactly what ``cell`` computes.
    """

    def bump(n: int, carry, x):
        dep = jax.tree_util.tree_leaves(carry)[0].ravel()[0] + sum(jnp.sum(a) for a in jax.tree_util.tree_leaves(x))
        jax.debug.callback(lambda _: counter.__setitem__(0, counter[0] + n), dep)

    def step(params, carry, x):
        bump(1, carry, x)
        return cell.step(params, carry, x)

    fused = None
    if cell.fused is not None:
        def fused(params, xs, carry, valid, reset, **kwargs):
            bump(int(xs.shape[0]), carry, xs)
            return cell.fused(params, xs, carry, valid, reset, **kwargs)

    return cell._replace(step=step, fused=fused)
