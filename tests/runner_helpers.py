"""Shared helpers for the runner tests: a tiny config and metric comparison."""

import json
import os

import yaml


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
