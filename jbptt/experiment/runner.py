"""The experiment runner: a :class:`~jbptt.experiment.config.Config` in, a trained model and a run folder out.

:func:`train` is what ``jbptt run`` calls, and experiment scripts can call it in-process::

    from jbptt.experiment.config import load_config
    from jbptt.experiment.runner import train
    summary = train(load_config("configs/quickstart.yaml", ["training.steps=200"]), run_dir="runs/q")

A run folder holds ``config.yaml`` (the resolved config: enough to re-run), ``metrics.jsonl`` (one JSON object
per
line: ``split`` "train" lines with ``step``, ``loss`` and ``grad_norm`` averaged over the logging interval,
``lr`` and ``time``; ``split`` "val" lines with the task's metrics), ``summary.json`` (status, final and best
metrics, run time, machine), ``gradient_flow.json`` (``||dL/dh_t||`` against ``t`` at the start and the end),
``checkpoints/last.msgpack`` (+ ``best.msgpack``) and PNG plots.

Reproducibility: the batch of step ``s`` is ``task.sample(fold_in(data_key, s))`` and every other random
choice
is derived from ``config.seed`` too, so a run is a pure function of its config, and a run killed at any point
and
resumed from its last checkpoint (``train(..., resume=True)``) logs the same metrics bit for bit (apart from
``time``).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jbptt import checkpoint as ckpt
from jbptt import diagnostics, fused, losses
from jbptt.cells import Cell, learned_initial_carry, stack, trainable_mask, with_readout
from jbptt.estimator import GradientEstimator, make_estimator
from jbptt.experiment.config import Config, ConfigError, dump_config
from jbptt.tasks import Task, make_task
from jbptt.train import init_train_state, make_train_step
from jbptt.unroll import unroll, with_step_keys

STATUS_EXIT_CODES = {"completed": 0, "early_stopped": 0, "halted_nan": 1}


class Experiment(NamedTuple):
    """Everything built from a config before any file is written (building it validates the config)."""

    config: Config
    task: Task
    cell: Cell
    loss_fn: Callable
    estimator: GradientEstimator | None  # None for ``estimator: esn`` (closed-form readout)
    optimizer: optax.GradientTransformation
    schedule: Callable[[int], Any]


# ----------------------------------------------------------------------------------------------------------
# Building the pieces.


def _optional_module(name: str, key: str, what: str, source):
    """Imports ``name`` (through sys.modules first, so tests may stand it in) or raises a ConfigError for ``key``."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError(key, f"{what} needs {name}, which this installation does not have", source) from None


def _dtype(cfg: Config):
    if cfg.model.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
        return jnp.float64
    return jnp.float32


def build_cell(cfg: Config, output_size: int, source: str = "<config>") -> Cell:
    """The model of ``cfg.model``: stacked cells, a linear readout to ``output_size``, optional learned
    carry."""
    m = cfg.model
    try:
        layers = [fused.cell(m.cell, m.hidden, dtype=_dtype(cfg), **m.options) for _ in range(m.layers)]
    except (TypeError, ValueError) as e:
        raise ConfigError("model.options", f"cell {m.cell!r}: {e}", source) from None
    core = (
        layers[0] if len(layers) == 1 and m.dropout == 0 else stack(layers, residual=m.residual, dropout_rate=m.dropout)
    )
    cell = with_readout(core, output_size)
    return learned_initial_carry(cell) if m.learned_initial_carry else cell


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
            [optax.linear_schedule(0.0, o.lr, o.warmup_steps), optax.constant_schedule(o.lr)],
            [o.warmup_steps],
        )
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, steps, end_value=o.lr * o.end_lr_fraction)


