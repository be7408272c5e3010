"""Run folders and what a run shows while it runs: files, ``metrics.jsonl``, machine info, progress bar, signals.

A run folder holds ``config.yaml`` (the resolved config: enough to re-run), ``metrics.jsonl`` (one JSON object per
line: ``split`` "train" lines with ``step``, ``loss`` and ``grad_norm`` averaged over the logging interval, ``lr``
and ``time``; ``split`` "val" lines with the task's metrics), ``summary.json`` (status, final and best metrics, run
time, machine), ``gradient_flow.json`` (``||dL/dh_t||`` against ``t`` at the start and the end),
``checkpoints/last.msgpack`` (+ ``best.msgpack``, and ``step-<step>.msgpack`` with ``training.keep_checkpoints`` >
1), PNG plots and, with ``logging.tensorboard``, TensorBoard event files in ``tensorboard/`` (a view of
``metrics.jsonl``). Every file but the event files is written atomically; a last ``metrics.jsonl`` line cut short by
a kill is skipped with a warning. ``.lock`` is held (``flock``) by the process resuming the run, so a second one is
refused.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import platform
import signal
import sys
import threading
import time
import warnings

import jax

from jbptt import checkpoint as ckpt
from jbptt.experiment.config import Config, ConfigError, dump_config

try:
    import fcntl
except ImportError:  # not on POSIX: no run locks
    fcntl = None


def new_run_dir(cfg: Config) -> str:
    """``<logging.root>/<logging.name>-<YYYYmmdd-HHMMSS>`` (with a numeric suffix if it exists)."""
    base = os.path.join(cfg.logging.root, f"{cfg.logging.name or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}")
    path, k = base, 1
    while os.path.exists(path):
        k += 1
        path = f"{base}-{k}"
    return path


RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "gradient_flow.json", "curves.png", "gradient_flow.png")
"""The files a run writes in its folder (besides ``checkpoints/``); ``--overwrite`` removes them."""

TENSORBOARD_DIR = "tensorboard"
"""The folder of a run's TensorBoard event files (``logging.tensorboard: true``)."""


def _clear_run(run_dir: str) -> None:
    """Removes the files of the run in ``run_dir`` (only those a run writes: checkpoints and event files too)."""
    for name in RUN_FILES:
        if os.path.exists(os.path.join(run_dir, name)):
            os.unlink(os.path.join(run_dir, name))
    for folder in (os.path.join(run_dir, "checkpoints"), os.path.join(run_dir, TENSORBOARD_DIR)):
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if name.endswith(".msgpack") or name.startswith("events.out.tfevents."):
                os.unlink(os.path.join(folder, name))


def open_run_dir(cfg: Config, run_dir: str | None, *, resume: bool = False, write: bool = True,
                 overwrite: bool = False) -> str:
    """The run folder of a run: ``run_dir`` (or a new one), created with ``config.yaml`` and an empty
    ``metrics.jsonl``; with ``resume`` an existing run folder whose ``config.yaml`` is rewritten from ``cfg`` (which
    may change the settings a resumed run may change). ``write=False`` (processes other than 0) writes nothing.
    ``overwrite``: a run already in ``run_dir`` is removed first (its files only, see :data:`RUN_FILES`).

    Raises:
      CheckpointError: ``resume`` and ``run_dir`` holds no run.
      ConfigError: not ``resume`` or ``overwrite`` and ``run_dir`` already holds a run.
    """
    if resume:
        if run_dir is None or not os.path.exists(os.path.join(run_dir, "config.yaml")):
            raise ckpt.CheckpointError(f"{run_dir} is not a run folder (no config.yaml)")
        if write:
            with _writable(run_dir, "--resume"):
                ckpt.atomic_write(os.path.join(run_dir, "config.yaml"), dump_config(cfg))
        return run_dir
    where = "--run-dir" if run_dir else "logging.root"
    run_dir = run_dir or new_run_dir(cfg)
    if write:
        if os.path.exists(os.path.join(run_dir, "config.yaml")):
            if not overwrite:
                raise ConfigError("--run-dir", f"{run_dir} already holds a run; continue it with --resume, replace "
                                  "it with --overwrite or choose another folder", "<command line>")
        with _writable(run_dir, where):
            _clear_run(run_dir)
            os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
            ckpt.atomic_write(os.path.join(run_dir, "config.yaml"), dump_config(cfg))
            ckpt.atomic_write(os.path.join(run_dir, "metrics.jsonl"), "")
    return run_dir


@contextlib.contextmanager
def _writable(run_dir: str, key: str):
    """Turns an ``OSError`` (a read-only or missing parent folder, a file in the way) into a ConfigError."""
    try:
        yield
    except OSError as e:
        raise ConfigError(key, f"cannot write the run folder {run_dir}: {e.strerror or e}"
                          + (f" ({e.filename})" if e.filename else ""), "<command line>") from None


@contextlib.contextmanager
def run_lock(run_dir: str):
    """Holds an exclusive lock on ``<run_dir>/.lock`` (``flock``: released when the process ends, however it ends)
    for the body, so a second process resuming the same run is refused instead of writing duplicate records.

    Raises:
      ConfigError: another process holds the lock, or the folder cannot be written.
    """
    if fcntl is None:
        yield
        return
    path = os.path.join(run_dir, ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError("--resume", f"cannot write to the run folder {run_dir}: {e.strerror or e}",
                          "<command line>") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            raise ConfigError("--resume", f"{run_dir} is in use by another jbptt process (pid {pid})",
                              "<command line>") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)


