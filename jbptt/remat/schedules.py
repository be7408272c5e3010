"""Scan-structured checkpoint schedules: ``lax.scan`` + ``jax.checkpoint`` only.

Each factory returns a drop-in replacement for ``lax.scan`` (``scan(body, init, xs, reverse=False, unroll=1)``
over time-major ``xs`` leaves ``[T, ...]``). The segmented ones without a checkpoint policy (``every_k``, ``sqrt``,
``nested``) return a :class:`jbptt.unroll.Scan` whose ``sequence`` runs a cell's fused whole-sequence function on
the same checkpointed segments; with a checkpoint policy they scan the cell's step. Everything here is safe under
``jit``, ``grad``, ``vmap`` and ``jvp``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
from jax import lax

from jbptt.remat._time import concat, forward_only, length, window
from jbptt.unroll import Scan, ScanFn

__all__ = ["checkpoint_policy", "every_k", "every_k_lengths", "nested", "nested_lengths", "none", "per_step",
           "save_nonlinearity_outputs", "sqrt"]


# ----------------------------------------------------------------------------------------------------------
# Checkpoint policies (what a checkpointed step saves).

_OUTPUT_DERIVATIVE_PRIMITIVES = (lax.tanh_p, lax.logistic_p, lax.exp_p)


def save_nonlinearity_outputs(prim, *_, **__) -> bool:
    """A ``jax.checkpoint`` policy that saves the outputs of ``tanh``, ``logistic`` and ``exp``: their
    derivatives are functions of their outputs, so the backward pass recomputes only elementwise ops, never the
    matrix products that fed them. For an Elman tanh step a step keeps 2 carries (its input carry and the tanh
    output) instead of the plain scan's 3 (JAX's tanh rule also keeps ``1 - tanh``). Name: ``"nonlinearities"``.
    """
    return prim in _OUTPUT_DERIVATIVE_PRIMITIVES


_OWN_POLICIES = {"nonlinearities": save_nonlinearity_outputs}


def checkpoint_policy(name: str | Callable | None):
    """Resolves a ``jax.checkpoint_policies`` name (e.g. ``"dots_saveable"``) or ``"nonlinearities"``
    (:func:`save_nonlinearity_outputs`), or passes a callable (or ``None``) through."""
    if name is None or callable(name):
        return name
    if name in _OWN_POLICIES:
        return _OWN_POLICIES[name]
    policy = getattr(jax.checkpoint_policies, name, None)
    if policy is None or name.startswith("_"):
        names = [n for n in dir(jax.checkpoint_policies) if not n.startswith("_")] + sorted(_OWN_POLICIES)
        raise ValueError(f"unknown checkpoint policy {name!r}; choose from {names}")
    return policy


# ----------------------------------------------------------------------------------------------------------
# Per-step schedules.


def none() -> ScanFn:
    """The plain ``lax.scan`` (stores every step's residuals)."""
    return lax.scan


def per_step(policy: str | Callable | None = None) -> ScanFn:
    """``lax.scan`` of ``jax.checkpoint(body)``: stores only each step's carry and what ``policy`` saves.

    Args:
      policy: a ``jax.checkpoint_policies`` name or callable (e.g. ``"dots_saveable"``,
        ``jax.checkpoint_policies.save_only_these_names("h")`` with values tagged by
        ``jax.ad_checkpoint.checkpoint_name``); ``None`` saves nothing inside the step.
    """
    pol = checkpoint_policy(policy)

    def scan(body, init, xs, reverse: bool = False, unroll: int = 1):
        return lax.scan(jax.checkpoint(body, policy=pol, prevent_cse=False), init, xs, reverse=reverse,
                        unroll=unroll)

    return scan


# ----------------------------------------------------------------------------------------------------------
# Segmented schedules: checkpointed segments inside checkpointed segments.


def segmented(run, carry, xs, seg_lens: Sequence[int]):
    """Runs ``run(carry, xs) -> (carry, ys)`` over time-major ``xs`` in checkpointed segments: ``seg_lens[0]`` is
    the outermost segment length, the last entry the innermost level, which ``run`` executes. A remainder that does
    not fill a segment is run at the next level down without its own checkpoint."""
    T = length(xs)
    if len(seg_lens) <= 1 or T <= 1:
        return run(carry, xs)
    k, inner = seg_lens[0], seg_lens[1:]
    n = T // k
    if n == 0:
        return segmented(run, carry, xs, inner)

    def segment(c, xseg):
        return segmented(run, c, xseg, inner)

    main = jax.tree.map(lambda a: a[:n * k].reshape((n, k) + a.shape[1:]), xs)
    carry, ys = lax.scan(jax.checkpoint(segment, prevent_cse=False), carry, main)
    ys = jax.tree.map(lambda a: a.reshape((n * k,) + a.shape[2:]), ys)
    if n * k == T:
        return carry, ys
    carry, ys_rem = segmented(run, carry, window(xs, n * k, T), inner)
    return carry, concat([ys, ys_rem])


def every_k_lengths(T: int, k: int | None = None) -> list[int]:
    """Segment lengths of :func:`every_k` for ``T`` steps: ``[k, 1]`` (``k`` defaults to ``ceil(sqrt(T))``)."""
    return [math.ceil(math.sqrt(T)) if k is None else k, 1]


def nested_lengths(T: int, levels: int, k: int | None = None) -> list[int]:
    """Segment lengths of :func:`nested`, outermost first, for ``levels`` levels of branching ``k`` (default
    ``ceil(T^(1/levels))``)."""
    if levels < 1:
        raise ValueError(f"nested: levels must be >= 1, got {levels}")
    if k is None:
        k = max(2, math.ceil(T ** (1.0 / levels) - 1e-9))
    return [k ** (levels - 1 - i) for i in range(levels - 1)] + [1]


def _segmented_schedule(seg_lens_of: Callable[[int], list[int]], policy) -> ScanFn | Scan:
    """The scan over checkpointed segments of ``seg_lens_of(T)`` steps. Without a checkpoint ``policy`` it is a
    :class:`~jbptt.unroll.Scan` whose ``sequence`` runs a cell's fused function on the same segments; with one, the
    step scan whose innermost steps are ``jax.checkpoint(body, policy=policy)``."""
    pol = checkpoint_policy(policy)

    def impl(body, init, xs, unroll):
        step = body if pol is None else jax.checkpoint(body, policy=pol, prevent_cse=False)
        return segmented(lambda c, x: lax.scan(step, c, x, unroll=unroll), init, xs, seg_lens_of(length(xs)))

    steps = forward_only(impl)
    if pol is not None:
        return steps

    def sequence(run, carry, xs):
        return segmented(run, carry, xs, seg_lens_of(length(xs)))

    return Scan(steps, sequence)


def every_k(k: int | None = None, policy: str | Callable | None = None) -> ScanFn | Scan:
    """Two-level checkpointing: stores the carry every ``k`` steps and recomputes each segment in the backward
    pass.

    Args:
      k: segment length; ``None`` means ``ceil(sqrt(T))`` (O(sqrt(T)) memory, see :func:`sqrt`).
      policy: optional checkpoint policy for the steps inside a recomputed segment (as in :func:`per_step`,
        e.g. ``"nonlinearities"``): the segment then keeps each step's carry plus what the policy saves,
        instead of JAX's full residuals. Same evaluation count.

    Returns:
      Without a ``policy`` a :class:`~jbptt.unroll.Scan`: a cell with a fused path (:mod:`jbptt.fused`) runs it on
      each segment (the fused Elman layer of a reverse-mode-only unroll then stores only the segment's carries).
      With a ``policy``, a plain scan function.
    """
    if k is not None and k < 1:
        raise ValueError(f"every_k: k must be >= 1, got {k}")
    return _segmented_schedule(lambda T: every_k_lengths(T, k), policy)


def sqrt(policy: str | Callable | None = None) -> ScanFn | Scan:
    """:func:`every_k` with ``k = ceil(sqrt(T))`` (and optionally a checkpoint ``policy`` for its steps)."""
    return every_k(None, policy)


def nested(levels: int = 3, k: int | None = None, policy: str | Callable | None = None) -> ScanFn | Scan:
    """``levels``-level checkpointing: segments of ``k^(d-1)``, ``k^(d-2)``, ... steps, each checkpointed and
    recomputed inside its parent's recomputation; O(d T^(1/d)) memory, ~d T evaluations.

    Args:
      levels: number of levels ``d`` (1 = plain scan, 2 = :func:`every_k`).
      k: branching factor; default ``ceil(T^(1/d))``.
      policy: optional checkpoint policy for the innermost steps (see :func:`every_k`; without one a cell's
        fused path runs the innermost segments).
    """
    if levels < 1:
        raise ValueError(f"nested: levels must be >= 1, got {levels}")
    return _segmented_schedule(lambda T: nested_lengths(T, levels, k), policy)