def penalties(l1: float, l2: float) -> optax.GradientTransformation:
    """Adds the gradient of ``l1 * |p|_1 + l2 / 2 * |p|^2`` to the updates (put it first in a chain)."""

    def update(updates, state, params):
        return jax.tree.map(lambda g, p: g + l2 * p + l1 * jnp.sign(p), updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def build_optimizer(cfg: Config, params, source: str = "<config>"):
    """``(optimizer, schedule)`` for ``cfg.optimizer``; parameters under a ``"fixed"`` key are never
    updated."""
    o = cfg.optimizer
    schedule = build_schedule(cfg, source)
    ctor = {
        "sgd": optax.sgd,
        "momentum": optax.sgd,
        "nesterov": optax.sgd,
        "adam": optax.adam,
        "adamw": optax.adamw,
        "adagrad": optax.adagrad,
        "adadelta": optax.adadelta,
        "rmsprop": optax.rmsprop,
    }[o.name]
    kwargs = dict(o.options)
    if o.name in ("momentum", "nesterov"):
        kwargs.setdefault("momentum", o.momentum)
        kwargs["nesterov"] = o.name == "nesterov"
    if o.name == "adamw":
        kwargs["weight_decay"] = o.weight_decay
    try:
        base = ctor(schedule, **kwargs)
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


def build_estimator(cfg: Config, cell: Cell, loss_fn, source: str = "<config>") -> GradientEstimator | None:
    """The gradient estimator of ``cfg.estimator`` (``None`` for ``esn``), with the remat scan if
    configured."""
    e = cfg.estimator
    if e.name == "esn":
        from jbptt.experiment.esn import check_esn_config

        check_esn_config(cfg, source)
        return None
    options = dict(e.options)
    if cfg.remat.policy != "none":
        remat = _optional_module("jbptt.remat", "remat.policy", f"policy {cfg.remat.policy!r}", source)
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
    try:
        task = make_task(cfg.task.name, dtype=cfg.model.dtype, **cfg.task.options)
    except (TypeError, ValueError, ImportError) as e:
        raise ConfigError("task.options", f"task {cfg.task.name!r}: {e}", source) from None
    cell = build_cell(cfg, task.output_size, source)
    loss_fn = losses.get_loss(task.loss)
    estimator = build_estimator(cfg, cell, loss_fn, source)
    params = (
        jax.eval_shape(lambda: cell.init(jax.random.key(0), task.input_size))
        if cfg.model.cell != "esn"
        else cell.init(jax.random.key(0), task.input_size)
    )
    optimizer, schedule = build_optimizer(cfg, params, source)
    return Experiment(cfg, task, cell, loss_fn, estimator, optimizer, schedule)


# ----------------------------------------------------------------------------------------------------------
# Evaluation.


def make_eval_fn(exp: Experiment):
    """A jitted ``eval_fn(params, batch) -> dict`` of the task's metrics plus ``loss`` on one batch."""

    @jax.jit
    def eval_fn(params, b):
        _, ys = unroll(exp.cell, params, b.inputs, seq_lengths=b.seq_lengths, resets=b.resets)
        m = dict(exp.task.metrics(ys, b))
        m.setdefault("loss", losses.sequence_loss(exp.loss_fn, ys, b.targets, b.weights(ys.dtype)))
        return m

    return eval_fn


def make_evaluator(exp: Experiment, split: str, batch_size: int, n_batches: int, key, eval_fn=None):
    """``evaluate(params) -> dict`` of the task's metrics (and ``loss``) averaged over ``n_batches`` fixed
    batches of ``split`` (sampled once from ``key``). Evaluators sharing ``eval_fn`` share its compilation."""
    eval_fn = eval_fn or make_eval_fn(exp)
    batches = [exp.task.sample(jax.random.fold_in(key, i), batch_size, split) for i in range(n_batches)]

    def evaluate(params):
        ms = [jax.device_get(eval_fn(params, b)) for b in batches]
        return {name: float(np.mean([m[name] for m in ms])) for name in sorted(ms[0])}

    return evaluate


def make_gradient_flow(exp: Experiment, key, batch_size: int):
    """``flow(params) -> list`` of ``||dL/dh_t||`` for every step ``t`` on a fixed validation batch."""
    b = exp.task.sample(key, batch_size, "val")
    norms = jax.jit(lambda p: diagnostics.state_gradient_norms(exp.cell, exp.loss_fn, p, b))
    return lambda params: [float(x) for x in np.asarray(norms(params))]


# ----------------------------------------------------------------------------------------------------------
# Run folders.


def new_run_dir(cfg: Config) -> str:
    """``<logging.root>/<logging.name>-<YYYYmmdd-HHMMSS>`` (with a numeric suffix if it exists)."""
    base = os.path.join(cfg.logging.root, f"{cfg.logging.name or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}")
    path, k = base, 1
    while os.path.exists(path):
        k += 1
        path = f"{base}-{k}"
    return path


def read_metrics(run_dir: str) -> list[dict]:
    """The records of ``metrics.jsonl`` in a run folder."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_metrics(run_dir: str, last_step: int) -> None:
    """Drops the records logged after ``last_step`` (written after the checkpoint a run resumes from)."""
    keep = [r for r in read_metrics(run_dir) if r["step"] <= last_step]
    ckpt.atomic_write(os.path.join(run_dir, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in keep))


def machine_info() -> dict:
    """A short description of the machine (for results tables)."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "python": platform.python_version(),
        "jax": jax.__version__,
    }


