"""The comparison report: its tables as Markdown and its plots (PNG), from the dict
:func:`jbptt.experiment.compare.run` measures."""

from __future__ import annotations

import os

import numpy as np

from jbptt.experiment.plots import pyplot, save_figure


def plot_agreement(agreement: dict, out_dir: str) -> list[str]:
    """``agreement.png`` (relative error and cosine to the reference) and ``alignment_matrix.png`` in ``out_dir``.
    Returns the paths written."""
    plt = pyplot()
    labels = agreement["labels"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    rel = [max(agreement["relative_error"][lab], 1e-17) for lab in labels]
    axes[0].bar(labels, rel)
    axes[0].set_yscale("log")
    axes[0].set_title(f"relative error to {agreement['reference']}")
    axes[1].bar(labels, [agreement["cosine"][lab] for lab in labels])
    axes[1].set_ylim(-1, 1.05)
    axes[1].set_title(f"cosine to {agreement['reference']}")
    for ax in axes:
        ax.tick_params(axis="x", rotation=45)
    paths = [save_figure(fig, os.path.join(out_dir, "agreement.png"))]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(labels), 0.8 + 0.6 * len(labels)))
    m = np.asarray(agreement["alignment_matrix"])
    im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(labels)), labels, rotation=45)
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="cosine")
    ax.set_title("gradient alignment")
    paths.append(save_figure(fig, os.path.join(out_dir, "alignment_matrix.png")))
    return paths


def plot_training(training: dict, out_dir: str) -> list[str]:
    """``learning_curves.png`` (validation loss against iterations and wall time) and ``alignment_training.png``
    (cosine to the reference along training) in ``out_dir``. Returns the paths written."""
    plt = pyplot()
    curves = training["curves"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for lab, c in curves.items():
        axes[0].plot(c["iteration"], c["loss"], label=lab)
        axes[1].plot(np.asarray(c["wall_time"]) + 1e-3, c["loss"], label=lab)
    axes[0].set_xlabel("iteration (batches of sequences)")  # updates / chunks per sequence
    axes[1].set_xlabel("wall time after the first (compiling) step [s], evaluations included")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("validation loss")
        ax.legend(fontsize=8)
    paths = [save_figure(fig, os.path.join(out_dir, "learning_curves.png"))]
    fig, ax = plt.subplots(figsize=(6, 4))
    for lab, c in curves.items():
        ax.plot(c["align_iteration"], c["align_cosine"], marker="o", label=lab)
    ax.set_xlabel("iteration")
    ax.set_ylabel("cosine to the reference at the current parameters")
    ax.set_ylim(-1, 1.05)
    ax.legend(fontsize=8)
    paths.append(save_figure(fig, os.path.join(out_dir, "alignment_training.png")))
    return paths


def plot_scaling(scaling: dict, out_dir: str) -> list[str]:
    """``scaling_<series>.png`` (time and temp memory against the varied size, log-log) for every series in
    ``out_dir``. Returns the paths written."""
    plt = pyplot()
    paths = []
    for name, res in scaling.items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for lab, r in res["estimators"].items():
            xs = [p["value"] for p in r["points"]]
            if not xs:
                continue
            te, me = r["time_exponent"]["upper_half"], r["memory_exponent"]["upper_half"]
            axes[0].plot(xs, [p["time_s"] for p in r["points"]], marker="o",
                         label=f"{lab} (slope {te:.2f})" if te is not None else lab)
            mem = [p["temp_bytes"] or np.nan for p in r["points"]]
            axes[1].plot(xs, mem, marker="o", label=f"{lab} (slope {me:.2f})" if me is not None else lab)
        axes[0].set_ylabel("wall time per update [s]")
        axes[1].set_ylabel("XLA temp memory [bytes]")
        for ax in axes:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(res["vary"])
            ax.legend(fontsize=8)
        fig.suptitle(f"{res['cell']}: cost against {res['vary']} ({res['fixed']})")
        paths.append(save_figure(fig, os.path.join(out_dir, f"scaling_{name}.png")))
    return paths


def _fmt(x, spec=".3g"):
    return "—" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    """The report's tables as Markdown."""
    lines = [f"# Estimator comparison: {report['config_file']}", "",
             f"Machine: {report['machine']['platform']}, {report['machine']['devices']}; jax "
             f"{report['machine']['jax']}. Times are medians on a possibly shared machine.", ""]
    ag = report.get("agreement")
    if ag:
        labels = ag["labels"]
        lines += [f"## Gradient agreement with {ag['reference']} (initial parameters)", "",
                  "| estimator | relative error | cosine |", "| --- | --- | --- |"]
        lines += [f"| {lab} | {ag['relative_error'][lab]:.3g} | {ag['cosine'][lab]:.4f} |" for lab in labels]
        lines += ["", "### Alignment matrix (cosine between estimators)", "",
                  "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for lab, row in zip(labels, ag["alignment_matrix"], strict=True):
            lines.append(f"| {lab} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
        lines.append("")
    sc = report.get("scaling")
    if sc:
        lines += ["## Cost scaling (fitted log-log exponents: all points / larger half)", "",
                  "| series | estimator | time exponent | memory exponent | time at largest | temp memory at largest |"
                  " note |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, res in sc.items():
            for lab, r in res["estimators"].items():
                last = r["points"][-1] if r["points"] else {}
                te, me = r["time_exponent"], r["memory_exponent"]
                lines.append(
                    f"| {name} | {lab} | {_fmt(te['all'], '.2f')} / {_fmt(te['upper_half'], '.2f')} | "
                    f"{_fmt(me['all'], '.2f')} / {_fmt(me['upper_half'], '.2f')} | "
                    f"{_fmt(last.get('time_s'))} s | {_fmt(last.get('temp_bytes'), ',')} B | "
                    f"{(r['skipped'] or '')[:80]} |")
        lines.append("")
    tr = report.get("training")
    if tr:
        lines += ["## Learning curves (final validation loss and metric)", "",
                  f"| estimator | updates | wall time after step 1 [s] | final loss | final {tr['metric']} |"
                  " mean cosine to the reference along training |", "| --- | --- | --- | --- | --- | --- |"]
        for lab, c in tr["curves"].items():
            lines.append(f"| {lab} | {c['updates'][-1]} | {c['wall_time'][-1]:.2f} | {c['loss'][-1]:.4f} | "
                         f"{c['metric'][-1]:.4f} | {np.mean(c['align_cosine']):.3f} |")
        lines.append("")
    lines += ["Plots: " + ", ".join(os.path.basename(p) for p in report.get("plots", [])), ""]
    return "\n".join(lines)
