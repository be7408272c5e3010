"""Truncation length vs time lag: which dependencies can TBPTT(k, k) learn?

Reads ``configs/truncation_vs_lag.yaml`` (see there for the task and the grid), trains an LSTM for every
(lag L, truncation k) with all seeds side by side (``jax.vmap`` over seeds, one compilation per cell of the grid,
the whole training loop one ``lax.scan``), and writes to ``out``:

* ``truncation_vs_lag.json`` — per (L, k): the seeds' final validation accuracies, mean, std, wall time;
* ``truncation_vs_lag.md`` — the table of mean (min-max) accuracies;
* ``truncation_vs_lag.png`` — heat map of the mean final accuracy (rows: lags, columns: truncations).

Usage::

    python experiments/truncation_vs_lag.py [--config configs/truncation_vs_lag.yaml] [--out DIR]
        [--lags 5 10] [--truncations 5 full] [--seeds 0 1] [--steps 400]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from jbptt import cells, fused, losses
from jbptt.checkpoint import atomic_write
from jbptt.estimators.bptt import bptt
from jbptt.estimators.tbptt import tbptt
from jbptt.experiment.plots import pyplot, save_figure
from jbptt.experiment.rundir import machine_info
from jbptt.tasks import make_task
from jbptt.train import init_train_state, make_train_step
from jbptt.unroll import unroll

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "truncation_vs_lag.yaml")


def lag_task(task_cfg: dict, lag: int):
    """The task whose recalled symbol is ``lag`` steps after the symbol it copies."""
    name, options = task_cfg["name"], dict(task_cfg.get("options", {}))
    if name == "copy":
        length = options.setdefault("length", 1)
        if lag - length - 1 < 0:
            raise ValueError(f"copy of {length} symbols cannot have a lag of {lag} (needs lag >= {length + 1})")
        return make_task("copy", **{**options, "lag": lag - length - 1})
    if name == "delayed_recall":
        options.setdefault("length", 2 * lag)
        return make_task("delayed_recall", **{**options, "lag": lag})
    raise ValueError(f"truncation_vs_lag: task must be 'copy' or 'delayed_recall', got {name!r}")


def train_cell_of_grid(cfg: dict, lag: int, k, seeds) -> dict:
    """Trains one (lag, truncation) for all seeds at once; returns accuracies and timing."""
    task = lag_task(cfg["task"], lag)
    T = task.info["seq_len"]
    m, o, t = cfg["model"], cfg["optimizer"], cfg["training"]
    cell = cells.with_readout(fused.cell(m["cell"], m["hidden"]), task.output_size)
    loss_fn = losses.get_loss(task.loss)
    estimator = bptt(cell, loss_fn) if k == "full" else tbptt(cell, loss_fn, k1=int(k))
    optimizer = optax.chain(optax.clip_by_global_norm(o.get("clip_norm", 1.0)), optax.adam(o["lr"]))
    train_step = make_train_step(estimator, optimizer)
    B, steps = t["batch_size"], t["steps"]
    keys = jnp.stack([jax.random.key(int(s)) for s in seeds])

    def init(key):
        params = cell.init(jax.random.fold_in(key, 0), task.input_size)
        return init_train_state(estimator, optimizer, params, cell.initial_carry(params, (B,)))

    def train(keys):
        def one_step(states, i):
            batches = jax.vmap(lambda key: task.sample(jax.random.fold_in(jax.random.fold_in(key, 1), i), B))(keys)
            states, metrics = jax.vmap(train_step)(states, batches)
            return states, metrics["loss"]

        states, losses_ = jax.lax.scan(one_step, jax.vmap(init)(keys), jnp.arange(steps))
        val = task.sample(jax.random.key(12345), t["eval_batch_size"], "val")
        accuracy = jax.vmap(lambda p: task.metrics(unroll(cell, p, val.inputs)[1], val)["accuracy"])(states.params)
        return accuracy, losses_

    t0 = time.perf_counter()
    accuracy, train_losses = jax.block_until_ready(jax.jit(train)(keys))
    seconds = time.perf_counter() - t0
    acc = [float(a) for a in np.asarray(accuracy)]
    return {"lag": lag, "truncation": k, "seq_len": T, "seeds": [int(s) for s in seeds], "accuracy": acc,
            "mean": float(np.mean(acc)), "std": float(np.std(acc)), "min": float(np.min(acc)),
            "max": float(np.max(acc)), "final_train_loss": [float(x) for x in np.asarray(train_losses[-1])],
            "seconds": round(seconds, 2), "chance": task.info.get("chance_accuracy")}


def markdown_table(rows, lags, truncations, threshold) -> str:
    by = {(r["lag"], str(r["truncation"])): r for r in rows}
    head = "| lag L \\ truncation k | " + " | ".join(str(k) for k in truncations) + " |"
    lines = [head, "|" + " --- |" * (len(truncations) + 1)]
    for L in lags:
        cells_ = []
        for k in truncations:
            r = by[(L, str(k))]
            mark = " **✓**" if r["mean"] >= threshold else ""
            cells_.append(f"{r['mean']:.2f} ({r['min']:.2f}-{r['max']:.2f}){mark}")
        lines.append(f"| {L} | " + " | ".join(cells_) + " |")
    return "\n".join(lines) + "\n"


def heat_map(rows, lags, truncations, path: str, title: str) -> None:
    plt = pyplot()
    by = {(r["lag"], str(r["truncation"])): r["mean"] for r in rows}
    grid = np.array([[by[(L, str(k))] for k in truncations] for L in lags])
    fig, ax = plt.subplots(figsize=(1.2 * len(truncations) + 2, 0.8 * len(lags) + 1.5))
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(truncations)), [str(k) for k in truncations])
    ax.set_yticks(range(len(lags)), [str(L) for L in lags])
    ax.set_xlabel("truncation k (TBPTT(k, k))")
    ax.set_ylabel("time lag L")
    for i in range(len(lags)):
        for j in range(len(truncations)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w" if grid[i, j] < 0.6 else "k")
    fig.colorbar(im, ax=ax, label="final validation accuracy (mean over seeds)")
    ax.set_title(title)
    save_figure(fig, path)


def expected_to_learn(row) -> bool:
    """The textbook expectation: a window longer than the lag learns (``k > L``), a shorter one does not."""
    return row["truncation"] == "full" or row["truncation"] > row["lag"]


def parse_truncation(text: str):
    return "full" if str(text) == "full" else int(text)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--out")
    p.add_argument("--lags", nargs="+", type=int)
    p.add_argument("--truncations", nargs="+")
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    with open(args.config) as f:
        cfg = yaml.safe_load(f)
    lags = args.lags or cfg["lags"]
    truncations = [parse_truncation(k) for k in (args.truncations or cfg["truncations"])]
    seeds = args.seeds if args.seeds is not None else cfg["seeds"]
    if args.steps is not None:
        cfg["training"]["steps"] = args.steps
    out = args.out or cfg["out"]
    threshold = float(cfg.get("success_threshold", 0.9))

    json_path = os.path.join(out, "truncation_vs_lag.json")
    done = {}
    if os.path.exists(json_path):  # resume: keep the cells of an interrupted run with the same config
        with open(json_path) as f:
            previous = json.load(f)
        if previous.get("config") == cfg:
            done = {(r["lag"], str(r["truncation"]), tuple(r["seeds"])): r for r in previous["rows"]}
    rows, t0 = [], time.perf_counter()
    for L in lags:
        for k in truncations:
            r = done.get((L, str(k), tuple(int(s) for s in seeds))) or train_cell_of_grid(cfg, L, k, seeds)
            rows.append(r)
            if not args.quiet:
                seeds_ = ", ".join(f"{a:.2f}" for a in r["accuracy"])
                print(f"L={L:3d} k={k!s:>4}: accuracy {r['mean']:.3f} (seeds {seeds_}) {r['seconds']:.1f}s",
                      file=sys.stderr, flush=True)
            result = write_results(cfg, rows, lags, truncations, seeds, out, threshold, time.perf_counter() - t0)
    if not args.quiet:
        print(markdown_table(rows, lags, truncations, threshold))
    return result


def write_results(cfg, rows, lags, truncations, seeds, out, threshold, seconds) -> dict:
    """Writes the JSON, the markdown table and (once the grid is complete) the heat map; returns the JSON."""
    complete = len(rows) == len(lags) * len(truncations)
    result = {"config": cfg, "lags": lags, "truncations": [str(k) for k in truncations], "rows": rows,
              "complete": complete, "seconds_this_session": round(seconds, 1),
              "cell_seconds_total": round(sum(r["seconds"] for r in rows), 1), "machine": machine_info(),
              "agrees_with_expectation": all((r["mean"] >= threshold) == expected_to_learn(r) for r in rows)}
    os.makedirs(out, exist_ok=True)
    atomic_write(os.path.join(out, "truncation_vs_lag.json"), json.dumps(result, indent=2))
    if not complete:
        return result
    table = markdown_table(rows, lags, truncations, threshold)
    atomic_write(os.path.join(out, "truncation_vs_lag.md"),
                 f"# Truncation vs lag ({cfg['task']['name']}, {cfg['model']['cell']} {cfg['model']['hidden']}, "
                 f"{cfg['training']['steps']} steps, seeds {seeds})\n\nMean (min-max) final validation accuracy; "
                 f"**✓** = mean >= {threshold}. Sum of the cells' wall times: "
                 f"{result['cell_seconds_total']:.0f} s.\n\n{table}")
    heat_map(rows, lags, truncations, os.path.join(out, "truncation_vs_lag.png"),
             f"{cfg['task']['name']}: accuracy after {cfg['training']['steps']} steps")
    return result


if __name__ == "__main__":
    main()
