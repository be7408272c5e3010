"""Truncation length vs time lag: which dependencies can TBPTT(k, k) learn? A thin wrapper over ``jbptt sweep``.

The experiment is the sweep ``configs/truncation_vs_lag.sweep`` (``jbptt sweep configs/truncation_vs_lag.sweep``:
lags ``task.options.lag`` x truncations ``estimator.options.k1`` x seeds over ``configs/truncation_vs_lag.yaml``,
the seeds of each cell vmapped), which writes one run folder per point, ``sweep.md`` and ``heatmap.png``. This script
runs the same sweep with the grid given as options (``full`` = a truncation of the whole sequence, plain BPTT) and
adds, in ``out`` (the sweep folder):

* ``truncation_vs_lag.json``: per (L, k) the seeds' final validation accuracies, mean, min, max;
* ``truncation_vs_lag.md``: the table of mean (min-max) accuracies (**✓**: mean >= ``--threshold``);
* ``truncation_vs_lag.png``: the heat map of the mean final accuracy (rows: lags, columns: truncations).

Usage::

    python experiments/truncation_vs_lag.py [--config configs/truncation_vs_lag.yaml] [--out DIR]
        [--lags 5 10] [--truncations 5 full] [--seeds 0 1] [--steps 400] [--threshold 0.9] [--quiet]
"""

from __future__ import annotations

import argparse
import json
import os

from jbptt.checkpoint import atomic_write
from jbptt.experiment import sweep, sweep_report
from jbptt.experiment.config import load_config

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "truncation_vs_lag.yaml")
LAGS, TRUNCATIONS, SEEDS = [5, 10, 20, 40], ["5", "10", "20", "40", "full"], [0, 1, 2]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=DEFAULT_CONFIG, help="the run config (one lag, one truncation)")
    p.add_argument("--out", default="results/truncation_vs_lag", help="the sweep folder")
    p.add_argument("--lags", nargs="+", type=int, default=LAGS)
    p.add_argument("--truncations", nargs="+", default=TRUNCATIONS, help="integers or 'full'")
    p.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    p.add_argument("--steps", type=int)
    p.add_argument("--threshold", type=float, default=0.9, help="mean accuracy counted as learned in the table")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    length = load_config(args.config).task.options.get("length", 50)
    k1 = {k: length if k == "full" else int(k) for k in args.truncations}
    axes = [f"task.options.lag={','.join(map(str, args.lags))}",
            f"estimator.options.k1={','.join(str(k1[k]) for k in args.truncations)}",
            f"seed={','.join(map(str, args.seeds))}"] + ([f"training.steps={args.steps}"] if args.steps else [])
    result = sweep.run_sweep(args.config, axes, sweep_dir=args.out, quiet=args.quiet, subprocesses=False)
    acc = {}  # (lag, k1) -> final validation accuracies of the seeds
    for point in result["points"]:
        cfg = load_config(os.path.join(args.out, point["name"], "config.yaml"))
        acc.setdefault((cfg.task.options["lag"], cfg.estimator.options["k1"]), []).append(point["final_val"])
    rows = []
    for lag in args.lags:
        for k in args.truncations:
            s = sweep_report.stats(acc.get((lag, k1[k]), [])) or {"mean": float("nan"), "min": None, "max": None}
            rows.append({"lag": lag, "truncation": k if k == "full" else int(k), "k1": k1[k],
                         "accuracy": acc.get((lag, k1[k]), []), "mean": s["mean"], "min": s["min"], "max": s["max"]})
    out = {"config": args.config, "lags": args.lags, "truncations": args.truncations, "seeds": args.seeds,
           "rows": rows, "sweep": os.path.join(args.out, "sweep.json")}
    atomic_write(os.path.join(args.out, "truncation_vs_lag.json"), json.dumps(out, indent=2))
    head = f"| lag L \\ truncation k | {' | '.join(args.truncations)} |\n|" + " --- |" * (len(args.truncations) + 1)
    lines = [f"| {lag} | " + " | ".join(f"{r['mean']:.2f} ({r['min']:.2f}-{r['max']:.2f})"
                                        + (" **✓**" if r["mean"] >= args.threshold else "")
                                        for r in rows if r["lag"] == lag) + " |" for lag in args.lags]
    atomic_write(os.path.join(args.out, "truncation_vs_lag.md"),
                 f"Mean (min-max) final validation accuracy over seeds {args.seeds}; **✓** = mean >= "
                 f"{args.threshold}.\n\n{head}\n" + "\n".join(lines) + "\n")
    groups = [{"group": f"lag={r['lag']},k={r['truncation']}", "metric": "accuracy",
               "final_val": {"mean": r["mean"]}} for r in rows]
    grid = [sweep.Axis("lag", [str(x) for x in args.lags], args.lags), sweep.Axis("k", args.truncations, [])]
    sweep_report.heat_map(groups, grid, os.path.join(args.out, "truncation_vs_lag.png"))
    if not args.quiet:
        print(open(os.path.join(args.out, "truncation_vs_lag.md")).read())
    return out


if __name__ == "__main__":
    main()
