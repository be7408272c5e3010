"""PNG plots of run folders (matplotlib, Agg backend): training/validation curves and gradient-flow
profiles."""

from __future__ import annotations

import io
import json
import os

from jbptt.checkpoint import atomic_write
from jbptt.experiment.rundir import read_metrics


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> str:
    """Writes ``fig`` as a PNG to ``path`` (atomically) and closes it. Returns ``path``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write(path, buf.getvalue())
    pyplot().close(fig)
    return path


def _load(run_dir: str):
    records = read_metrics(run_dir)
    summary = {}
    path = os.path.join(run_dir, "summary.json")
    if os.path.exists(path):
        with open(path) as f:
            summary = json.load(f)
    return records, summary


def _headline(records, summary) -> str | None:
    if summary.get("metric"):
        return summary["metric"]
    val = [r for r in records if r["split"] == "val"]
    keys = [k for k in (val[0] if val else {}) if k not in ("step", "split", "time")]
    return keys[0] if keys else None


def plot_runs(run_dirs, out: str, *, metric: str | None = None, labels=None) -> str:
    """Overlays the training loss and the validation ``metric`` (default: each run's headline metric) of
    several runs in one PNG at ``out``. Returns ``out``."""
    plt = pyplot()
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for i, run_dir in enumerate(run_dirs):
        records, summary = _load(run_dir)
        label = labels[i] if labels else os.path.basename(os.path.normpath(run_dir))
        train = [r for r in records if r["split"] == "train"]
        val = [r for r in records if r["split"] == "val"]
        name = metric or _headline(records, summary)
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label=label)
        if name and val and name in val[0]:
            ax_val.plot(
                [r["step"] for r in val], [r[name] for r in val], marker=".", label=f"{label} ({name})"
            )
    ax_loss.set(xlabel="step", ylabel="training loss", title="training loss", yscale="log")
    ax_val.set(xlabel="step", ylabel=metric or "validation metric", title="validation")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return save_figure(fig, out)


def plot_gradient_flow(run_dir: str, out: str) -> str | None:
    """Plots ``||dL/dh_t||`` against ``t`` at the start and the end of training (log scale) from
    ``gradient_flow.json``. Returns ``out``, or ``None`` if the run has no profile."""
    path = os.path.join(run_dir, "gradient_flow.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        flows = json.load(f)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("start", "end"):
        if key in flows:
            norms = flows[key]["norms"]
            ax.plot(
                range(len(norms)), [max(x, 1e-30) for x in norms], label=f"{key} (step {flows[key]['step']})"
            )
    ax.set(
        xlabel="time step t",
        ylabel="||dL/dh_t||",
        yscale="log",
        title=f"gradient flow: {os.path.basename(os.path.normpath(run_dir))}",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out)


def plot_run(run_dir: str) -> list[str]:
    """Writes ``curves.png`` and ``gradient_flow.png`` into a run folder. Returns the paths written."""
    out = [plot_runs([run_dir], os.path.join(run_dir, "curves.png"))]
    flow = plot_gradient_flow(run_dir, os.path.join(run_dir, "gradient_flow.png"))
    return out + ([flow] if flow else [])
