"""Echo State Network baseline: the readout of a fixed random reservoir fitted in closed form (ridge regression).

Selected in a config by ``estimator: {name: esn, options: {ridge: 1e-6, fit_batches: 20}}`` with
``model.cell: esn``. The reservoir is run over ``fit_batches`` training batches; the states at the steps that have a
target (plus a constant 1 for the bias) are regressed on the targets (one-hot targets for classification tasks,
whose prediction is then the arg-max)::

    W = (S^T S + ridge * I)^-1 S^T Y      (float64, on the host)

No gradient is taken, so this is not a :class:`~jbptt.estimator.GradientEstimator`: it is a *fitter*,
``fit(cfg, run_dir, *, resume, quiet, source) -> summary``, listed in :data:`jbptt.experiment.runner.FITTERS`,
which ``jbptt run`` consults before the training loop. It writes a run folder like the training loop does.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jbptt import checkpoint as ckpt
from jbptt.cells import CELLS, Cell, params_dtype
from jbptt.experiment import rundir
from jbptt.experiment.build import build_model, float_dtype, run_keys
from jbptt.experiment.config import Config, ConfigError
from jbptt.experiment.evaluate import make_eval_fn, make_evaluator
from jbptt.unroll import unroll

ESN_OPTIONS = {"ridge": 1e-6, "fit_batches": 20}


def ridge_readout(states, targets, ridge: float):
    """Closed-form ridge regression with a bias. ``states: [N, H]``, ``targets: [N, O]``.

    Returns:
      ``(w [H, O], b [O])`` minimising ``|states w + b - targets|^2 + ridge |(w, b)|^2``.
    """
    s = np.concatenate([np.asarray(states, np.float64), np.ones((len(states), 1))], axis=1)
    y = np.asarray(targets, np.float64)
    sol = np.linalg.solve(s.T @ s + ridge * np.eye(s.shape[1]), s.T @ y)
    return sol[:-1], sol[-1]


def check_esn_config(cfg: Config, source: str = "<config>") -> None:
    """Raises :class:`ConfigError` unless ``cfg`` describes a single ESN reservoir with known esn options."""
    opts = cfg.estimator.options
    unknown = sorted(set(opts) - set(ESN_OPTIONS))
    if unknown:
        raise ConfigError("estimator.options", f"esn has no option(s) {unknown}; options: {sorted(ESN_OPTIONS)}",
                          source)
    if cfg.model.cell != "esn":
        raise ConfigError("estimator.name", "estimator 'esn' fits a readout on an ESN reservoir; set "
                          f"model.cell: esn (got {cfg.model.cell!r})", source)
    if cfg.model.layers != 1 or cfg.model.learned_initial_carry or cfg.model.dropout:
        raise ConfigError("model", "estimator esn needs a single reservoir (layers: 1, no learned carry, no "
                          "dropout)", source)
    if not float(opts.get("ridge", 1.0)) >= 0:
        raise ConfigError("estimator.options.ridge", "must be >= 0", source)
    if not int(opts.get("fit_batches", 1)) >= 1:
        raise ConfigError("estimator.options.fit_batches", "must be >= 1", source)


def fit_readout(core: Cell, params, task, key, *, batch_size: int, fit_batches: int, ridge: float):
    """The ridge readout fitted on the reservoir states of ``fit_batches`` training batches.

    Args:
      core: the reservoir cell; ``params["core"]`` are its parameters.
      params: the parameters of ``with_readout(core, task.output_size)``; the readout's are replaced.
      task: batch ``i`` is ``task.sample(fold_in(key, i), batch_size, "train")``.

    Returns:
      ``(params, n_examples)``: the parameters with the fitted readout and the number of time steps fitted on.
    """

    @jax.jit
    def states(k):
        b = task.sample(k, batch_size, "train")
        _, hs = unroll(core, params["core"], b.inputs, seq_lengths=b.seq_lengths, resets=b.resets)  # [B, T, H]
        return hs, b.targets, b.weights(hs.dtype)

    feats, targs = [], []
    for i in range(fit_batches):
        hs, ys, w = jax.device_get(states(jax.random.fold_in(key, i)))
        keep = w > 0
        feats.append(hs[keep])
        targs.append(np.eye(task.output_size)[ys[keep]] if task.loss == "cross_entropy" else ys[keep])
    w, b = ridge_readout(np.concatenate(feats), np.concatenate(targs), ridge)
    dtype = params_dtype(params["core"])
    return {**params, "readout": {"w": jnp.asarray(w, dtype), "b": jnp.asarray(b, dtype)}}, sum(map(len, feats))


def fit_esn(cfg: Config, run_dir: str | None = None, *, resume: bool = False, quiet: bool = True,
            source: str = "<config>", overwrite: bool = False) -> dict:
    """Fits the ESN readout of ``cfg`` and writes a run folder (``config.yaml``, one ``val`` line in
    ``metrics.jsonl``, ``checkpoints/best.msgpack``, ``summary.json``). Returns the summary.

    ``resume`` fits again into the run folder ``run_dir``; ``quiet`` is there for the fitter signature (the fit
    prints nothing). A float64 config needs ``jax_enable_x64`` on (:func:`jbptt.experiment.runner.train` scopes it).

    Raises:
      ConfigError: before anything is written, for any problem with the config.
    """
    del quiet
    check_esn_config(cfg, source)
    model = build_model(cfg, source)
    opts = {**ESN_OPTIONS, **cfg.estimator.options}
    core = CELLS["esn"](cfg.model.hidden, dtype=float_dtype(cfg, source), **cfg.model.options)
    run_dir = rundir.open_run_dir(cfg, run_dir, resume=resume, overwrite=overwrite)
    t0 = time.monotonic()
    keys, t = run_keys(cfg.seed), cfg.training
    params = model.cell.init(keys.init, model.task.input_size)
    params, n = fit_readout(core, params, model.task, keys.data, batch_size=t.batch_size,
                            fit_batches=int(opts["fit_batches"]), ridge=float(opts["ridge"]))
    eval_fn = make_eval_fn(model)
    val = make_evaluator(model, "val", t.eval_batch_size, t.eval_batches, keys.eval, eval_fn)(params)
    test_key = jax.random.fold_in(keys.eval, 1)
    test = make_evaluator(model, "test", t.eval_batch_size, t.eval_batches, test_key, eval_fn)(params)
    elapsed = round(time.monotonic() - t0, 3)
    ckpt.atomic_write(os.path.join(run_dir, "metrics.jsonl"),
                      json.dumps({"step": 0, "split": "val", **val, "time": elapsed}) + "\n")
    ckpt.save(os.path.join(run_dir, "checkpoints", "best.msgpack"), params)
    summary = {**rundir.summary_head(cfg, model.task, run_dir, "completed", 0), "final": {"val": val, "test": test},
               "fit_examples": n, "wall_time_s": elapsed, "machine": rundir.machine_info()}
    rundir.write_json(run_dir, "summary.json", summary)
    return summary