class Progress:
    """A one-line progress bar on stderr: step, loss, steps/s and ETA (``quiet`` turns it off)."""

    def __init__(self, total: int, start: int, quiet: bool):
        self.total, self.start, self.quiet = total, start, quiet
        self.t0 = self.last = time.monotonic()
        self.first = start + 1  # the rate is measured from the first (compiled) step on

    def update(self, step: int, loss: float, force: bool = False):
        now = time.monotonic()
        if step == self.first:
            self.t0, self.start = now, step
        if self.quiet or (not force and now - self.last < 0.25):
            return
        self.last = now
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        eta_s = "?" if not math.isfinite(eta) else f"{int(eta) // 60}:{int(eta) % 60:02d}"
        sys.stderr.write(f"\rstep {step}/{self.total}  loss {loss:.4g}  {rate:.1f} steps/s  ETA {eta_s}   ")
        sys.stderr.flush()

    def close(self):
        if not self.quiet:
            sys.stderr.write("\n")
            sys.stderr.flush()


class _Signals:
    """Turns SIGINT/SIGTERM into a flag the training loop checks after every step (main thread only)."""

    def __init__(self):
        self.received = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------------------
# Training.


class _Loop(NamedTuple):
    init: Callable  # init(params, carry) -> state
    place: Callable  # host TrainState -> state
    step: Callable  # step(state, batch) -> (state, metrics)
    gather: Callable  # state -> host TrainState


def _prepare_state(exp: Experiment, make_batch):
    """``prepare(est_state, carry) -> est_state`` fixing the estimator state's structure from the start, or None.

    TBPTT with ``k2 > k1`` allocates its replay window on its first update; priming it up front keeps one
    structure for checkpoints and for the data-parallel layout (:mod:`jbptt.parallel`)."""
    if exp.config.estimator.name != "tbptt":
        return None
    from jbptt.estimators.tbptt import prime_state

    inputs = jax.eval_shape(make_batch, jnp.asarray(0, jnp.int32)).inputs

    def prepare(state, carry):
        B = jax.tree.leaves(carry)[0].shape[0]
        return prime_state(state, jax.tree.map(lambda a: jnp.zeros((B,) + a.shape[1:], a.dtype), inputs))

    return prepare


def _make_loop(exp: Experiment, params, carry, make_batch, source: str, prepare=None) -> _Loop:
    """Training-loop functions; ``step(state, i)`` trains on ``make_batch(i)`` (fused into one jit call on one
    device)."""
    p = exp.config.parallel
    if p.mode == "none":
        train_step = make_train_step(exp.estimator, exp.optimizer)
        step = jax.jit(lambda state, i: train_step(state, make_batch(i)))
        return _Loop(
            lambda pr, c: init_train_state(exp.estimator, exp.optimizer, pr, c),
            lambda s: s,
            step,
            lambda s: s,
        )
    parallel = _optional_module("jbptt.parallel", "parallel.mode", f"mode {p.mode!r}", source)
    try:
        dp = parallel.data_parallel(exp.estimator, exp.optimizer, params, carry, mode=p.mode, devices=p.devices,
                                    **({"prepare": prepare} if prepare is not None else {}))
    except ValueError as e:
        raise ConfigError("parallel", str(e), source) from None
    # In a multi-process run each process feeds only its own rows of the global batch.
    rows = parallel.process_rows(exp.config.training.batch_size) if jax.process_count() > 1 else slice(None)
    batch_fn = jax.jit(lambda i: jax.tree.map(lambda a: a[rows], make_batch(i)))
    return _Loop(dp.init, dp.place, lambda state, i: dp.step(state, batch_fn(i)), dp.gather)