def read_metrics(run_dir: str) -> list[dict]:
    """The records of ``metrics.jsonl`` in a run folder.

    A last line cut short (a run killed mid-write) is skipped with a ``RuntimeWarning``.

    Raises:
      CheckpointError: a line before the last one is not a JSON record.
    """
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    records = []
    for k, (i, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if k < len(lines) - 1:
                raise ckpt.CheckpointError(f"{path}: line {i} is not a JSON record ({e})") from None
            warnings.warn(f"{path}: skipping the incomplete last line {i} (a run stopped while writing it)",
                          RuntimeWarning, stacklevel=2)
    return records


def truncate_metrics(run_dir: str, last_step: int) -> None:
    """Drops the records logged after ``last_step`` (written after the checkpoint a run resumes from)."""
    keep = [r for r in read_metrics(run_dir) if r["step"] <= last_step]
    ckpt.atomic_write(os.path.join(run_dir, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in keep))


def check_tensorboard():
    """The ``tensorboardX`` module, imported; call it before a run folder is written.

    Raises:
      ConfigError: ``logging.tensorboard`` is on but ``tensorboardX`` (the optional extra) is not installed.
    """
    try:
        return importlib.import_module("tensorboardX")
    except ImportError as e:
        raise ConfigError("logging.tensorboard", f"needs the optional package tensorboardX ({e}): "
                          "pip install 'jbptt[tensorboard]', or set logging.tensorboard: false") from None


class MetricsLog:
    """Appends records to ``metrics.jsonl`` (flushed line by line); ``write=False`` discards them.

    With ``tensorboard`` every record is also written as TensorBoard scalars under ``<run_dir>/tensorboard/``: each
    number of a record but ``step`` and ``time`` as ``<split>/<key>`` at its ``step`` (``train/loss``,
    ``val/mse``). ``metrics.jsonl`` stays the source of truth; the event files are a view of it. ``purge_step``
    (the step a resumed run continues from) tells TensorBoard to hide the events a killed run wrote after it.

    Raises:
      ConfigError: ``tensorboard`` and ``tensorboardX`` is not installed (see :func:`check_tensorboard`).
    """

    def __init__(self, run_dir: str, write: bool = True, *, tensorboard: bool = False, purge_step: int | None = None):
        self.board = None
        if write and tensorboard:
            writer = check_tensorboard().SummaryWriter
            self.board = writer(os.path.join(run_dir, TENSORBOARD_DIR), purge_step=purge_step, flush_secs=10)
        self.file = open(os.path.join(run_dir, "metrics.jsonl") if write else os.devnull, "a")

    def __call__(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            split, step = record.get("split", "train"), record.get("step", 0)
            for key, value in record.items():
                if key not in ("split", "step", "time") and isinstance(value, int | float) \
                        and not isinstance(value, bool):
                    self.board.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        self.file.close()
        if self.board is not None:
            self.board.close()


def write_json(run_dir: str, name: str, obj) -> None:
    """Writes ``obj`` as ``<run_dir>/<name>`` (JSON, atomically)."""
    ckpt.atomic_write(os.path.join(run_dir, name), json.dumps(obj, indent=2))


def summary_head(cfg: Config, task, run_dir: str, status: str, steps: int, message: str | None = None) -> dict:
    """The first fields of every ``summary.json``: the run, its status, the task's headline metric and its
    ``baseline`` (the headline metric of a trivial predictor, ``task.info["baseline"]``; ``None`` when the task has
    none), which plots draw as a line."""
    baseline = task.info.get("baseline")
    return {"name": cfg.logging.name, "run_dir": run_dir, "status": status, "message": message, "steps": steps,
            "task": cfg.task.name, "metric": task.metric, "higher_is_better": task.higher_is_better,
            "baseline": float(baseline) if isinstance(baseline, int | float) else None,
            "estimator": cfg.estimator.name, "cell": cfg.model.cell}


def machine_info() -> dict:
    """A short description of the machine (for summaries and results tables)."""
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
    """Progress on stderr: step, loss, steps/s and ETA (``quiet`` turns it off).

    On a terminal one line redrawn in place (``\\r`` frames, at most every 0.25 s); otherwise (a log file, a pipe,
    CI) plain lines, one every ``every`` seconds (default 10) and one at every forced update (the last step), so a
    log holds readable lines rather than carriage-return frames.

    Args:
      total: the last step of the run.
      start: the step the run starts after (0, or the step resumed from).
      quiet: write nothing.
      stream: where to write (default ``sys.stderr`` at construction).
      every: seconds between plain lines when ``stream`` is not a terminal.
    """

    def __init__(self, total: int, start: int, quiet: bool, stream=None, *, every: float = 10.0):
        self.total, self.start, self.quiet = total, start, quiet
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.every = 0.25 if self.tty else every
        self.t0 = self.last = time.monotonic()
        self.first = start + 1  # the rate is measured from the first (compiled) step on
        self.written = None  # the step of the last plain line

    def update(self, step: int, loss: float, force: bool = False):
        now = time.monotonic()
        if step == self.first:
            self.t0, self.start = now, step
        if self.quiet or (not force and now - self.last < self.every) or (not self.tty and step == self.written):
            return
        self.last = now
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        eta_s = "?" if not math.isfinite(eta) else f"{int(eta) // 60}:{int(eta) % 60:02d}"
        line = f"step {step}/{self.total}  loss {loss:.4g}  {rate:.1f} steps/s  ETA {eta_s}"
        if self.tty:
            self.stream.write(f"\r{line}   ")
        else:
            self.stream.write(line + "\n")
            self.written = step
        self.stream.flush()

    def close(self):
        if not self.quiet and self.tty:
            self.stream.write("\n")
            self.stream.flush()


class Signals:
    """Turns SIGINT/SIGTERM into a flag (``received``) a loop checks after every step (main thread only)."""

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
