"""Echo State Network baseline: the readout of a fixed random reservoir fitted in closed form (ridge
regression).

Selected in a config by ``estimator: {name: esn, options: {ridge: 1e-6, fit_batches: 20}}`` with
``model.cell: esn``. The reservoir is run over ``fit_batches`` training batches; the states at the steps that
have a target (plus a constant 1 for the bias) are regressed on the targets (one-hot targets for
classification
tasks, whose prediction is then the arg-max):

    W = (S^T S + ridge * I)^-1 S^T Y      (float64, on the host)

No gradient is taken, so this is not a :class:`~jbptt.estimator.GradientEstimator`;
:func:`~jbptt.experiment.runner.train`
dispatches here.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jbptt import checkpoint as ckpt
from jbptt.cells import CELLS
from jbptt.experiment.config import ConfigError, dump_config
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


def check_esn_config(cfg, source: str = "<config>") -> None:
    """Raises :class:`ConfigError` unless ``cfg`` describes a single ESN reservoir with known esn options."""
    unknown = sorted(set(cfg.estimator.options) - set(ESN_OPTIONS))
    if unknown:
        raise ConfigError(
            "estimator.options", f"esn has no option(s) {unknown}; options: {sorted(ESN_OPTIONS)}", source
        )
    if cfg.model.cell != "esn":
        raise ConfigError(
            "estimator.name",
            "estimator 'esn' fits a readout on an ESN reservoir; set "
            f"model.cell: esn (got {cfg.model.cell!r})",
            source,
        )
    if cfg.model.layers != 1 or cfg.model.learned_initial_carry or cfg.model.dropout:
        raise ConfigError(
            "model",
            "estimator esn needs a single reservoir (layers: 1, no learned carry, no dropout)",
            source,
        )
    if not float(cfg.estimator.options.get("ridge", 1.0)) >= 0:
        raise ConfigError("estimator.options.ridge", "must be >= 0", source)
    if not int(cfg.estimator.options.get("fit_batches", 1)) >= 1:
        raise ConfigError("estimator.options.fit_batches", "must be >= 1", source)


def fit_esn(exp, run_dir: str, *, quiet: bool = True) -> dict:
    """Fits the ESN readout for the experiment ``exp`` (a :class:`~jbptt.experiment.runner.Experiment`) and writes a run
    folder like :func:`~jbptt.experiment.runner.train` does. Returns the summary."""
    from jbptt.experiment.runner import machine_info, make_eval_fn, make_evaluator

    cfg, task = exp.config, exp.task
    opts = {**ESN_OPTIONS, **cfg.estimator.options}
    t0 = time.monotonic()
    root = jax.random.key(cfg.seed)
    init_key, data_key, _, eval_key, _ = (jax.random.fold_in(root, i) for i in range(5))
    params = exp.cell.init(init_key, task.input_size)
    dtype = jnp.float64 if cfg.model.dtype == "float64" else jnp.float32
    core = CELLS["esn"](cfg.model.hidden, dtype=dtype, **cfg.model.options)

    @jax.jit
    def states(k):
        b = task.sample(k, cfg.training.batch_size, "train")
        _, hs = unroll(core, params["core"], b.inputs, seq_lengths=b.seq_lengths, resets=b.resets)
        return hs, b.targets, b.weights(hs.dtype)

    feats, targs = [], []
    for i in range(int(opts["fit_batches"])):
        hs, ys, w = jax.device_get(states(jax.random.fold_in(data_key, i)))
        keep = w > 0
        feats.append(hs[keep])
        y = ys[keep]
        targs.append(np.eye(task.output_size)[y] if task.loss == "cross_entropy" else y)
    w, b = ridge_readout(np.concatenate(feats), np.concatenate(targs), float(opts["ridge"]))
    params = {**params, "readout": {"w": jnp.asarray(w, dtype), "b": jnp.asarray(b, dtype)}}

    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    ckpt.atomic_write(os.path.join(run_dir, "config.yaml"), dump_config(cfg))
    t = cfg.training
    eval_fn = make_eval_fn(exp)
    val = make_evaluator(exp, "val", t.eval_batch_size, t.eval_batches, eval_key, eval_fn)(params)
    test_key = jax.random.fold_in(eval_key, 1)
    test = make_evaluator(exp, "test", t.eval_batch_size, t.eval_batches, test_key, eval_fn)(params)
    elapsed = round(time.monotonic() - t0, 3)
    ckpt.atomic_write(
        os.path.join(run_dir, "metrics.jsonl"),
        json.dumps({"step": 0, "split": "val", **val, "time": elapsed}) + "\n",
    )
    ckpt.save(os.path.join(run_dir, "checkpoints", "best.msgpack"), params)
    summary = {
        "name": cfg.logging.name,
        "run_dir": run_dir,
        "status": "completed",
        "message": None,
        "steps": 0,
        "task": cfg.task.name,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "estimator": "esn",
        "cell": "esn",
        "final": {"val": val, "test": test},
        "fit_examples": int(sum(len(f) for f in feats)),
        "wall_time_s": elapsed,
        "machine": machine_info(),
    }
    ckpt.atomic_write(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=2))
    return summary
