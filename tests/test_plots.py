"""``jbptt plot`` on run folders written by hand (metrics.jsonl, config.yaml, summary.json; no training): the output
format follows the extension, loss-like metrics on a log axis, the task's baseline as a line, a panel per metric for
runs of different tasks, unknown metrics refused, a cut-off last record skipped with a warning."""

import json
import os

import numpy as np
import pytest
import yaml

from jbptt import cli
from jbptt.experiment import plots, rundir
from jbptt.experiment.config import parse_config
from jbptt.tasks import make_task

MAGIC = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<svg"}


def write_run(folder, task, metrics, *, seed=0, baseline=None, summary=True, steps=(10, 20, 30)):
    """A run folder of ``task`` whose val records hold random positive values of ``metrics`` (the first is the
    headline). Returns its path and the val records."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        yaml.safe_dump({"task": {"name": task, "options": {}}, "seed": seed}, f)
    records, val = [], []
    for step in steps:
        records.append({"split": "train", "step": step, "loss": float(rng.uniform(0.1, 2)), "grad_norm": 1.0,
                        "lr": 1e-3, "time": step / 10})
        val.append({"split": "val", "step": step, **{m: float(rng.uniform(0.01, 3)) for m in metrics},
                    "time": step / 10})
        records.append(val[-1])
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    if summary:
        with open(os.path.join(folder, "summary.json"), "w") as f:
            json.dump({"task": task, "metric": metrics[0], "higher_is_better": metrics[0] == "accuracy",
                       "baseline": baseline, "status": "completed"}, f)
    return str(folder), val


def _val_axes(fig):
    return {ax.get_ylabel(): ax for ax in fig.axes[1:]}


@pytest.mark.parametrize("ext", ["png", "pdf", "svg"])
def test_the_extension_names_the_format(tmp_path, ext):
    run, _ = write_run(tmp_path / "r", "adding", ["mse"], baseline=1 / 6)
    out = str(tmp_path / f"curves.{ext.upper() if ext == 'pdf' else ext}")
    assert cli.main(["plot", run, "--out", out]) == 0
    head = open(out, "rb").read(4096)
    assert MAGIC[ext] in head and all(m not in head for k, m in MAGIC.items() if k != ext)


@pytest.mark.parametrize("name", ["curves.jpg", "curves", "curves.png.txt"])
def test_an_unknown_extension_is_an_error(tmp_path, capsys, name):
    run, _ = write_run(tmp_path / "r", "adding", ["mse"])
    assert cli.main(["plot", run, "--out", str(tmp_path / name)]) == 2
    assert ".png, .pdf, .svg" in capsys.readouterr().err
    assert not (tmp_path / name).exists()
    with pytest.raises(ValueError, match="must end in one of"):
        plots.save_figure(plots.pyplot().figure(), str(tmp_path / name))


def test_loss_like_metrics_on_a_log_axis_and_the_baseline_as_a_line(tmp_path):
    adding, val = write_run(tmp_path / "adding", "adding", ["mse"], baseline=1 / 6)
    brackets, _ = write_run(tmp_path / "brackets", "brackets", ["accuracy", "loss"], seed=1, baseline=0.5)
    fig = plots.curves_figure([adding])
    ax = _val_axes(fig)["mse"]
    assert ax.get_yscale() == "log" and fig.axes[0].get_yscale() == "log"
    curve, base = ax.get_lines()
    np.testing.assert_array_equal(curve.get_ydata(), [r["mse"] for r in val])
    assert base.get_linestyle() == "--" and list(base.get_ydata()) == [1 / 6, 1 / 6]
    assert "adding baseline" in [t.get_text() for t in ax.get_legend().get_texts()]
    ax = _val_axes(plots.curves_figure([brackets]))["accuracy"]
    assert ax.get_yscale() == "linear"
    assert [list(line.get_ydata()) for line in ax.get_lines()][1] == [0.5, 0.5]
    ax = _val_axes(plots.curves_figure([brackets], metric="loss"))["loss"]
    assert ax.get_yscale() == "log" and len(ax.get_lines()) == 1  # the baseline is the headline metric's
    assert plots.is_loss_like("bpc") and plots.is_loss_like("val_loss") and not plots.is_loss_like("accuracy")
    speech, _ = write_run(tmp_path / "speech", "speech_digits", ["digit_error"], seed=2)  # headline, lower is better
    assert _val_axes(plots.curves_figure([speech]))["digit_error"].get_yscale() == "log"
    os.unlink(os.path.join(speech, "summary.json"))  # a run still going: the name alone decides
    assert _val_axes(plots.curves_figure([speech]))["digit_error"].get_yscale() == "linear"


def test_a_nan_or_zero_keeps_a_loss_axis_sensible(tmp_path):
    run, _ = write_run(tmp_path / "r", "adding", ["mse"])
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"split": "val", "step": 40, "mse": float("nan")}) + "\n")
    assert _val_axes(plots.curves_figure([run]))["mse"].get_yscale() == "log"  # NaN: a gap
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"split": "val", "step": 50, "mse": 0.0}) + "\n")
    assert _val_axes(plots.curves_figure([run]))["mse"].get_yscale() == "linear"  # 0 has no log


def test_runs_of_different_tasks_get_a_panel_per_metric(tmp_path):
    a1, _ = write_run(tmp_path / "a1", "adding", ["mse"], baseline=1 / 6)
    a2, _ = write_run(tmp_path / "a2", "adding", ["mse"], seed=1, baseline=1 / 6)
    lm, _ = write_run(tmp_path / "lm", "chars", ["bpc", "loss", "accuracy"], seed=2)
    fig = plots.curves_figure([a1, lm, a2])
    assert len(fig.axes) == 3 and list(_val_axes(fig)) == ["mse", "bpc"]
    assert len(_val_axes(fig)["mse"].get_lines()) == 4 and len(_val_axes(fig)["bpc"].get_lines()) == 1
    assert "adding" in _val_axes(fig)["mse"].get_title() and "chars" in _val_axes(fig)["bpc"].get_title()
    assert len(fig.axes[0].get_lines()) == 3  # one training-loss panel for all
    assert len(plots.curves_figure([a1, a2]).axes) == 2
    assert cli.main(["plot", a1, lm, "--out", str(tmp_path / "both.svg")]) == 0


def test_an_unknown_metric_is_an_error_naming_the_available_ones(tmp_path, capsys):
    run, _ = write_run(tmp_path / "r", "adding", ["mse", "nrmse"])
    lm, _ = write_run(tmp_path / "lm", "chars", ["bpc"], seed=1)
    with pytest.raises(ValueError, match="no validation metric 'accuracy'; available: mse, nrmse"):
        plots.plot_runs([run], str(tmp_path / "x.png"), metric="accuracy")
    assert cli.main(["plot", run, lm, "--metric", "nrmse", "--out", str(tmp_path / "y.png")]) == 2
    err = capsys.readouterr().err
    assert "lm has no validation metric 'nrmse'; available: bpc" in err and not (tmp_path / "y.png").exists()
    assert cli.main(["plot", run, "--metric", "nrmse", "--out", str(tmp_path / "z.png")]) == 0
    assert list(_val_axes(plots.curves_figure([run], metric="nrmse"))) == ["nrmse"]


def test_a_cut_off_last_record_is_skipped_with_a_warning(tmp_path, capsys):
    run, val = write_run(tmp_path / "r", "adding", ["mse"], summary=False)  # a run still going: no summary
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"split": "val", "step": 40, "ms')
    with pytest.warns(RuntimeWarning, match="incomplete last line 7"):
        fig = plots.curves_figure([run])
    np.testing.assert_array_equal(_val_axes(fig)["mse"].get_lines()[0].get_ydata(), [r["mse"] for r in val])
    with pytest.warns(RuntimeWarning):
        assert cli.main(["plot", run]) == 0
    assert os.path.getsize(os.path.join(run, "curves.png")) > 1000
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('\n{"split": "val", "step": 50, "mse": 1.0}\n')  # the bad line is no longer the last
    capsys.readouterr()
    assert cli.main(["plot", run]) == 1 and "line 7 is not a JSON record" in capsys.readouterr().err


def test_summaries_carry_the_task_baseline(tmp_path):
    cfg = parse_config({"task": {"name": "adding", "options": {"length": 5}}})
    head = rundir.summary_head(cfg, make_task("adding", length=5), str(tmp_path), "completed", 3)
    assert head["metric"] == "mse" and head["baseline"] == pytest.approx(1 / 6)
    cfg = parse_config({"task": {"name": "copy"}})
    assert rundir.summary_head(cfg, make_task("copy"), str(tmp_path), "completed", 3)["baseline"] is None