def start_processes(cfg: Config) -> bool:
    """Starts multi-process JAX (``jax.distributed``) when ``cfg.parallel`` or the environment asks for
    several processes; call before anything touches a device. Returns True in a multi-process run."""
    p = cfg.parallel
    n = p.num_processes if p.num_processes is not None else int(os.environ.get("JAX_NUM_PROCESSES") or 1)
    if p.mode == "none" or n <= 1:
        return False
    from jbptt import parallel

    return parallel.maybe_initialize_distributed(p.coordinator_address, n, p.process_id)


def _runner_state(data_key, elapsed=0.0):
    """The runner's own bookkeeping, checkpointed with the train state."""
    return {
        "data_key": jax.random.key_data(data_key),
        "best": np.float64(np.nan),
        "best_step": np.int64(-1),
        "bad_evals": np.int64(0),
        "log_sum": np.zeros(2, np.float64),
        "log_count": np.int64(0),
        "skipped": np.int64(0),
        "elapsed": np.float64(elapsed),
    }


def load_run(run_dir: str, which: str = "last"):
    """Loads a run folder for analysis: ``(config, experiment, state)``.

    ``which="last"`` returns the last checkpoint's :class:`~jbptt.train.TrainState` (``state.params``,
    ``state.step``, ...); ``which="best"`` returns the parameters with the best validation metric.
    Raises :class:`~jbptt.checkpoint.CheckpointError` for a missing, corrupt or mismatched checkpoint.
    """
    from jbptt.experiment.config import load_config

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise ckpt.CheckpointError(f"{run_dir} is not a run folder (no config.yaml)")
    cfg = load_config(path)
    exp = build(cfg, path)
    params = exp.cell.init(jax.random.key(0), exp.task.input_size)
    if which == "best":
        return cfg, exp, ckpt.load(os.path.join(run_dir, "checkpoints", "best.msgpack"), params)
    if exp.estimator is None:
        raise ckpt.CheckpointError(f"{run_dir} is an ESN run: it has only the best.msgpack checkpoint")
    carry = exp.cell.initial_carry(params, (cfg.training.batch_size,))
    state = init_train_state(exp.estimator, exp.optimizer, params, carry)
    target = (state, _runner_state(jax.random.key(0)), params)
    state, _, _ = ckpt.load(os.path.join(run_dir, "checkpoints", "last.msgpack"), target)
    return cfg, exp, state


