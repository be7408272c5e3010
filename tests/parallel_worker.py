"""Subprocess worker for tests/test_parallel.py: JAX needs its device count fixed before it starts.

    python tests/parallel_worker.py single --devices 8 --out OUT.json [--estimators bptt,tbptt,rtrl]
        [--runner-config CFG --runner-dir DIR] [--bench-json OUT.json]
    python tests/parallel_worker.py multi --out OUT.json --runner-config CFG --runner-dir DIR [-- OVERRIDES]

``single`` runs every single-process check in one JAX start (cheaper than one subprocess per check) and writes
the measured errors; the test asserts on them. ``multi`` is one process of a two-process run: it first runs
``jbptt run CFG --run-dir DIR OVERRIDES`` in-process (which starts ``jax.distributed`` from the overrides or the
``JAX_*`` environment variables, as the command does), then the library's multi-process checks; only process 0
writes ``OUT.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import runpy
import sys
import tempfile


def parse_args(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["single", "multi"])
    parser.add_argument("--devices", type=int, default=None, help="CPU devices of this process (single)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--estimators", default="bptt", help="exact one-step checks (float64)")
    parser.add_argument("--short", default="bptt", help="ten-step float32 runs across modes")
    parser.add_argument("--runner-config", help="single: also run this runner config on 4 devices (sharded) into "
                                                "--runner-dir, the reference of the two-process CLI run; multi: "
                                                "the config of the two-process CLI run")
    parser.add_argument("--runner-dir")
    parser.add_argument("--bench-json", help="single: also run experiments/bench_scaling.py as a script")
    parser.add_argument("overrides", nargs="*", help="multi: dotted overrides of the CLI run")
    return parser.parse_intermixed_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    import jax

    if ARGS.what == "single":
        jax.config.update("jax_num_cpu_devices", ARGS.devices)
    jax.config.update("jax_enable_x64", True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jbptt  # noqa: E402
from jbptt import cells, losses, parallel  # noqa: E402

B, T, I, H, O = 16, 6, 3, 5, 2
STEPS_SHORT = 10
ESTIMATOR_OPTIONS = {"bptt": {"stateful": True}, "rtrl": {"stateful": True}, "snap1": {"stateful": True},
                     "tbptt": {"k1": 2, "k2": 3, "stateful": True}}  # 3 chunks a step, a replay window
EXACT_FIRST_STEP = ("bptt", "rtrl")  # estimators whose first step is the full BPTT gradient


def record_grads() -> optax.GradientTransformation:
    """An optax stage that keeps the last gradients in its state (so tests can read exact gradients)."""
    return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                        lambda g, s, p=None: (g, g))


def problem(name: str, dtype):
    """A small cell, estimator and T-step task in ``dtype``; returns (cell, estimator, params, batch_fn)."""
    cell = cells.with_readout(cells.elman(H, dtype=dtype), O)
    params = jax.tree.map(lambda a: a.astype(dtype), cell.init(jax.random.key(0), I))
    estimator = jbptt.make_estimator(name, cell, losses.mse, **ESTIMATOR_OPTIONS.get(name, {}))

    def batch_fn(step: int, masked: bool = True):  # host numpy data: generating it compiles nothing
        rng = np.random.default_rng(step)
        mask = (rng.uniform(size=(B, T)) < 0.7).astype(dtype) if masked else None
        return jbptt.Batch(rng.normal(size=(B, T, I)).astype(dtype), rng.normal(size=(B, T, O)).astype(dtype),
                           mask=mask)

    return cell, estimator, params, batch_fn


def _np(x):
    """float64 numpy copy of a leaf (PRNG keys as their raw key data)."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x, np.float64)


def _abs(x):
    return np.abs(_np(x))


def max_rel_err(a, b) -> float:
    """max over leaves of ``max|a - b| / max(max|b|, 1e-30)``."""
    errs = jax.tree.map(lambda x, y: float(np.max(_abs(_np(x) - _np(y))))
                        / max(float(np.max(_abs(y))), 1e-30), a, b)
    return max(jax.tree_util.tree_leaves(errs), default=0.0)


def max_abs_err(a, b) -> float:
    """max over leaves of ``max|a - b|``."""
    errs = jax.tree.map(lambda x, y: float(np.max(_abs(_np(x) - _np(y)))), a, b)
    return max(jax.tree_util.tree_leaves(errs), default=0.0)


def run(name, dtype, mode, devices, steps, masked, optimizer):
    """Trains ``steps`` steps; returns (per-step metrics, per-step recorded grads, final gathered state)."""
    cell, estimator, params, batch_fn = problem(name, dtype)
    carry, inputs = cell.initial_carry(params, (B,)), batch_fn(0, masked).inputs  # the global batch
    dp = parallel.data_parallel(estimator, optimizer, params, carry, mode=mode, devices=devices, inputs=inputs)
    state = dp.init(params, carry, key=jax.random.key(0), inputs=inputs)
    rows = parallel.process_rows(B)
    metrics, grads = [], []
    for step in range(steps):
        batch = jax.tree.map(lambda a: a[rows], batch_fn(step, masked))
        state, m = dp.step(state, batch)
        metrics.append({k: float(np.asarray(v)) for k, v in m.items()})
        if steps <= 3:
            grads.append(dp.gather(state).opt_state[0])
    return metrics, grads, dp.gather(state)


