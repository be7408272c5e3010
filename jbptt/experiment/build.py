"""From a :class:`~jbptt.experiment.config.Config` to the pieces of a run: task, cell, loss, estimator, optimizer.

Every builder turns a bad value into one :class:`~jbptt.experiment.config.ConfigError` naming the key, so building
an experiment validates its config before anything is written. :func:`build_model` gives what evaluation and the
closed-form fitters need (task, cell, loss); :func:`build` adds the gradient estimator (with its remat scan) and the
optimizer for the training loop.

Chunked training (``training.chunk: K``): :func:`build_estimator` builds the estimator with ``stateful=True`` so its
state (carry, TBPTT window, RTRL influence) crosses the chunks; an estimator without a ``stateful`` option cannot be
chunked. ``bptt`` chunked is defined: stateful BPTT over each chunk, i.e. TBPTT(K, K). With
``training.stateful_stream: true`` the chunks come from the task's stream (``task.info["stream"]``, e.g.
:func:`jbptt.tasks.text.stream_chunks`).

Precision. ``model.dtype: float64`` needs JAX's ``jax_enable_x64``, which JAX keeps per thread:
:func:`precision` is the scoped switch (``jax.enable_x64``) that :func:`~jbptt.experiment.runner.train`, the ESN fit
and :func:`~jbptt.experiment.compare.run` put around a whole run, since they hand back only host data. Builders
that return JAX functions or arrays for a float64 config (:func:`build`, :func:`build_model`) cannot scope it for
their caller, so they raise a :class:`ConfigError` when x64 is off (use them inside ``with precision("float64"):``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jbptt import cells, ctc, estimators, fused, losses, remat  # noqa: F401  (estimators: registers them all)
from jbptt.batch import batch_and_time
from jbptt.cells import Cell, learned_initial_carry, stack, trainable_mask, with_readout
from jbptt.estimator import ESTIMATORS, GradientEstimator, make_estimator
from jbptt.experiment import translation
from jbptt.experiment.config import Config, ConfigError
from jbptt.tasks import Task, make_task, translate
from jbptt.unroll import SequenceModel, bidirectional, sequence_stack


class Model(NamedTuple):
    """What evaluating a model of ``config`` needs: the task, the cell (core + readout) and the loss."""

    config: Config
    task: Task
    cell: Cell
    loss_fn: Callable


class Experiment(NamedTuple):
    """A :class:`Model` plus what training it by gradients needs (building it validates the config)."""

    config: Config
    task: Task
    cell: Cell
    loss_fn: Callable
    estimator: GradientEstimator
    optimizer: optax.GradientTransformation
    schedule: Callable[[int], Any]


class RunKeys(NamedTuple):
    """The PRNG keys of a run, all derived from ``config.seed`` (``fold_in(key(seed), i)`` in field order)."""

    init: jax.Array  # parameters
    data: jax.Array  # training batches: batch of step s = task.sample(fold_in(data, s))
    dropout: jax.Array
    eval: jax.Array  # validation batches; fold_in(eval, 1) for the test batches
    flow: jax.Array  # the gradient-flow batch
    estimator: jax.Array  # the estimator state's randomness (est.init(..., key=))


def run_keys(seed: int) -> RunKeys:
    """The :class:`RunKeys` of a run with this seed."""
    root = jax.random.key(seed)
    return RunKeys(*(jax.random.fold_in(root, i) for i in range(len(RunKeys._fields))))


# ----------------------------------------------------------------------------------------------------------
# Precision.


def precision(dtype: str):
    """A context manager running its body with ``jax_enable_x64`` on for ``"float64"`` and off otherwise.

    Scoped (thread-local) and restored on exit; sound around code that hands back only host data. Arrays created
    inside stay float64 but are truncated if used after the block with x64 off.
    """
    return jax.enable_x64(dtype == "float64")


def float_dtype(cfg: Config, source: str = "<config>"):
    """``jnp.float64`` or ``jnp.float32`` for ``cfg.model.dtype``.

    Raises:
      ConfigError: ``model.dtype`` is float64 but ``jax_enable_x64`` is off here (see the module docstring).
    """
    if cfg.model.dtype != "float64":
        return jnp.float32
    if not jax.config.jax_enable_x64:
        raise ConfigError("model.dtype", "float64 needs jax_enable_x64: run inside "
                          "`with jbptt.experiment.build.precision('float64'):` (or enable x64 for the process)",
                          source)
    return jnp.float64


# ----------------------------------------------------------------------------------------------------------
# Task, cell, loss.


def build_task(cfg: Config, source: str = "<config>") -> Task:
    """The task of ``cfg.task``, generating data in ``cfg.model.dtype``."""
    float_dtype(cfg, source)
    if "dtype" in cfg.task.options:
        raise ConfigError("task.options.dtype", "the data's dtype is model.dtype (float32 or float64); set that "
                          "instead", source)
    try:
        return make_task(cfg.task.name, dtype=cfg.model.dtype, **cfg.task.options)
    except (TypeError, ValueError, ImportError) as e:
        raise ConfigError("task.options", f"task {cfg.task.name!r}: {e}", source) from None


def build_cell(cfg: Config, output_size: int, source: str = "<config>") -> Cell | SequenceModel:
    """The model of ``cfg.model``: ``layers`` cells (stacked), a linear readout to ``output_size``, optionally a
    learned initial carry. ``model.fused: auto`` builds each layer with :func:`jbptt.fused.cell` (fused where a
    fused layer exists), ``none``/``false`` with the plain :data:`jbptt.cells.CELLS`. With ``model.bidirectional``
    (all layers, or a list per layer) it is a :func:`jbptt.unroll.sequence_stack` of bidirectional layers (a forward
    and a backward cell of ``hidden`` units each) and plain ones, with the readout: a whole-sequence model that only
    ``bptt`` trains."""
    m = cfg.model
    make = fused.cell if m.fused in ("auto", True) else lambda name, hidden, **kw: cells.CELLS[name](hidden, **kw)
    dtype = float_dtype(cfg, source)
    bi = m.bidirectional if isinstance(m.bidirectional, list) else [m.bidirectional] * m.layers
    try:
        layers = [make(m.cell, m.hidden, dtype=dtype, **m.options) for _ in range(m.layers)]
        backward = [make(m.cell, m.hidden, dtype=dtype, **m.options) if b else None for b in bi]
    except (TypeError, ValueError) as e:
        raise ConfigError("model.options", f"cell {m.cell!r}: {e}", source) from None
    if any(bi):  # a whole-sequence model: bidirectional layers read the whole sequence
        for key, bad in (("model.dropout", m.dropout > 0), ("model.residual", m.residual),
                         ("model.learned_initial_carry", m.learned_initial_carry),
                         ("remat.policy", cfg.remat.policy != "none")):
            if bad:
                raise ConfigError(key, "is not available with model.bidirectional (a stack of bidirectional "
                                  "layers); turn one of them off", source)
        return sequence_stack([layer if b is None else bidirectional(layer, b)
                               for layer, b in zip(layers, backward, strict=True)], output_size)
    one = len(layers) == 1 and m.dropout == 0
    core = layers[0] if one else stack(layers, residual=m.residual, dropout_rate=m.dropout)
    cell = with_readout(core, output_size)
    return learned_initial_carry(cell) if m.learned_initial_carry else cell


def build_model(cfg: Config, source: str = "<config>") -> Model:
    """Task, cell and loss of ``cfg``; every config problem raises :class:`ConfigError`."""
    task = build_task(cfg, source)
    if task.loss == "seq2seq":  # an encoder-decoder (jbptt.experiment.translation)
        cell = translation.seq2seq_model(cfg, task, float_dtype(cfg, source), source)
    else:
        cell = build_cell(cfg, task.output_size, source)
    return Model(cfg, task, cell, task_loss(task))


def task_loss(task: Task):
    """The loss the task names: a per-step loss of :data:`jbptt.losses.LOSSES`, or ``"ctc"``: the whole-sequence
    CTC loss (:func:`jbptt.ctc.ctc_sequence_loss`, nats per valid frame), which only whole-sequence estimators
    (``bptt``) take; ``"seq2seq"``: the token cross-entropy of teacher-forced logits
    (:data:`jbptt.tasks.translate.seq2seq_loss`), also whole-sequence."""
    if task.loss == "seq2seq":
        return translate.seq2seq_loss
    if task.loss == "ctc":
        return ctc.ctc_sequence_loss(blank_id=task.info.get("blank", ctc.BLANK))
    return losses.get_loss(task.loss)


# ----------------------------------------------------------------------------------------------------------
# Optimizer.


def build_schedule(cfg: Config, source: str = "<config>"):
    """The optax learning-rate schedule of ``cfg.optimizer`` over ``cfg.training.steps``."""
    o, steps = cfg.optimizer, cfg.training.steps
    if o.schedule == "constant":
        return optax.constant_schedule(o.lr)
    if o.schedule == "cosine":
        return optax.cosine_decay_schedule(o.lr, steps, alpha=o.end_lr_fraction)
    if o.warmup_steps >= steps:
        raise ConfigError("optimizer.warmup_steps", f"must be < training.steps ({steps}), got {o.warmup_steps}", source)
    if o.schedule == "warmup":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, o.lr, o.warmup_steps), optax.constant_schedule(o.lr)], [o.warmup_steps])
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, steps, end_value=o.lr * o.end_lr_fraction)


def penalties(l1: float, l2: float) -> optax.GradientTransformation:
    """Adds the gradient of ``l1 * |p|_1 + l2 / 2 * |p|^2`` to the updates (put it first in a chain)."""

    def update(updates, state, params):
        return jax.tree.map(lambda g, p: g + l2 * p + l1 * jnp.sign(p), updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


OPTIMIZERS = {"sgd": optax.sgd, "momentum": optax.sgd, "nesterov": optax.sgd, "adam": optax.adam,
              "adamw": optax.adamw, "adagrad": optax.adagrad, "adadelta": optax.adadelta, "rmsprop": optax.rmsprop}
"""The optax constructor of every ``optimizer.name``."""


def build_optimizer(cfg: Config, params, source: str = "<config>"):
    """``(optimizer, schedule)`` for ``cfg.optimizer``; parameters under a ``"fixed"`` key are never updated.

    Args:
      params: the parameters (arrays or ``jax.ShapeDtypeStruct``; only the structure is read).
    """
    o = cfg.optimizer
    schedule = build_schedule(cfg, source)
    kwargs = dict(o.options)
    if o.name in ("momentum", "nesterov"):
        kwargs.setdefault("momentum", o.momentum)
        kwargs["nesterov"] = o.name == "nesterov"
    if o.name == "adamw":
        kwargs["weight_decay"] = o.weight_decay
    try:
        base = OPTIMIZERS[o.name](schedule, **kwargs)
    except TypeError as e:
        raise ConfigError("optimizer.options", f"optimizer {o.name!r}: {e}", source) from None
    chain = []
    if o.l1 or o.l2:
        chain.append(penalties(o.l1, o.l2))
    if o.weight_decay and o.name != "adamw":
        chain.append(optax.add_decayed_weights(o.weight_decay))
    if o.clip_value is not None:
        chain.append(optax.clip(o.clip_value))
    if o.clip_norm is not None:
        chain.append(optax.clip_by_global_norm(o.clip_norm))
    opt = optax.chain(*chain, base)
    mask = trainable_mask(params)
    if not all(jax.tree.leaves(mask)):
        labels = jax.tree.map(lambda t: "train" if t else "fixed", mask)
        opt = optax.multi_transform({"train": opt, "fixed": optax.set_to_zero()}, labels)
    if cfg.training.on_nan == "skip":
        opt = optax.apply_if_finite(opt, max_consecutive_errors=2**30)
    return opt, schedule


# ----------------------------------------------------------------------------------------------------------
# Estimator.


def build_estimator(cfg: Config, cell: Cell, loss_fn, source: str = "<config>") -> GradientEstimator:
    """The registered gradient estimator of ``cfg.estimator``, with the remat scan of ``cfg.remat`` if any, and
    ``stateful=True`` when ``training.chunk`` is set (see the module docstring)."""
    e = cfg.estimator
    options = dict(e.options)
    if cfg.training.chunk is not None and e.name in ESTIMATORS:
        params = inspect.signature(ESTIMATORS[e.name]).parameters
        if "stateful" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise ConfigError("training.chunk", f"estimator {e.name!r} has no stateful option, so its state cannot "
                              "cross chunks; leave training.chunk unset", source)
        if options.get("stateful", True) is not True:
            raise ConfigError("estimator.options.stateful", "training.chunk needs a stateful estimator (its state "
                              "crosses the chunks); leave the option out, it is set to true", source)
        options["stateful"] = True
    if cfg.remat.policy != "none":
        try:
            options["scan"] = remat.scan_from_config({"policy": cfg.remat.policy, **cfg.remat.options})
        except (TypeError, ValueError) as err:
            raise ConfigError("remat", str(err), source) from None
    try:
        return make_estimator(e.name, cell, loss_fn, **options)
    except TypeError as err:
        raise ConfigError("estimator.options", f"estimator {e.name!r}: {err}", source) from None
    except ValueError as err:
        path = "estimator.name" if "unknown estimator" in str(err) else "estimator.options"
        raise ConfigError(path, str(err), source) from None


def build(cfg: Config, source: str = "<config>") -> Experiment:
    """Builds task, cell, loss, estimator and optimizer; every config problem raises :class:`ConfigError`."""
    model = build_model(cfg, source)
    check_chunking(cfg, model.task, source)
    estimator = build_estimator(cfg, model.cell, model.loss_fn, source)
    try:  # concrete: some inits use numpy; a bad option value (forget_bias: abc) fails here
        params = model.cell.init(jax.random.key(0), model.task.input_size)
    except (TypeError, ValueError) as e:
        raise ConfigError("model.options", f"cell {cfg.model.cell!r}: {type(e).__name__}: {e}", source) from None
    optimizer, schedule = build_optimizer(cfg, params, source)
    dry_run_optimizer(cfg, optimizer, params, source)
    return Experiment(*model, estimator, optimizer, schedule)


def dry_run_optimizer(cfg: Config, optimizer, params, source: str = "<config>") -> None:
    """Traces one ``init`` + ``update`` of ``optimizer`` on ``params`` (abstractly, with ``jax.eval_shape``), so
    an option value optax accepts at construction but cannot use (``b1: abc``) is a :class:`ConfigError` before
    anything is written."""
    try:
        jax.eval_shape(lambda p: optimizer.update(p, optimizer.init(p), p), params)
    except (TypeError, ValueError) as e:
        raise ConfigError("optimizer.options", f"optimizer {cfg.optimizer.name!r}: {type(e).__name__}: {e}",
                          source) from None


# ----------------------------------------------------------------------------------------------------------
# Chunks and streams.


class Stream(NamedTuple):
    """A split of a task's data read as ``rows`` parallel streams, cut into consecutive chunks of ``length`` steps:
    the final carry of chunk ``k`` is the right initial carry of chunk ``k + 1``.

    Attributes:
      rows: the number of parallel streams (the batch size ``B``).
      length: the chunk length ``K``.
      n_chunks: the chunks in one pass over the split.
      chunk: ``chunk(k) -> Batch`` with leaves ``[rows, length, ...]`` for ``0 <= k < n_chunks`` (``k`` may be traced;
        jittable).
    """

    rows: int
    length: int
    n_chunks: int
    chunk: Callable


def build_stream(cfg: Config, task: Task, split: str, rows: int, source: str = "<config>") -> Stream:
    """The :class:`Stream` of ``split`` in chunks of ``training.chunk`` steps (``training.stateful_stream``).

    Raises:
      ConfigError: the task provides no stream, or the split is too short for ``rows`` streams of such chunks.
    """
    stream = task.info.get("stream")
    if stream is None:
        raise ConfigError("training.stateful_stream", f"task {task.name!r} provides no stream (no info['stream'], "
                          "as the chars task has)", source)
    try:
        return Stream(rows, cfg.training.chunk, *stream(rows, cfg.training.chunk, split))
    except ValueError as e:
        raise ConfigError("training.chunk", str(e), source) from None


def sequence_length(task: Task) -> int:
    """The length ``T`` of the task's training sequences (read abstractly, nothing is sampled)."""
    shape = jax.eval_shape(lambda k: task.sample(k, 1, "train"), jax.random.key(0))
    return batch_and_time(shape.inputs)[1]


