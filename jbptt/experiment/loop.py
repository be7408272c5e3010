"""The training loop: a config in, a model trained by its gradient estimator and a run folder out.

:func:`train_by_gradient` is what :func:`jbptt.experiment.runner.train` runs for every registered gradient
estimator. It talks only to the protocols: ``estimator.init(params, carry, key=, inputs=)`` once (an example of the
training inputs lets the estimator allocate all its state up front, so the state keeps one structure for
checkpoints and the data-parallel layout), then :func:`jbptt.train.make_train_step` (or :mod:`jbptt.parallel`)
every step.

Segments: with ``training.chunk: K`` every batch ``[B, T]`` is fed in consecutive chunks of ``K`` steps, one
optimizer step per chunk, the (stateful) estimator's state crossing the chunks; with ``training.stateful_stream``
the chunks are consecutive pieces of the task's stream and the state crosses batches too (:func:`batch_fn`). Steps
count optimizer steps, and the data of step ``s`` is a function of ``s``, so the checkpoint (train state with the
estimator state, at its step) is also the stream position. Truncated BPTT over a stream, online RTRL with an update
every ``K`` steps and the comparison's learning curves all run here.

Reproducibility: the batch of step ``s`` is ``task.sample(fold_in(data_key, s))`` and every other random choice is
derived from ``config.seed`` too (:func:`~jbptt.experiment.build.run_keys`), so a run is a pure function of its
config, and a run killed at any point and resumed from its last checkpoint logs the same metrics bit for bit (apart
from ``time``).
"""

from __future__ import annotations

import glob
import json
import math
import os
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jbptt import checkpoint as ckpt
from jbptt import parallel
from jbptt.experiment import plots, rundir
from jbptt.experiment.build import Experiment, RunKeys, build, build_stream, chunks_per_sequence, run_keys
from jbptt.experiment.config import Config, ConfigError
from jbptt.experiment.evaluate import make_eval_fn, make_evaluator, make_gradient_flow, make_stream_evaluator
from jbptt.train import TrainState, init_train_state, make_train_step, sequence_chunk, start_sequences
from jbptt.unroll import with_step_keys

STATUS_EXIT_CODES = {"completed": 0, "early_stopped": 0, "halted_nan": 1}
"""Exit code of ``jbptt run`` per final status (``interrupted``: 128 + the signal number)."""


# ----------------------------------------------------------------------------------------------------------
# Setting up: batches, the initial state, the step function (one device or data-parallel).


class Start(NamedTuple):
    """What a run starts from: the initial parameters and carry, and an example of the training inputs."""

    params: Any
    carry: Any  # the initial carry of the (global) batch, leaves [B, ...]
    inputs: Any  # the inputs of step 0's batch, leaves [B, T, ...]


