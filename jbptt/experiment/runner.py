"""The experiment runner: a :class:`~jbptt.experiment.config.Config` in, a trained model and a run folder out.

:func:`train` is what ``jbptt run`` calls, and experiment scripts can call it in-process::

    from jbptt.experiment.config import load_config
    from jbptt.experiment.runner import train
    summary = train(load_config("configs/quickstart.yaml", ["training.steps=200"]), run_dir="runs/q")

It looks the config's estimator up in :data:`FITTERS` (closed-form fits such as the ESN readout) and otherwise runs
the training loop of :mod:`jbptt.experiment.loop` with the registered gradient estimator of that name. The run
folder is described in :mod:`jbptt.experiment.rundir`; :func:`load_run` reads one back.
"""

from __future__ import annotations

import contextlib
import functools
import os

import jax

from jbptt import checkpoint as ckpt
from jbptt import parallel
from jbptt.experiment import esn, loop, rundir
from jbptt.experiment.build import build, build_model, float_dtype, precision, run_keys
from jbptt.experiment.config import Config, ConfigError, load_config
from jbptt.experiment.loop import STATUS_EXIT_CODES, train_by_gradient

__all__ = ["FITTERS", "STATUS_EXIT_CODES", "load_run", "start_processes", "train"]

FITTERS = {"esn": esn.fit_esn}
"""Estimators that are fitted without gradients, by name: ``fit(cfg, run_dir, *, resume, quiet, source, overwrite)
-> summary``
writes a run folder (and checks its own options). Every other ``estimator.name`` is a registered gradient
estimator trained by :func:`jbptt.experiment.loop.train_by_gradient`."""


def start_processes(cfg: Config) -> bool:
    """Starts multi-process JAX (``jax.distributed``) when ``cfg.parallel`` or the environment asks for several
    processes; call before anything touches a device. Returns True in a multi-process run."""
    p = cfg.parallel
    n = p.num_processes if p.num_processes is not None else int(os.environ.get("JAX_NUM_PROCESSES") or 1)
    if p.mode == "none" or n <= 1:
        return False
    return parallel.maybe_initialize_distributed(p.coordinator_address, n, p.process_id)


def train(cfg: Config, run_dir: str | None = None, *, resume: bool = False, quiet: bool = True,
          source: str = "<config>", overwrite: bool = False, extra_metrics=None) -> dict:
    """Trains (or fits) the model of ``cfg`` and returns the run's summary (also written to ``summary.json``).

    The whole run executes with ``jax_enable_x64`` scoped to ``model.dtype`` (on for float64, off otherwise;
    :func:`~jbptt.experiment.build.precision`), whatever the process's setting, and restored afterwards.

    Args:
      cfg: a validated :class:`~jbptt.experiment.config.Config`.
      run_dir: the run folder (default: a new ``<root>/<name>-<timestamp>``). With ``resume=True`` it must hold a
        run: its checkpoint is restored and training continues; ``cfg`` (the run's ``config.yaml``, possibly with
        new ``training.steps`` or logging settings) is written back to the folder.
      quiet: no progress bar on stderr.
      overwrite: replace a run already in ``run_dir`` (not resuming; otherwise that is a ConfigError).
      source: the config's file name, for error messages.
      extra_metrics: optional ``extra_metrics(step, params) -> dict`` of floats logged with every validation record
        of a gradient-trained run (see :func:`~jbptt.experiment.loop.train_by_gradient`; fitters ignore it).

    Returns:
      The summary dict: ``status`` (``completed``, ``early_stopped``, ``halted_nan`` or ``interrupted``), ``steps``,
      ``final`` and ``best`` metrics, ``wall_time_s`` and more.

    Raises:
      ConfigError: before anything is written, for any problem with the config.
      CheckpointError: when resuming from a missing, corrupt or mismatched checkpoint.
      ConfigError: also when resuming a run another process is running (a lock in the run folder).
    """
    start_processes(cfg)
    fit = FITTERS.get(cfg.estimator.name) or functools.partial(train_by_gradient, extra_metrics=extra_metrics)
    if cfg.estimator.name in FITTERS and (cfg.training.chunk is not None or cfg.training.stateful_stream):
        raise ConfigError("training.chunk", f"estimator {cfg.estimator.name!r} is fitted in closed form, not "
                          "trained in chunks; leave training.chunk and training.stateful_stream unset", source)
    locked = resume and run_dir is not None and os.path.isdir(run_dir) and jax.process_index() == 0
    with precision(cfg.model.dtype), rundir.run_lock(run_dir) if locked else contextlib.nullcontext():
        return fit(cfg, run_dir, resume=resume, quiet=quiet, source=source, overwrite=overwrite)


def load_run(run_dir: str, which: str = "last"):
    """Loads a run folder for analysis: ``(config, experiment, state)``.

    ``which="last"`` returns the last checkpoint's :class:`~jbptt.train.TrainState` (``state.params``,
    ``state.step``, ...); ``which="best"`` returns the parameters with the best validation metric (the only
    checkpoint of a fitted run, whose ``experiment`` is a :class:`~jbptt.experiment.build.Model`). The arrays are
    in the run's dtype, so a float64 run needs ``jax_enable_x64`` on in the caller (a ConfigError otherwise).

    Raises:
      CheckpointError: for a missing, corrupt or mismatched checkpoint.
    """
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise ckpt.CheckpointError(f"{run_dir} is not a run folder (no config.yaml)")
    cfg = load_config(path)
    float_dtype(cfg, path)  # the caller must be able to hold the run's arrays
    with precision(cfg.model.dtype):  # the template's dtypes are those of the run
        fitted = cfg.estimator.name in FITTERS
        exp = build_model(cfg, path) if fitted else build(cfg, path)
        params = exp.cell.init(jax.random.key(0), exp.task.input_size)
        if which == "best":
            return cfg, exp, ckpt.load(os.path.join(run_dir, "checkpoints", "best.msgpack"), params)
        if fitted:
            raise ckpt.CheckpointError(f"{run_dir} is a fitted ({cfg.estimator.name}) run: it has only the "
                                       "best.msgpack checkpoint")
        keys = run_keys(cfg.seed)
        template = loop.checkpoint_template(exp, keys, loop.start(exp, keys, loop.batch_fn(exp, keys)))
        state, _, _ = ckpt.load(os.path.join(run_dir, "checkpoints", "last.msgpack"), template)
    return cfg, exp, state
