"""Shared helpers for the runner tests: a tiny config, metric comparison, a `jbptt run` in a subprocess."""

import json
import os
import subprocess
import sys
import time

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_raw(root, **sections):
    """A raw config dict for a run that takes a second or two."""
    raw = {
        "task": {"name": "adding", "options": {"length": 8}},
        "model": {"cell": "elman", "hidden": 8},
        "optimizer": {"name": "adam", "lr": 0.01, "clip_norm": 1.0},
        "training": {
            "steps": 20,
            "batch_size": 8,
            "eval_every": 10,
            "eval_batch_size": 16,
            "checkpoint_every": 10,
        },
        "logging": {
            "root": str(root),
            "name": "tiny",
            "log_every": 5,
            "plots": False,
            "gradient_flow": False,
        },
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values} if isinstance(values, dict) else values
    return raw


def write_config(path, raw):
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return str(path)


def metrics_without_time(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def launch(cfg_file, run_dir, *extra):
    """``jbptt run [extra] --quiet [cfg_file --run-dir run_dir]`` in a subprocess (CPU)."""
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, "-m", "jbptt", "run", *extra, "--quiet"]
        + ([cfg_file, "--run-dir", str(run_dir)] if cfg_file else []),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(run_dir, proc, step, timeout=120):
    """Waits until the run logged ``step`` (reading metrics.jsonl) while the process is alive; returns the step."""
    t0 = time.monotonic()
    path = os.path.join(run_dir, "metrics.jsonl")
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()
        if os.path.exists(path):
            with open(path) as f:
                steps = [json.loads(line)["step"] for line in f if line.strip() and line.endswith("\n")]
            if steps and max(steps) >= step:
                return max(steps)
        time.sleep(0.02)
    raise AssertionError("the run did not get far enough in time")
