"""Checkpoint (rematerialisation) schedules for differentiating an unrolled scan.

Every policy is a drop-in replacement for ``lax.scan``, ``scan(body, init, xs, reverse=False, unroll=1) ->
(carry, ys)`` with time-major ``xs`` leaves ``[T, ...]``, so it plugs into :func:`jbptt.unroll.unroll` and
:func:`jbptt.estimators.bptt.bptt` (``scan=``) and into truncated BPTT. None changes the gradient; they trade cell
evaluations (forward recomputation, :mod:`jbptt.remat.cost`) for memory:

============  ====================================================  =====================================
policy        what the gradient keeps                               cell evaluations per gradient
============  ====================================================  =====================================
``none``      every step's residuals (plain ``lax.scan``)           ``T``
``per_step``  each step's carry (+ what a checkpoint policy saves)  ``2T``
``every_k``   a carry every ``k`` steps + one segment's residuals   ``T + k * floor(T / k)``
``nested``    ``d`` levels of ``every_k``                           about ``d T``
``binomial``  ``s`` carries on Griewank's revolve schedule          revolve's minimum
``plan``      carries + runs of full internal states (Gruslys DP)   the minimum within a memory budget
============  ====================================================  =====================================

The package reads top-down: :mod:`~jbptt.remat.schedules` (``lax.scan`` + ``jax.checkpoint``: ``none``,
``per_step``, ``every_k``/``sqrt``, ``nested``, checkpoint policies), :mod:`~jbptt.remat.planner` (numpy:
the :class:`Schedule` type, revolve and the DP), :mod:`~jbptt.remat.executor` (the ``custom_vjp`` running a
``Schedule``: ``binomial``, ``plan``) and :mod:`~jbptt.remat.cost` (predicted evaluations, residual bytes, the
counting cell).

Without a checkpoint policy, ``every_k``, ``sqrt`` and ``nested`` are :class:`jbptt.unroll.Scan` values, so a cell's
fused path (:mod:`jbptt.fused`) runs on their segments: in a reverse-mode-only unroll (the BPTT estimator) the
fused Elman layer stores one carry per step and recomputes nothing in its backward pass, so ``sqrt`` keeps about
``T/k + k`` carries at ``2T`` evaluations (JAX's own rule keeps 3 carries per tanh step). With a checkpoint policy
they scan the cell's step; ``"nonlinearities"`` (:func:`save_nonlinearity_outputs`) cuts a tanh step's residuals
from 3 carries to 2 with no matrix product recomputed. The scan-structured policies are safe under ``jit``,
``grad``, ``vmap`` and ``jvp`` (forward mode not through a ``reverse_mode_only`` fused layer); ``binomial`` and
``plan`` under ``jit``, ``grad`` and ``vmap``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from jbptt.remat.cost import counting_cell, evaluations, residual_bytes
from jbptt.remat.executor import Plan, binomial, plan, plan_scan, schedule_scan
from jbptt.remat.planner import Schedule, binomial_schedule, revolve_evaluations
from jbptt.remat.schedules import checkpoint_policy, every_k, nested, none, per_step, save_nonlinearity_outputs, sqrt
from jbptt.unroll import ScanFn

__all__ = [
    "POLICIES", "Plan", "Schedule", "binomial", "binomial_schedule", "checkpoint_policy", "counting_cell", "every_k",
    "evaluations", "nested", "none", "per_step", "plan", "residual_bytes", "revolve_evaluations",
    "save_nonlinearity_outputs", "scan_from_config", "schedule_scan", "sqrt",
]

POLICIES: dict[str, Callable[..., ScanFn]] = {
    "none": none, "per_step": per_step, "every_k": every_k, "sqrt": sqrt, "nested": nested,
    "binomial": binomial, "plan": plan_scan,
}
"""Policy name -> factory of its scan; the factory's keyword arguments are the policy's config keys."""

_TAKE_CHECKPOINT_POLICY = ("per_step", "every_k", "sqrt", "nested")


def scan_from_config(cfg: Mapping | None) -> ScanFn | None:
    """Builds a scan from a config's ``remat:`` section, e.g. ``{"policy": "sqrt"}``, ``{"policy": "every_k",
    "k": 32}``, ``{"policy": "nested", "levels": 3}``, ``{"policy": "binomial", "slots": 10}``,
    ``{"policy": "plan", "budget": 64, "alpha": 2}`` (budget in carry units), ``{"policy": "per_step",
    "checkpoint_policy": "dots_saveable"}``, ``{"policy": "nested", "levels": 3, "checkpoint_policy":
    "nonlinearities"}`` (``checkpoint_policy`` also applies to the steps of ``every_k``/``sqrt``/``nested``).

    Args:
      cfg: the section as a mapping (only read), or ``None``.

    Returns:
      ``None`` for no section or ``policy: none`` (use ``lax.scan``), else the scan function.
    """
    if cfg is None:
        return None
    if not isinstance(cfg, Mapping):
        raise ValueError(f"remat config must be a mapping with a 'policy' key, got {cfg!r}")
    options = dict(cfg)
    name = options.pop("policy", "none")
    if name not in POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; choose from {sorted(POLICIES)}")
    if name == "none":
        if options:
            raise ValueError(f"remat policy 'none' takes no options, got {sorted(options)}")
        return None
    if name in _TAKE_CHECKPOINT_POLICY and "checkpoint_policy" in options:
        options["policy"] = options.pop("checkpoint_policy")
    try:
        return POLICIES[name](**options)
    except TypeError as e:
        raise ValueError(f"bad options {sorted(options)} for remat policy {name!r}: {e}") from None