def train(
    cfg: Config,
    run_dir: str | None = None,
    *,
    resume: bool = False,
    quiet: bool = True,
    source: str = "<config>",
) -> dict:
    """Trains the model of ``cfg`` and returns the run's summary (also written to ``summary.json``).

    Args:
      cfg: a validated :class:`~jbptt.experiment.config.Config`.
      run_dir: the run folder (default: a new ``<root>/<name>-<timestamp>``). With ``resume=True`` it must
      hold a
        run: its checkpoint is restored and training continues (``cfg`` should be the run's ``config.yaml``).
      quiet: no progress bar on stderr.
      source: the config's file name, for error messages.

    Returns:
      The summary dict: ``status`` (``completed``, ``early_stopped``, ``halted_nan`` or ``interrupted``),
      ``steps``, ``final`` and ``best`` metrics, ``wall_time_s`` and more.

    Raises:
      ConfigError: before anything is written, for any problem with the config.
      CheckpointError: when resuming from a missing, corrupt or mismatched checkpoint.
    """
    start_processes(cfg)
    main = jax.process_index() == 0  # only process 0 writes files in a multi-process run
    exp = build(cfg, source)
    if exp.estimator is None:
        from jbptt.experiment.esn import fit_esn

        return fit_esn(exp, run_dir or new_run_dir(cfg), quiet=quiet)
    t, lg = cfg.training, cfg.logging
    root = jax.random.key(cfg.seed)
    init_key, data_key, dropout_key, eval_key, flow_key = (jax.random.fold_in(root, i) for i in range(5))
    params = exp.cell.init(init_key, exp.task.input_size)
    carry = exp.cell.initial_carry(params, (t.batch_size,))
    dropout = cfg.model.dropout > 0

    def make_batch(step):
        """The training batch of step ``step`` (a pure function of the seed and the step)."""
        b = exp.task.sample(jax.random.fold_in(data_key, step), t.batch_size, "train")
        if dropout:
            b = b._replace(inputs=with_step_keys(b.inputs, jax.random.fold_in(dropout_key, step)))
        return b

    prepare = _prepare_state(exp, make_batch)
    loop = _make_loop(exp, params, carry, make_batch, source, prepare)

    if resume:
        if run_dir is None or not os.path.exists(os.path.join(run_dir, "config.yaml")):
            raise ckpt.CheckpointError(f"{run_dir} is not a run folder (no config.yaml)")
    elif main:
        run_dir = run_dir or new_run_dir(cfg)
        if os.path.exists(os.path.join(run_dir, "config.yaml")):
            raise ConfigError(
                "--run-dir",
                f"{run_dir} already holds a run; continue it with --resume or choose another folder",
                "<command line>",
            )
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        ckpt.atomic_write(os.path.join(run_dir, "config.yaml"), dump_config(cfg))
        ckpt.atomic_write(os.path.join(run_dir, "metrics.jsonl"), "")
    run_dir = run_dir or new_run_dir(cfg)
    last_path = os.path.join(run_dir, "checkpoints", "last.msgpack")
    best_path = os.path.join(run_dir, "checkpoints", "best.msgpack")
    flow_path = os.path.join(run_dir, "gradient_flow.json")

    host_state = init_train_state(exp.estimator, exp.optimizer, params, carry)
    if prepare is not None:
        host_state = host_state._replace(est_state=prepare(host_state.est_state, carry))
    rs = _runner_state(data_key)
    best_params = params
    if resume:
        host_state, rs, best_params = ckpt.load(last_path, (host_state, rs, best_params))
        if not np.array_equal(rs["data_key"], jax.random.key_data(data_key)):
            raise ckpt.CheckpointError(f"checkpoint {last_path} was written by a run with another seed")
        if main:
            _truncate_metrics(run_dir, int(host_state.step))
    state = loop.place(host_state)
    start = int(host_state.step)

    flows = {}
    flow = make_gradient_flow(exp, flow_key, lg.gradient_flow_batch) if lg.gradient_flow else None
    if lg.gradient_flow:
        if resume and os.path.exists(flow_path):
            with open(flow_path) as f:
                flows = json.load(f)
        if "start" not in flows and main:
            flows["start"] = {
                "step": 0,
                "norms": flow(params),
            }
            ckpt.atomic_write(flow_path, json.dumps(flows))

    eval_fn = make_eval_fn(exp)
    evaluate = make_evaluator(exp, "val", t.eval_batch_size, t.eval_batches, eval_key, eval_fn)
    metrics_file = open(os.path.join(run_dir, "metrics.jsonl") if main else os.devnull, "a")
    higher = exp.task.higher_is_better
    t0 = time.monotonic() - float(rs["elapsed"])
    status, message = "completed", None
    progress = Progress(t.steps, start, quiet or not main)

    def elapsed():
        return time.monotonic() - t0

    def log(record):
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()

    def save_last(st):
        rs["elapsed"] = np.float64(elapsed())
        host_state = loop.gather(st)  # a collective: every process gathers, process 0 writes
        if main:
            ckpt.save(last_path, (host_state, rs, best_params))

    step = start
    loss = float("nan")
    session_t0 = time.monotonic()
    with _Signals() as signals:
        while step < t.steps:
            new_state, m = loop.step(state, jnp.asarray(step, jnp.int32))
            loss, gnorm = (float(x) for x in jax.device_get((m["loss"], m["grad_norm"])))
            finite = math.isfinite(loss) and math.isfinite(gnorm)
            if not finite and t.on_nan == "halt":
                status = "halted_nan"
                message = (
                    f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'} at step {step + 1} "
                    f"(loss {loss}, gradient norm {gnorm}); run halted, the last checkpoint "
                    f"({last_path}) is left as it was"
                )
                break
            state, step = new_state, step + 1
            if finite:
                rs["log_sum"] = rs["log_sum"] + np.array([loss, gnorm])
                rs["log_count"] = rs["log_count"] + 1
            else:
                rs["skipped"] = rs["skipped"] + 1
            progress.update(step, loss)
            if step % lg.log_every == 0 or step == t.steps:
                n = max(int(rs["log_count"]), 1)
                log(
                    {
                        "step": step,
                        "split": "train",
                        "loss": float(rs["log_sum"][0] / n),
                        "grad_norm": float(rs["log_sum"][1] / n),
                        "lr": float(exp.schedule(step - 1)),
                        "skipped": int(rs["skipped"]),
                        "time": round(elapsed(), 3),
                    }
                )
                rs["log_sum"], rs["log_count"] = np.zeros(2, np.float64), np.int64(0)
            stop = False
            if step % t.eval_every == 0 or step == t.steps:
                host = loop.gather(state)
                vm = evaluate(host.params)
                log({"step": step, "split": "val", **vm, "time": round(elapsed(), 3)})
                value = vm[exp.task.metric]
                best = float(rs["best"])
                improved = math.isnan(best) or (value > best + t.min_delta if higher else value < best - t.min_delta)
                if improved:
                    rs["best"], rs["best_step"], rs["bad_evals"] = (
                        np.float64(value),
                        np.int64(step),
                        np.int64(0),
                    )
                    best_params = host.params
                    if main:
                        ckpt.save(best_path, host.params)
                else:
                    rs["bad_evals"] = rs["bad_evals"] + 1
                    if t.patience is not None and int(rs["bad_evals"]) >= t.patience:
                        status, stop = "early_stopped", True
            if step % t.checkpoint_every == 0 or step == t.steps or stop:
                save_last(state)
            if stop:
                break
            if signals.received is not None:
                save_last(state)
                status = "interrupted"
                name = signal.Signals(signals.received).name
                message = (
                    f"{name} received: checkpoint saved at step {step}; continue with `jbptt run --resume {run_dir}`"
                )
                break
    progress.update(step, loss, force=True)
    progress.close()
    metrics_file.close()

    summary = {
        "name": lg.name,
        "run_dir": run_dir,
        "status": status,
        "message": message,
        "steps": step,
        "task": cfg.task.name,
        "metric": exp.task.metric,
        "higher_is_better": higher,
        "estimator": cfg.estimator.name,
        "cell": cfg.model.cell,
    }
    if status == "interrupted":
        summary["signal"] = int(signals.received)
    if status != "halted_nan" and status != "interrupted":
        host = loop.gather(state)  # (after a halt the state may have been donated to the failed step)
        test = make_evaluator(exp, "test", t.eval_batch_size, t.eval_batches, jax.random.fold_in(eval_key, 1), eval_fn)
        summary["final"] = {"val": evaluate(host.params), "test": test(host.params)}
        if int(rs["best_step"]) >= 0:
            summary["best"] = {
                "step": int(rs["best_step"]),
                "val": float(rs["best"]),
                "test": test(best_params),
            }
        if lg.gradient_flow and main:
            flows["end"] = {
                "step": step,
                "norms": flow(host.params),
            }
            ckpt.atomic_write(flow_path, json.dumps(flows))
    records = read_metrics(run_dir) if main else []
    train_recs = [r for r in records if r["split"] == "train"]
    summary["train_loss"] = train_recs[-1]["loss"] if train_recs else None
    summary["skipped_steps"] = int(rs["skipped"])
    summary["wall_time_s"] = round(elapsed(), 2)
    summary["steps_per_s"] = round((step - start) / max(time.monotonic() - session_t0, 1e-9), 2)
    summary["machine"] = machine_info()
    if not main:
        return summary
    ckpt.atomic_write(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=2))
    if lg.plots and status not in ("halted_nan",):
        from jbptt.experiment import plots

        plots.plot_run(run_dir)
    return summary