def chunks_per_sequence(cfg: Config, task: Task) -> int:
    """Optimizer steps per batch of sequences: ``ceil(T / training.chunk)`` (1 without chunks; every step reads
    the next chunk of the stream with ``training.stateful_stream``)."""
    t = cfg.training
    return 1 if t.chunk is None or t.stateful_stream else math.ceil(sequence_length(task) / t.chunk)


def check_chunking(cfg: Config, task: Task, source: str = "<config>") -> None:
    """Raises :class:`ConfigError` for an impossible ``training.chunk`` / ``training.stateful_stream``: a stream
    without a chunk length, a task without a stream, a chunk longer than the task's sequences or its stream, a
    whole-sequence model (bidirectional) or loss (ctc) in chunks."""
    t, bi = cfg.training, cfg.model.bidirectional
    if t.chunk is not None and (any(bi) if isinstance(bi, list) else bi):
        raise ConfigError("training.chunk", "a model with model.bidirectional reads whole sequences; it cannot be "
                          "trained in chunks", source)
    if t.chunk is not None and task.loss == "ctc":
        raise ConfigError("training.chunk", f"task {task.name!r} has a whole-sequence loss (ctc); it cannot be "
                          "trained in chunks", source)
    if t.chunk is None:
        if t.stateful_stream:
            raise ConfigError("training.stateful_stream", "needs training.chunk (the length of the chunks the "
                              "stream is read in)", source)
        return
    if t.stateful_stream:
        build_stream(cfg, task, "train", t.batch_size, source)
        build_stream(cfg, task, "val", t.eval_batch_size, source)
        return
    T = sequence_length(task)
    if t.chunk > T:
        raise ConfigError("training.chunk", f"must be <= the task's sequence length T = {T}, got {t.chunk}", source)
