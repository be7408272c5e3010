"""Plots of run folders (matplotlib, Agg backend): training/validation curves and gradient-flow profiles, as PNG,
PDF or SVG by the output's extension."""

from __future__ import annotations

import io
import json
import math
import os

import yaml

from jbptt.checkpoint import atomic_write
from jbptt.experiment.rundir import read_metrics

FORMATS = ("png", "pdf", "svg")
"""The file formats a plot is written in, named by the output's extension."""

LOSS_LIKE = ("loss", "mse", "nrmse", "mae", "rmse", "bpc", "bits_per_char", "nll", "perplexity", "ppl", "cer", "wer",
             "ler")
"""Validation metrics drawn on a log y axis (lower is better, positive, spanning decades); a name ending in
``_loss`` or ``_mse`` counts too, and so does a run's headline metric whose ``summary.json`` says
``higher_is_better: false``."""

_NOT_METRICS = ("step", "split", "time")


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_format(path: str) -> str:
    """The format named by ``path``'s extension (``"png"``, ``"pdf"`` or ``"svg"``).

    Raises:
      ValueError: another or no extension.
    """
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in FORMATS:
        raise ValueError(f"cannot write a plot as {path!r}: the file name must end in one of "
                         f"{', '.join('.' + f for f in FORMATS)}")
    return ext


def save_figure(fig, path: str) -> str:
    """Writes ``fig`` to ``path`` (atomically) in the format its extension names and closes it. Returns ``path``.

    Raises:
      ValueError: the extension is not one of :data:`FORMATS` (nothing is written).
    """
    fmt = figure_format(path)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format=fmt, dpi=110, bbox_inches="tight")
    finally:
        pyplot().close(fig)
    atomic_write(path, buf.getvalue())
    return path


def is_loss_like(metric: str) -> bool:
    """Whether a validation metric is drawn on a log axis (see :data:`LOSS_LIKE`)."""
    return metric in LOSS_LIKE or metric.endswith(("_loss", "_mse"))


def _read(run_dir: str, name: str, loader):
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return loader(f) or {}


class _Run:
    """What a plot needs of one run folder: its records, summary and task."""

    def __init__(self, run_dir: str, label: str):
        self.dir, self.label = run_dir, label
        self.records = read_metrics(run_dir)  # a cut-off last line is skipped with a warning
        self.summary = _read(run_dir, "summary.json", json.load)
        config = _read(run_dir, "config.yaml", yaml.safe_load)
        self.task = self.summary.get("task") or (config.get("task") or {}).get("name")
        self.train = [r for r in self.records if r.get("split") == "train"]
        self.val = [r for r in self.records if r.get("split") == "val"]
        self.metrics = sorted({k for r in self.val for k in r if k not in _NOT_METRICS})

    def headline(self) -> str | None:
        """The run's headline metric (``summary.json``), else its first validation metric."""
        metric = self.summary.get("metric")
        return metric if metric in self.metrics else (self.metrics[0] if self.metrics else None)

    def lower_is_better(self, metric: str) -> bool:
        """Whether ``metric`` is loss-like: by name (:func:`is_loss_like`) or as the headline metric of a task where
        lower is better."""
        return is_loss_like(metric) or (metric == self.summary.get("metric")
                                        and self.summary.get("higher_is_better") is False)

    def baseline(self, metric: str) -> float | None:
        """The task's baseline for ``metric`` (``summary.json``: the headline metric of a trivial predictor)."""
        value = self.summary.get("baseline")
        return float(value) if isinstance(value, int | float) and metric == self.summary.get("metric") else None


def curves_figure(run_dirs, *, metric: str | None = None, labels=None):
    """The figure of :func:`plot_runs`: a training-loss panel and one validation panel per metric.

    Each run plots ``metric`` (default: its headline metric), so runs of different tasks get a panel each for their
    metrics; loss-like metrics (:func:`is_loss_like`) are on a log axis, and a task's baseline (``baseline`` in
    ``summary.json``) is a dashed horizontal line.

    Raises:
      ValueError: ``metric`` is not a validation metric of every run (the message names those available).
    """
    runs = [_Run(d, labels[i] if labels else os.path.basename(os.path.normpath(d))) for i, d in enumerate(run_dirs)]
    if metric is not None:
        for run in runs:
            if metric not in run.metrics:
                raise ValueError(f"{run.dir} has no validation metric {metric!r}; available: "
                                 f"{', '.join(run.metrics) or 'none (no validation records)'}")
    chosen = [metric or run.headline() for run in runs]
    panels = list(dict.fromkeys(m for m in chosen if m))  # one per metric, in the order of the runs
    plt = pyplot()
    fig, axes = plt.subplots(1, 1 + max(len(panels), 1), figsize=(5.5 * (1 + max(len(panels), 1)), 4), squeeze=False)
    ax_loss, val_axes = axes[0][0], dict(zip(panels, axes[0][1:], strict=False))
    for i, (run, name) in enumerate(zip(runs, chosen, strict=True)):
        color = f"C{i % 10}"
        ax_loss.plot([r["step"] for r in run.train], [r["loss"] for r in run.train], color=color, label=run.label)
        if name is None:
            continue
        ax = val_axes[name]
        points = [(r["step"], r[name]) for r in run.val if name in r]
        ax.plot([s for s, _ in points], [v for _, v in points], marker=".", color=color, label=run.label)
        base = run.baseline(name)
        if base is not None:
            ax.axhline(base, color=color, linestyle="--", linewidth=1, label=f"{run.task or run.label} baseline")
    ax_loss.set(xlabel="step", ylabel="training loss", title="training loss", yscale="log")
    for name, ax in val_axes.items():
        finite = [float(v) for line in ax.get_lines() for v in line.get_ydata() if math.isfinite(float(v))]
        here = [run for run, m in zip(runs, chosen, strict=True) if m == name]
        log = any(run.lower_is_better(name) for run in here) and bool(finite) and min(finite) > 0
        tasks = sorted({run.task for run in here if run.task})
        ax.set(xlabel="step", ylabel=name, title=f"validation {name}" + (f" ({', '.join(tasks)})" if tasks else ""),
               yscale="log" if log else "linear")
    if not val_axes:
        axes[0][1].set(title="validation (no records)")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return fig


def plot_runs(run_dirs, out: str, *, metric: str | None = None, labels=None) -> str:
    """Overlays the training loss and the validation ``metric`` (default: each run's headline metric) of several
    runs in one figure at ``out`` (PNG, PDF or SVG by its extension; see :func:`curves_figure`). Returns ``out``.

    Raises:
      ValueError: ``out`` has another extension, or ``metric`` is not a validation metric of every run.
    """
    figure_format(out)  # before drawing anything
    return save_figure(curves_figure(run_dirs, metric=metric, labels=labels), out)


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
