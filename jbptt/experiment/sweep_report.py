"""The reports of a sweep (:mod:`jbptt.experiment.sweep`): ``sweep.json``, ``sweep.md``, ``curves.png`` (validation
curves, mean over seeds with a min–max band) and, for two non-seed axes, ``heatmap.png``.

``plan`` below is a :class:`jbptt.experiment.sweep.Plan` (``config``, ``axes``, ``fixed``, ``grid``, ``points``,
``sweep_dir``); ``records`` maps a point's name to its line of ``sweep.json`` (:func:`record`).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from jbptt import checkpoint as ckpt
from jbptt.experiment import plots, rundir

FINISHED = ("completed", "early_stopped", "halted_nan")
"""Statuses of a run that a restarted sweep does not run again (the first two count in the aggregates)."""


def read_json(path: str):
    """The JSON file at ``path``, or ``None`` if it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def record(point, summary: dict, mode: str) -> dict:
    """One point's line of ``sweep.json`` from its run's summary."""
    metric = summary.get("metric")
    final, best = summary.get("final") or {}, summary.get("best") or {}
    return {"name": point.name, "group": point.group, "overrides": list(point.overrides),
            "status": summary["status"], "message": summary.get("message"), "mode": mode, "metric": metric,
            "higher_is_better": summary.get("higher_is_better"),
            "final_val": final.get("val", {}).get(metric), "best_val": best.get("val"),
            "final_test": final.get("test", {}).get(metric), "best_test": best.get("test", {}).get(metric),
            "steps": summary.get("steps"), "wall_time_s": summary.get("wall_time_s")}