def single_checks(names, short_names):
    out = {"devices": jax.device_count(), "exact": {}, "short": {}, "short4": {}}
    optimizer = optax.chain(record_grads(), optax.adam(1e-2))
    for name in names:
        ref_m, ref_g, ref_s = run(name, jnp.float64, "none", 1, 3, True, optimizer)
        cell, _, params, batch_fn = problem(name, jnp.float64)
        bptt_grads = jbptt.reference_gradient(cell, losses.mse, params, batch_fn(0))[1]  # plain jax.grad
        res = out["exact"][name] = {}
        for mode in ("pmap", "sharded"):
            m, g, s = run(name, jnp.float64, mode, "auto", 3, True, optimizer)
            res[mode] = {"loss": max_rel_err([x["loss"] for x in m], [x["loss"] for x in ref_m]),
                         "grads": max_rel_err(g, ref_g), "params": max_rel_err(s.params, ref_s.params),
                         "est_state": max_rel_err(s.est_state, ref_s.est_state),
                         "first_grads_vs_bptt": max_rel_err(g[0], bptt_grads) if name in EXACT_FIRST_STEP
                         else None,
                         "dtype": str(jax.tree_util.tree_leaves(s.params)[0].dtype)}
    for name in short_names:  # ten float32 steps across the three modes
        runs = {mode: run(name, jnp.float32, mode, 1 if mode == "none" else "auto", STEPS_SHORT, True,
                          optax.adam(1e-2)) for mode in ("none", "pmap", "sharded")}
        dtype = jax.tree_util.tree_leaves(runs["none"][2].params)[0].dtype
        short = out["short"][name] = {"none_loss": [x["loss"] for x in runs["none"][0]], "dtype": str(dtype)}
        for mode in ("pmap", "sharded"):
            short[mode] = {"metrics": max_rel_err(runs[mode][0], runs["none"][0]),
                           "params_abs": max_abs_err(runs[mode][2].params, runs["none"][2].params)}
        if name == short_names[0]:  # the 4-device reference for the multi-process run
            out["short4"][name] = {mode: run(name, jnp.float32, mode, 4, STEPS_SHORT, True,
                                             optax.adam(1e-2))[0] for mode in ("pmap", "sharded")}
    # An estimator whose update adds a leaf to its state: the data-parallel layout refuses it with a clear error.
    cell, estimator, params, batch_fn = problem("bptt", jnp.float64)

    def grow(p, s, b):
        loss, grads, inner = estimator.update(p, s["inner"], b)
        return loss, grads, {"inner": inner, "extra": loss}

    growing = jbptt.GradientEstimator(lambda p, c, **kw: {"inner": estimator.init(p, c, **kw)}, grow)
    carry = cell.initial_carry(params, (B,))
    try:
        dp = parallel.data_parallel(growing, optax.sgd(0.1), params, carry, mode="sharded")
        dp.step(dp.init(params, carry), batch_fn(0))
        out["structure_error"] = None
    except ValueError as e:
        out["structure_error"] = str(e)
    cell, estimator, params, _ = problem("bptt", jnp.float64)
    try:
        parallel.data_parallel(estimator, optax.sgd(0.1), params, cell.initial_carry(params, (12,)),
                               mode="pmap")
        out["indivisible_error"] = None
    except ValueError as e:
        out["indivisible_error"] = str(e)
    if ARGS is not None and ARGS.runner_config:  # the runner scopes x64 to the config's float32 itself
        from jbptt.experiment.config import load_config
        from jbptt.experiment.runner import train

        cfg = load_config(ARGS.runner_config, ["parallel.mode=sharded", "parallel.devices=4"])
        out["runner"] = train(cfg, ARGS.runner_dir)["status"]
        out["x64_after_runner"] = bool(jax.config.jax_enable_x64)
    if ARGS is not None and ARGS.bench_json:  # the benchmark script as __main__, on 2 of the 8 devices
        argv = ["bench_scaling.py", "--devices", "8", "--counts", "1,2", "--scaling", "strong,weak", "--modes",
                "sharded", "--steps", "2", "--repeats", "1", "--hidden", "8", "--T", "4", "--batch", "4",
                "--per-device-batch", "2", "--cell", "elman", "--json", ARGS.bench_json]
        stdout, saved = io.StringIO(), sys.argv
        try:
            sys.argv = argv
            with contextlib.redirect_stdout(stdout):
                runpy.run_path(os.path.join(ROOT, "experiments", "bench_scaling.py"), run_name="__main__")
        finally:
            sys.argv = saved
        out["bench_stdout"] = stdout.getvalue()
    return out


def multi_checks(names, short_names):
    out = {"process_count": jax.process_count(), "devices": jax.device_count(),
           "local_devices": jax.local_device_count(), "short4": {}}
    for name in short_names[:1]:
        out["short4"][name] = {mode: run(name, jnp.float32, mode, "auto", STEPS_SHORT, True,
                                         optax.adam(1e-2))[0] for mode in ("pmap", "sharded")}
    return out


def write_json(path, obj):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


if __name__ == "__main__":
    names, short_names = ARGS.estimators.split(","), ARGS.short.split(",")
    if ARGS.what == "multi":  # `jbptt run` starts jax.distributed from its config or the environment
        from jbptt import cli

        code = cli.main(["run", ARGS.runner_config, *ARGS.overrides, "--quiet", "--run-dir", ARGS.runner_dir])
        if code != 0:
            sys.exit(code)
    result = (single_checks if ARGS.what == "single" else multi_checks)(names, short_names)
    if parallel.is_main_process():
        write_json(ARGS.out, result)
    if ARGS.what == "multi":
        jax.distributed.shutdown()