def batch_fn(exp: Experiment, keys: RunKeys, source: str = "<config>") -> Callable:
    """``make_batch(step) -> Batch``: the training batch of optimizer step ``step`` (a pure function of the seed and
    the step; jittable), with per-step dropout keys attached to the inputs when the model has dropout.

    Without ``training.chunk`` it is batch ``step`` of sequences, ``task.sample(fold_in(data, step))``. With
    ``chunk: K`` it is chunk ``step % n`` of batch ``step // n`` (``n = ceil(T / K)``; the first chunk flags a reset,
    the last is padded and masked). With ``stateful_stream`` it is chunk ``step % n_chunks`` of the task's training
    stream (cycling over the split), so the stream position is a function of the checkpointed step.
    """
    t, dropout = exp.config.training, exp.config.model.dropout > 0

    def with_keys(b, index):
        return b._replace(inputs=with_step_keys(b.inputs, jax.random.fold_in(keys.dropout, index))) if dropout else b

    def sequences(index):
        return with_keys(exp.task.sample(jax.random.fold_in(keys.data, index), t.batch_size, "train"), index)

    if t.chunk is None:
        return sequences
    if t.stateful_stream:
        stream = build_stream(exp.config, exp.task, "train", t.batch_size, source)
        return lambda step: with_keys(stream.chunk(step % stream.n_chunks), step)
    n = chunks_per_sequence(exp.config, exp.task)
    return lambda step: sequence_chunk(start_sequences(sequences(step // n)), t.chunk, step % n)


def start(exp: Experiment, keys: RunKeys, make_batch) -> Start:
    """The run's initial parameters (from ``keys.init``), carry and example inputs."""
    params = exp.cell.init(keys.init, exp.task.input_size)
    carry = exp.cell.initial_carry(params, (exp.config.training.batch_size,))
    return Start(params, carry, jax.jit(make_batch)(0).inputs)  # one compiled program, not op by op


def initial_state(exp: Experiment, keys: RunKeys, s: Start) -> TrainState:
    """The :class:`~jbptt.train.TrainState` at step 0 (host layout)."""
    return init_train_state(exp.estimator, exp.optimizer, s.params, s.carry, key=keys.estimator, inputs=s.inputs)


def bookkeeping(keys: RunKeys) -> dict:
    """The loop's own state, checkpointed with the train state: best metric, patience count, logging sums."""
    return {"data_key": jax.random.key_data(keys.data), "best": np.float64(np.nan), "best_step": np.int64(-1),
            "bad_evals": np.int64(0), "log_sum": np.zeros(2, np.float64), "log_count": np.int64(0),
            "skipped": np.int64(0), "elapsed": np.float64(0.0)}


def checkpoint_template(exp: Experiment, keys: RunKeys, s: Start):
    """The structure of ``last.msgpack``: ``(train state, bookkeeping, best params)`` at step 0."""
    return initial_state(exp, keys, s), bookkeeping(keys), s.params


def dry_run(exp: Experiment, keys: RunKeys, s: Start, make_batch, source: str = "<config>"):
    """The checkpoint template, after the estimator's ``init`` (eagerly) and one training step (abstractly, with
    ``jax.eval_shape``) have run, so an estimator option value that fails only when used is a
    :class:`ConfigError` before anything is written. Errors of a run with no estimator options propagate."""
    step = make_train_step(exp.estimator, exp.optimizer)
    try:
        template = checkpoint_template(exp, keys, s)
        jax.eval_shape(lambda st: step(st, make_batch(0)), template[0])
    except (TypeError, ValueError) as e:
        e_cfg = exp.config.estimator
        if not e_cfg.options:
            raise
        raise ConfigError("estimator.options", f"estimator {e_cfg.name!r}: a training step with these options "
                          f"fails: {type(e).__name__}: {e}", source) from None
    return template


class Loop(NamedTuple):
    """``place(host_state) -> state``, ``step(state, i) -> (state, metrics)`` on batch ``make_batch(i)``,
    ``gather(state) -> host_state`` (a collective in multi-process runs)."""

    place: Callable
    step: Callable
    gather: Callable


def make_loop(exp: Experiment, s: Start, make_batch, source: str = "<config>") -> Loop:
    """The step function of ``cfg.parallel``: one jit call per step (sampling included) on one device, or
    :func:`jbptt.parallel.data_parallel` (each process feeding its own rows of the batch)."""
    p = exp.config.parallel
    if p.mode == "none":
        train_step = make_train_step(exp.estimator, exp.optimizer)
        return Loop(lambda st: st, jax.jit(lambda st, i: train_step(st, make_batch(i))), lambda st: st)
    try:
        dp = parallel.data_parallel(exp.estimator, exp.optimizer, s.params, s.carry, mode=p.mode,
                                    devices=p.devices, inputs=s.inputs)
    except ValueError as e:
        raise ConfigError("parallel", str(e), source) from None
    rows = parallel.process_rows(exp.config.training.batch_size) if jax.process_count() > 1 else slice(None)
    local_batch = jax.jit(lambda i: jax.tree.map(lambda a: a[rows], make_batch(i)))
    return Loop(dp.place, lambda st, i: dp.step(st, local_batch(i)), dp.gather)


# ----------------------------------------------------------------------------------------------------------
# One session of a run (from the start or a checkpoint to the end, a halt or a signal).


@dataclass
class Session:
    """The mutable side of a run: where it writes, what it has seen, the best parameters so far."""

    exp: Experiment
    loop: Loop
    run_dir: str
    main: bool  # process 0: the only one that writes files
    book: dict
    best_params: Any
    evaluate: Callable
    log: rundir.MetricsLog
    t0: float
    saved_step: int | None = None  # the step of checkpoints/last.msgpack (None: not written yet)
    consecutive_skips: int = 0  # steps skipped in a row (on_nan: skip); not checkpointed
    extra_metrics: Callable | None = None  # extra_metrics(step, params) -> dict, logged with each validation

    def kept(self) -> str:
        """What a halted run leaves to resume from, for the halt message."""
        if self.saved_step is None:
            return "no checkpoint has been written, so there is nothing to resume; fix the cause and run again"
        return f"the last checkpoint ({self.path('checkpoints', 'last.msgpack')}, step {self.saved_step}) is left " \
               "as it was"

    def path(self, *parts) -> str:
        return os.path.join(self.run_dir, *parts)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def save_last(self, state) -> None:
        """Checkpoints ``(train state, bookkeeping, best params)`` to ``last.msgpack``; with ``keep_checkpoints``
        N > 1 the previous one becomes ``step-<step>.msgpack`` and only the newest N - 1 of those are kept."""
        self.book["elapsed"] = np.float64(self.elapsed())
        host = self.loop.gather(state)  # a collective: every process gathers, process 0 writes
        last, keep = self.path("checkpoints", "last.msgpack"), self.exp.config.training.keep_checkpoints
        if self.main:
            if keep > 1 and self.saved_step not in (None, int(host.step)) and os.path.exists(last):
                os.replace(last, self.path("checkpoints", f"step-{self.saved_step:08d}.msgpack"))
                for old in older_checkpoints(self.run_dir)[keep - 1:]:
                    os.unlink(old)
            ckpt.save(last, (host, self.book, self.best_params))
        self.saved_step = int(host.step)

    def record(self, loss: float, gnorm: float) -> None:
        """Adds a step's loss and gradient norm to the logging interval (or counts it skipped)."""
        if math.isfinite(loss) and math.isfinite(gnorm):
            self.book["log_sum"] = self.book["log_sum"] + np.array([loss, gnorm])
            self.book["log_count"] = self.book["log_count"] + 1
            self.consecutive_skips = 0
        else:
            self.book["skipped"] = self.book["skipped"] + 1
            self.consecutive_skips += 1

    def log_train(self, step: int) -> None:
        """Writes the ``train`` line of the interval ending at ``step`` and starts a new interval."""
        b = self.book
        n = max(int(b["log_count"]), 1)
        self.log({"step": step, "split": "train", "loss": float(b["log_sum"][0] / n),
                  "grad_norm": float(b["log_sum"][1] / n), "lr": float(self.exp.schedule(step - 1)),
                  "skipped": int(b["skipped"]), "time": round(self.elapsed(), 3)})
        b["log_sum"], b["log_count"] = np.zeros(2, np.float64), np.int64(0)

    def validate(self, state, step: int) -> bool | str:
        """Evaluates, logs a ``val`` line, keeps the best parameters; True when patience has run out, a message
        when a validation metric is NaN/Inf (then nothing is saved)."""
        t, b = self.exp.config.training, self.book
        host = self.loop.gather(state)
        vm = self.evaluate(host.params)
        extra = self.extra_metrics(step, host.params) if self.extra_metrics is not None else {}
        self.log({"step": step, "split": "val", **vm, **extra, "time": round(self.elapsed(), 3)})
        bad = sorted(k for k, v in vm.items() if not math.isfinite(v))
        if bad:
            return f"non-finite validation {', '.join(f'{k} {vm[k]}' for k in bad)} at step {step}; run halted " \
                   f"before saving, {self.kept()}"
        value, best = vm[self.exp.task.metric], float(b["best"])
        higher = self.exp.task.higher_is_better
        if math.isnan(best) or (value > best + t.min_delta if higher else value < best - t.min_delta):
            b["best"], b["best_step"], b["bad_evals"] = np.float64(value), np.int64(step), np.int64(0)
            self.best_params = host.params
            if self.main:
                ckpt.save(self.path("checkpoints", "best.msgpack"), host.params)
            return False
        b["bad_evals"] = b["bad_evals"] + 1
        return t.patience is not None and int(b["bad_evals"]) >= t.patience


class Outcome(NamedTuple):
    """How :func:`run_steps` ended."""

    status: str  # completed, early_stopped, halted_nan or interrupted
    message: str | None
    step: int  # the number of steps taken (the step of the returned state)
    state: Any
    loss: float  # the last step's loss
    signal: int | None = None


def nonfinite(sess: Session, state, step: int, loss: float, gnorm: float) -> Outcome | None:
    """The halt of step ``step + 1`` when its loss or gradient is not finite and ``training.on_nan`` is ``halt``
    (``state``: the state before the step); None otherwise."""
    if math.isfinite(loss) and math.isfinite(gnorm) or sess.exp.config.training.on_nan != "halt":
        return None
    what = "loss" if not math.isfinite(loss) else "gradient"
    return Outcome("halted_nan", f"non-finite {what} at step {step + 1} (loss {loss}, gradient norm {gnorm}); run "
                   f"halted, {sess.kept()}", step, state, loss)


def after_step(sess: Session, state, step: int, loss: float, gnorm: float) -> Outcome | None:
    """The bookkeeping after optimizer step ``step``: records and logs the loss, bounds consecutive skipped steps,
    validates and checkpoints on schedule. Returns the Outcome when the run ends here (a halt or early stopping),
    else None. The vmapped seeds of :mod:`jbptt.experiment.sweep` run the same bookkeeping per seed."""
    t, lg = sess.exp.config.training, sess.exp.config.logging
    sess.record(loss, gnorm)
    last = step == t.steps
    if step % lg.log_every == 0 or last:
        sess.log_train(step)
    if sess.consecutive_skips >= t.max_consecutive_skips:
        return Outcome("halted_nan", f"{sess.consecutive_skips} consecutive steps skipped for a non-finite loss or "
                       f"gradient (training.max_consecutive_skips) up to step {step}; run halted, {sess.kept()}",
                       step, state, loss)
    stop = (step % t.eval_every == 0 or last) and sess.validate(state, step)
    if isinstance(stop, str):
        return Outcome("halted_nan", stop, step, state, loss)
    if step % t.checkpoint_every == 0 or last or stop:
        sess.save_last(state)
    return Outcome("early_stopped", None, step, state, loss) if stop else None


def run_steps(sess: Session, state, step: int, progress: rundir.Progress) -> Outcome:
    """Trains from ``step`` to ``training.steps``: logs, validates, checkpoints (:func:`after_step`); stops early on
    patience, a non-finite loss (``on_nan: halt``) or SIGINT/SIGTERM (after a checkpoint)."""
    t = sess.exp.config.training
    loss = float("nan")
    with rundir.Signals() as signals:
        while step < t.steps:
            new_state, m = sess.loop.step(state, jnp.asarray(step, jnp.int32))
            loss, gnorm = (float(x) for x in jax.device_get((m["loss"], m["grad_norm"])))
            halt = nonfinite(sess, state, step, loss, gnorm)
            if halt is not None:
                return halt
            state, step = new_state, step + 1
            progress.update(step, loss)
            out = after_step(sess, state, step, loss, gnorm)
            if out is not None:
                return out
            if signals.received is not None:
                sess.save_last(state)
                name = signal.Signals(signals.received).name
                return Outcome("interrupted", f"{name} received: checkpoint saved at step {step}; continue with "
                               f"`jbptt run --resume {sess.run_dir}`", step, state, loss, int(signals.received))
    return Outcome("completed", None, step, state, loss)


# ----------------------------------------------------------------------------------------------------------
# The whole run.


def older_checkpoints(run_dir: str) -> list[str]:
    """The ``checkpoints/step-<step>.msgpack`` files kept besides ``last.msgpack``, newest first."""
    return sorted(glob.glob(os.path.join(glob.escape(run_dir), "checkpoints", "step-*.msgpack")), reverse=True)


def restore(run_dir: str, template):
    """The newest checkpoint of ``run_dir`` that loads: ``last.msgpack``, else (with a warning) the newest kept
    ``step-<step>.msgpack``; ``None`` when the run has none (it was stopped before its step-0 checkpoint).

    Raises:
      CheckpointError: checkpoints exist but none loads (the error of the newest).
    """
    paths = [p for p in [os.path.join(run_dir, "checkpoints", "last.msgpack"), *older_checkpoints(run_dir)]
             if os.path.exists(p)]
    errors = []
    for path in paths:
        try:
            restored = ckpt.load(path, template)
        except ckpt.CheckpointError as e:
            errors.append(e)
            continue
        if errors:
            warnings.warn(f"{errors[0]}; resuming from {path} instead", RuntimeWarning, stacklevel=2)
        return restored
    if errors:
        raise errors[0]
    return None


def make_split_evaluator(exp: Experiment, split: str, key, eval_fn, source: str = "<config>") -> Callable:
    """``evaluate(params) -> dict`` on ``split``: ``eval_batches`` fixed batches of whole sequences, or with
    ``training.stateful_stream`` the whole split read as ``eval_batch_size`` streams (carry kept)."""
    t = exp.config.training
    if t.stateful_stream:
        return make_stream_evaluator(exp, build_stream(exp.config, exp.task, split, t.eval_batch_size, source))
    return make_evaluator(exp, split, t.eval_batch_size, t.eval_batches, key, eval_fn)


def train_by_gradient(cfg: Config, run_dir: str | None = None, *, resume: bool = False, quiet: bool = True,
                      source: str = "<config>", overwrite: bool = False, extra_metrics: Callable | None = None) -> dict:
    """Trains the model of ``cfg`` with its gradient estimator; see :func:`jbptt.experiment.runner.train`.

    Needs ``jax_enable_x64`` on for a float64 config (``runner.train`` scopes it). Returns the summary.
    ``extra_metrics(step, params) -> dict`` of floats, if given, is logged with every validation record (the
    comparison's gradient alignment; not checked for NaN, not used for early stopping).
    """
    main = jax.process_index() == 0  # only process 0 writes files in a multi-process run
    exp = build(cfg, source)
    t, lg = cfg.training, cfg.logging
    keys = run_keys(cfg.seed)
    make_batch = batch_fn(exp, keys, source)
    s = start(exp, keys, make_batch)
    loop = make_loop(exp, s, make_batch, source)
    host_state, book, best_params = dry_run(exp, keys, s, make_batch, source)
    if lg.tensorboard and main:
        rundir.check_tensorboard()  # the optional package: a ConfigError before anything is written
    run_dir = rundir.open_run_dir(cfg, run_dir, resume=resume, write=main, overwrite=overwrite)
    restored = restore(run_dir, (host_state, book, best_params)) if resume else None
    if restored is not None:
        host_state, book, best_params = restored
        if not np.array_equal(book["data_key"], jax.random.key_data(keys.data)):
            raise ckpt.CheckpointError(f"the checkpoints of {run_dir} were written by a run with another seed")
    if resume and main:
        rundir.truncate_metrics(run_dir, int(host_state.step))
    first = int(host_state.step)

    flow = make_gradient_flow(exp, keys.flow, lg.gradient_flow_batch) if lg.gradient_flow else None
    flows = _start_flow(run_dir, flow, s.params, resume, main)
    eval_fn = make_eval_fn(exp)
    evaluate = make_split_evaluator(exp, "val", keys.eval, eval_fn, source)
    log = rundir.MetricsLog(run_dir, main, tensorboard=lg.tensorboard, purge_step=first if resume else None)
    sess = Session(exp, loop, run_dir, main, book, best_params, evaluate, log,
                   time.monotonic() - float(book["elapsed"]), first if restored is not None else None,
                   extra_metrics=extra_metrics)
    if sess.saved_step is None:  # a step-0 checkpoint: a run stopped at any point from here on can be resumed
        sess.save_last(loop.place(host_state))
    progress = rundir.Progress(t.steps, first, quiet or not main)
    session_t0 = time.monotonic()
    try:
        out = run_steps(sess, loop.place(host_state), first, progress)
        progress.update(out.step, out.loss, force=True)
    finally:
        progress.close()
        sess.log.close()

    host = loop.gather(out.state) if out.status in ("completed", "early_stopped") else None
    rate = (out.step - first) / max(time.monotonic() - session_t0, 1e-9)
    return finish(sess, out, host, lambda: make_split_evaluator(exp, "test", jax.random.fold_in(keys.eval, 1),
                                                                 eval_fn, source), flow, flows, rate)


def finish(sess: Session, out: Outcome, host, make_test: Callable, flow, flows: dict, rate: float) -> dict:
    """Writes the end of a run: ``summary.json`` (final and best val/test metrics after a completed or early-stopped
    run, whose host-side state is ``host``), the gradient-flow profile at the end, the plots. ``make_test()``
    builds the test evaluator; ``flows`` holds the profiles so far; ``rate`` is steps per second. Only the main
    process writes. Returns the summary."""
    exp, run_dir, book = sess.exp, sess.run_dir, sess.book
    summary = rundir.summary_head(exp.config, exp.task, run_dir, out.status, out.step, out.message)
    if out.signal is not None:
        summary["signal"] = out.signal
    if host is not None:  # (after a halt the state may be the failed step's)
        test = make_test()
        summary["final"] = {"val": sess.evaluate(host.params), "test": test(host.params)}
        if int(book["best_step"]) >= 0:
            summary["best"] = {"step": int(book["best_step"]), "val": float(book["best"]),
                               "test": test(sess.best_params)}
        if flow is not None and sess.main:
            flows["end"] = {"step": out.step, "norms": flow(host.params)}
            rundir.write_json(run_dir, "gradient_flow.json", flows)
    train_recs = [r for r in (rundir.read_metrics(run_dir) if sess.main else []) if r["split"] == "train"]
    summary.update(train_loss=train_recs[-1]["loss"] if train_recs else None, skipped_steps=int(book["skipped"]),
                   consecutive_skips=sess.consecutive_skips, wall_time_s=round(sess.elapsed(), 2),
                   steps_per_s=round(rate, 2), machine=rundir.machine_info())
    if sess.main:
        rundir.write_json(run_dir, "summary.json", summary)
        if exp.config.logging.plots and out.status != "halted_nan":
            plots.plot_run(run_dir)
    return summary


def _start_flow(run_dir: str, flow, params, resume: bool, main: bool) -> dict:
    """The gradient-flow profiles so far (``{"start": ...}``), writing the start profile if it is missing."""
    path = os.path.join(run_dir, "gradient_flow.json")
    if flow is None:
        return {}
    flows = {}
    if resume and os.path.exists(path):
        with open(path) as f:
            flows = json.load(f)
    if "start" not in flows and main:
        flows["start"] = {"step": 0, "norms": flow(params)}
        rundir.write_json(run_dir, "gradient_flow.json", flows)
    return flows