def stats(values) -> dict | None:
    """``{"mean", "min", "max", "n"}`` of the finite numbers among ``values`` (``None`` if there are none)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    return {"mean": float(np.mean(xs)), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else None


def aggregate(plan, records: dict) -> list[dict]:
    """Per group (point of the non-seed axes): its seeds and the mean/min/max over them of the final and best
    validation metric and the test values that go with them."""
    out = {}
    for pt in plan.points:
        g = out.setdefault(pt.group, {"group": pt.group, "overrides": [o for o in pt.overrides
                                                                       if not o.startswith("seed=")],
                                      "points": [], "statuses": {}})
        g["points"].append(pt.name)
        r = records.get(pt.name)
        if r is not None:
            g["statuses"][r["status"]] = g["statuses"].get(r["status"], 0) + 1
            if r["metric"] and not g.get("metric"):
                g["metric"], g["higher_is_better"] = r["metric"], r["higher_is_better"]
    for g in out.values():
        rs = [records[n] for n in g["points"] if n in records and records[n]["status"] in FINISHED[:2]]
        for key in ("final_val", "best_val", "final_test", "best_test", "wall_time_s"):
            g[key] = stats(r[key] for r in rs)
    return list(out.values())


def write_reports(plan, records: dict, parallel: str, seconds: float, figures: bool = True) -> dict:
    """Writes ``sweep.json`` and ``sweep.md`` (and with ``figures`` the plots) into the sweep folder."""
    groups = aggregate(plan, records)
    result = {"config": plan.config, "axes": plan.axes, "fixed": plan.fixed, "sweep_dir": plan.sweep_dir,
              "parallel": parallel,
              "complete": all(q.name in records for q in plan.points), "wall_time_s": round(seconds, 2),
              "points": [records[q.name] for q in plan.points if q.name in records], "groups": groups,
              "machine": rundir.machine_info()}
    rundir.write_json(plan.sweep_dir, "sweep.json", result)
    ckpt.atomic_write(os.path.join(plan.sweep_dir, "sweep.md"), markdown(plan, result))
    if figures and any(g.get("final_val") for g in groups):
        plot_curves(plan, groups, os.path.join(plan.sweep_dir, "curves.png"))
        axes2 = [a for a in plan.grid if a.key != "seed"]
        if len(axes2) == 2:
            heat_map(groups, axes2, os.path.join(plan.sweep_dir, "heatmap.png"))
    return result


def _fmt(s: dict | None) -> str:
    if not s:
        return "-"
    return f"{s['mean']:.4g}" if s["n"] == 1 else f"{s['mean']:.4g} ({s['min']:.4g}–{s['max']:.4g})"


def markdown(plan, result: dict) -> str:
    """``sweep.md``: per group, the mean (min–max) over seeds of the final and best metrics."""
    groups = result["groups"]
    metric = next((g["metric"] for g in groups if g.get("metric")), "metric")
    lines = [f"# Sweep: {os.path.basename(plan.config)} {' '.join(plan.axes)}", "",
             f"{len(result['points'])} of {len(plan.points)} points have run; `{metric}` on the validation split "
             f"(final: at the last step, best: the best evaluation, with its test value); mean (min–max) over "
             f"seeds. This session's wall time {result['wall_time_s']:.0f} s (`--parallel {result['parallel']}`"
             + ("; vmapped seeds share one wall time" if any(r["mode"] == "vmap" for r in result["points"]) else "")
             + ").", "",
             f"| point | seeds done | final val {metric} | best val {metric} | final test {metric} | "
             f"best test {metric} | wall s |", "|" + " --- |" * 7]
    for g in groups:
        n = sum(v for k, v in g["statuses"].items() if k in FINISHED[:2])
        lines.append(f"| {g['group']} | {n}/{len(g['points'])} | {_fmt(g['final_val'])} | {_fmt(g['best_val'])} "
                     f"| {_fmt(g['final_test'])} | {_fmt(g['best_test'])} | {_fmt(g['wall_time_s'])} |")
    axes2 = [a for a in plan.grid if a.key != "seed"]
    if len(axes2) == 2:
        by = {g["group"]: g for g in groups}
        lines += ["", f"Mean final val {metric}: rows {axes2[0].key}, columns {axes2[1].key}.", "",
                  f"| {axes2[0].key} \\ {axes2[1].key} | " + " | ".join(axes2[1].texts) + " |",
                  "|" + " --- |" * (len(axes2[1].texts) + 1)]
        for a in axes2[0].texts:
            row = [by.get(f"{axes2[0].key}={a},{axes2[1].key}={b}".replace("/", "_"), {}).get("final_val")
                   for b in axes2[1].texts]
            lines.append(f"| {a} | " + " | ".join(f"{s['mean']:.3g}" if s else "-" for s in row) + " |")
    return "\n".join(lines) + "\n"


def _val_curves(run_dir: str, metric: str) -> dict:
    return {r["step"]: r[metric] for r in rundir.read_metrics(run_dir) if r["split"] == "val" and metric in r}


def plot_curves(plan, groups: list, out: str) -> str:
    """Overlays every group's validation curve: the mean over its seeds, a min–max band. Returns ``out``."""
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    log, stem = True, os.path.splitext(os.path.basename(plan.config))[0]
    for g in groups:
        if not g.get("metric"):
            continue
        curves = [_val_curves(os.path.join(plan.sweep_dir, n), g["metric"]) for n in g["points"]]
        curves = [c for c in curves if c]
        steps = sorted(set.intersection(*[set(c) for c in curves])) if curves else []
        if not steps:
            continue
        ys = np.array([[c[s] for s in steps] for c in curves], np.float64)
        log = log and not g["higher_is_better"] and bool(np.all(ys > 0))
        name = stem if g["group"] == "run" else g["group"]
        (line,) = ax.plot(steps, ys.mean(0), label=f"{name} ({len(curves)} seeds)")
        ax.fill_between(steps, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
    metric = next((g["metric"] for g in groups if g.get("metric")), "metric")
    ax.set(xlabel="step", ylabel=f"validation {metric}", yscale="log" if log else "linear",
           title=f"{os.path.basename(plan.config)}: mean over seeds, band min–max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return plots.save_figure(fig, out)


def heat_map(groups: list, axes2: list, out: str) -> str:
    """The mean final validation metric over two non-seed axes (rows: the first). Returns ``out``."""
    plt = plots.pyplot()
    by = {g["group"]: g for g in groups}
    grid = np.array([[(by.get(f"{axes2[0].key}={a},{axes2[1].key}={b}".replace("/", "_"), {}).get("final_val")
                       or {"mean": np.nan})["mean"] for b in axes2[1].texts] for a in axes2[0].texts])
    metric = next((g["metric"] for g in groups if g.get("metric")), "metric")
    fig, ax = plt.subplots(figsize=(1.2 * len(axes2[1].texts) + 2, 0.8 * len(axes2[0].texts) + 1.5))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(axes2[1].texts)), axes2[1].texts)
    ax.set_yticks(range(len(axes2[0].texts)), axes2[0].texts)
    ax.set(xlabel=axes2[1].key, ylabel=axes2[0].key)
    mid = np.nanmean(grid) if np.isfinite(grid).any() else 0.0
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w" if grid[i, j] < mid else "k")
    fig.colorbar(im, ax=ax, label=f"final validation {metric} (mean over seeds)")
    return plots.save_figure(fig, out)
