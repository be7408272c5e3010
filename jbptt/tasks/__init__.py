"""Offline tasks: data generators that return :class:`jbptt.Batch` objects from a ``jax.random`` key.

Every task is a :class:`Task` built by name with :func:`make_task`::

    task = make_task("adding", length=50)
    batch = task.sample(jax.random.key(0), 64)   # Batch(inputs [64, 50, 2], targets [64, 50, 1], mask)
    cell = cells.with_readout(cells.lstm(64), task.output_size)
    est = make_estimator("bptt", cell, losses.get_loss(task.loss))
    _, ys = unroll(cell, params, batch.inputs)
    task.metrics(ys, batch)                      # {"mse": ...}; task.metric names the headline one

All batches are batch-major (``[B, T, ...]``); ``mask`` is ``[B, T]`` with 1 at the steps that have a target.
``sample(key, batch_size, split)`` is a pure function of its key (the same key gives the same batch, bit for
bit) and is safe under ``jit`` with ``batch_size`` and ``split`` static. The splits ``"train"``, ``"val"`` and
``"test"`` are disjoint for the data sets (digits, text, Mackey-Glass) and use independent key streams for
the generated tasks. Finite data sets return their whole split (in order) when ``batch_size`` is at least its
size.

Registered tasks (see each module for options): ``copy``, ``delayed_recall``, ``adding`` (:mod:`.synthetic`),
``brackets`` (:mod:`.synthetic`), ``digits`` (:mod:`.digits`), ``chars`` (:mod:`.text`), ``mackey_glass``
(:mod:`.mackey_glass`), ``speech_digits`` (:mod:`.speech`, CTC), ``translate`` (:mod:`.translate`, seq2seq).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jbptt.batch import Batch
from jbptt.losses import accuracy, cross_entropy, weighted_mean

SPLITS = ("train", "val", "test")


class Task(NamedTuple):
    """A supervised sequence task.

    Attributes:
      name: registry name.
      input_size: size ``I`` of ``inputs: [B, T, I]``.
      output_size: size ``O`` of the model output the task expects (classes for ``cross_entropy``).
      loss: name of the per-step loss in :data:`jbptt.losses.LOSSES` (``"mse"`` or ``"cross_entropy"``).
      sample: ``sample(key, batch_size, split="train") -> Batch``.
      metrics: ``metrics(ys, batch) -> dict[str, scalar]`` for model outputs ``ys: [B, T, O]``; jittable.
      metric: the headline metric (a key of ``metrics``), used for early stopping and the summary.
      higher_is_better: whether a larger ``metric`` is better.
      info: task-specific extras (e.g. ``vocab`` for text, ``baseline`` for the adding problem).
    """

    name: str
    input_size: int
    output_size: int
    loss: str
    sample: Callable[..., Batch]
    metrics: Callable[[Any, Batch], dict]
    metric: str
    higher_is_better: bool
    info: dict


TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str):
    """Decorator registering ``factory(**options) -> Task`` under ``name``."""

    def decorator(factory):
        TASKS[name] = factory
        return factory

    return decorator


def make_task(name: str, **options) -> Task:
    """Builds a registered task by name; unknown names or options give one clear ``ValueError``."""
    try:
        factory = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}") from None
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"task {name!r} has no option(s) {unknown}; options: {sorted(accepted)}")
    return factory(**options)


def task_options(name: str) -> dict[str, Any]:
    """The options of a registered task with their defaults (``inspect.Parameter.empty`` when required)."""
    return {k: p.default for k, p in inspect.signature(TASKS[name]).parameters.items()}


def check_split(split: str) -> int:
    """Index of ``split`` in :data:`SPLITS`, with a clear error for anything else."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    return SPLITS.index(split)


def split_key(key, split: str):
    """An independent key stream per split for generated tasks."""
    return jax.random.fold_in(key, check_split(split))


def classification_metrics(ys, batch: Batch):
    """``{"loss": cross-entropy (nats), "accuracy"}`` over the masked steps. ``ys: [B, T, C]`` logits."""
    w = batch.weights(ys.dtype)
    return {
        "loss": weighted_mean(cross_entropy(ys, batch.targets), w),
        "accuracy": accuracy(ys, batch.targets, w),
    }


def regression_metrics(ys, batch: Batch):
    """``{"mse", "nrmse"}`` over the masked steps; NRMSE divides by the targets' (masked) std."""
    w = batch.weights(ys.dtype)
    err = weighted_mean(jnp.mean(jnp.square(ys - batch.targets), -1), w)
    mean = weighted_mean(jnp.mean(batch.targets, -1), w)
    var = weighted_mean(jnp.mean(jnp.square(batch.targets - mean), -1), w)
    return {"mse": err, "nrmse": jnp.sqrt(err / jnp.maximum(var, 1e-12))}


def one_hot(ids, n: int, dtype=jnp.float32):
    """``[...]`` integer ids to ``[..., n]`` one-hot vectors."""
    return jax.nn.one_hot(ids, n, dtype=dtype)


def take_rows(key, n_rows: int, batch_size: int):
    """Row indices for a batch from a finite split of ``n_rows``: a random subset without replacement, or
    every row in order when ``batch_size >= n_rows``."""
    if batch_size >= n_rows:
        return jnp.arange(n_rows)
    return jax.random.choice(key, n_rows, (batch_size,), replace=False)


# Import the task modules so that they register themselves.
from jbptt.tasks import digits, mackey_glass, speech, synthetic, text, translate  # noqa: E402

__all__ = [
    "SPLITS",
    "TASKS",
    "Task",
    "classification_metrics",
    "digits",
    "mackey_glass",
    "make_task",
    "register_task",
    "regression_metrics",
    "speech",
    "synthetic",
    "task_options",
    "text",
    "translate",
]
