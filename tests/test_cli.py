"""The command line end to end: the quickstart config (few steps), sampling text, plotting, compare."""

import argparse
import contextlib
import io
import json
import os
import struct
import sys
import types

import jax
import numpy as np
import pytest

from jbptt import cells, cli
from jbptt.experiment import rundir
from jbptt.experiment.build import build_model
from jbptt.experiment.config import ConfigError, parse_config
from jbptt.experiment.sampling import generate
from jbptt.unroll import unroll
from tests.runner_helpers import tiny_raw, write_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """configs/quickstart.yaml run through the CLI, shortened: ``(exit code, stdout, stderr, root, run folder)``."""
    root = tmp_path_factory.mktemp("quickstart")
    out, err = io.StringIO(), io.StringIO()
    args = ["run", os.path.join(REPO, "configs", "quickstart.yaml"), "training.steps=30", "training.eval_every=15",
            "training.eval_batch_size=64", "training.batch_size=16", "task.options.length=20", "model.hidden=8",
            "logging.gradient_flow_batch=4", f"logging.root={root}"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(args)
    dirs = [os.path.join(root, d) for d in os.listdir(root)]
    return code, out.getvalue(), err.getvalue(), root, dirs[0] if len(dirs) == 1 else dirs


def test_quickstart_config_through_the_cli(quickstart, tmp_path):
    code, out, err, root, run_dir = quickstart
    assert code == 0, err
    assert isinstance(run_dir, str), run_dir  # exactly one run folder
    assert os.path.basename(run_dir).startswith("quickstart-") and f"run {run_dir}: completed" in out
    assert "step 30/30" in err  # the progress bar
    files = set(os.listdir(run_dir))
    assert {
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "curves.png",
        "gradient_flow.png",
        "gradient_flow.json",
    } <= files
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["status"] == "completed" and summary["metric"] == "mse"
    assert set(summary["final"]) == {"val", "test"} and summary["machine"]["cpu_count"] >= 1
    flows = json.load(open(os.path.join(run_dir, "gradient_flow.json")))
    assert len(flows["start"]["norms"]) == 20 and flows["end"]["step"] == 30  # one norm per time step
    # Plot the run and an overlay of two runs.
    assert cli.main(["plot", run_dir, run_dir, "--out", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").stat().st_size > 1000
    assert cli.main(["plot", str(tmp_path / "nope")]) == 2


def test_sample_text_from_a_char_run(tmp_path, capsys):
    raw = tiny_raw(tmp_path, task={"name": "chars", "options": {"seq_len": 12}}, training={"steps": 3})
    run_dir = str(tmp_path / "lm")
    assert cli.main(["run", write_config(tmp_path / "lm.yaml", raw), "--run-dir", run_dir, "--quiet"]) == 0
    capsys.readouterr()
    args = ["sample", run_dir, "--prompt", "def ", "--length", "25", "--temperature", "0.8"]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("def ") and len(first.rstrip("\n")) >= 4 + 20
    assert cli.main(args) == 0 and capsys.readouterr().out == first  # deterministic for a seed
    assert cli.main(args[:-2] + ["--seed", "1"]) == 0
    assert cli.main(["sample", run_dir, "--temperature", "0"]) == 2


def test_sample_refuses_non_text_runs(quickstart, capsys):
    run_dir = quickstart[-1]
    assert cli.main(["sample", run_dir]) == 2
    assert "character-level" in capsys.readouterr().err
    before = open(os.path.join(run_dir, "metrics.jsonl")).read()
    config = os.path.join(run_dir, "config.yaml")
    assert cli.main(["run", config, "--run-dir", run_dir]) == 2  # never overwrite a run
    assert "already holds a run" in capsys.readouterr().err
    assert open(os.path.join(run_dir, "metrics.jsonl")).read() == before


def test_generate_greedy_follows_the_argmax(key):
    """Near-zero temperature: every sampled token is the arg-max of the logits after the sequence so far."""
    model = build_model(
        parse_config({"task": {"name": "chars", "options": {"seq_len": 5}}, "model": {"cell": "elman", "hidden": 6}})
    )
    params = model.cell.init(key, model.task.input_size)
    ids = np.asarray(generate(model.cell, params, np.array([3, 4]), 3, key, vocab_size=96, temperature=1e-6))
    seq = [3, 4, *ids.tolist()]  # one unroll over it: the logits after every prefix
    _, ys = unroll(cells.plain(model.cell), params, jax.nn.one_hot(np.array([seq[:-1]]), 96, dtype=np.float32))
    assert np.argmax(np.asarray(ys[0, 1:]), -1).tolist() == ids.tolist()


def test_bad_commands_exit_2(capsys):
    assert cli.main(["compare"]) == 2  # no config
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["run"]) == 2
    assert "run needs a CONFIG" in capsys.readouterr().err


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_writes_plain_lines_when_not_a_terminal(monkeypatch):
    """A log (not a TTY) gets one plain line every ``every`` seconds and the forced last one, no ``\\r`` frames; a
    terminal gets frames redrawn in place."""
    clock = iter([0.0, 1.0, 2.0, 3.0, 12.0, 13.0, 13.5, 25.0, 25.0])
    monkeypatch.setattr(rundir.time, "monotonic", lambda: next(clock))
    log = io.StringIO()
    progress = rundir.Progress(total=8, start=0, quiet=False, stream=log, every=10.0)
    for step, now_loss in zip(range(1, 8), [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], strict=True):
        progress.update(step, now_loss)  # clock 1, 2, 3, 12, 13, 13.5, 25
    progress.update(7, 0.3, force=True)  # the last step was just written: not twice
    progress.close()
    lines = log.getvalue().split("\n")
    assert "\r" not in log.getvalue() and lines[-1] == ""
    assert [line.split()[1] for line in lines[:-1]] == ["4/8", "7/8"]  # at 12 s and 25 s (>= 10 s apart)
    assert "loss 0.6" in lines[0] and "steps/s" in lines[1] and "ETA" in lines[1]
    clock = iter([0.0, 1.0, 1.1, 2.0, 3.0, 4.0])
    monkeypatch.setattr(rundir.time, "monotonic", lambda: next(clock))
    term = _Terminal()
    progress = rundir.Progress(total=3, start=0, quiet=False, stream=term)
    for step in (1, 2, 3):
        progress.update(step, 0.5, force=step == 3)
    progress.close()
    assert term.getvalue().count("\r") == 2 and term.getvalue().endswith("\n")  # steps 1 and 3 (2 came too soon)
    quiet = io.StringIO()
    rundir.Progress(total=3, start=0, quiet=True, stream=quiet).update(1, 0.5, force=True)
    assert quiet.getvalue() == ""


def _tensorboard_scalars(folder):
    """``{(tag, step): value}`` read back from the TFRecord event files in ``folder`` (tensorboardX's protos)."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for name in sorted(os.listdir(folder)):
        data = open(os.path.join(folder, name), "rb").read()
        i = 0
        while i < len(data):  # records: uint64 length, uint32 crc, payload, uint32 crc
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                scalars[(v.tag, event.step)] = v.simple_value
    return scalars


def test_tensorboard_events_mirror_the_metrics(tmp_path):
    pytest.importorskip("tensorboardX")
    rng = np.random.default_rng(0)
    records = [{"split": "train", "step": 5, "loss": rng.random(), "grad_norm": rng.random(), "lr": 1e-3, "time": 1.5},
               {"split": "val", "step": 10, "mse": rng.random(), "nrmse": rng.random(), "time": 3.0},
               {"split": "train", "step": 10, "loss": rng.random(), "grad_norm": rng.random(), "lr": 1e-3,
                "note": "text", "skipped": True}]
    log = rundir.MetricsLog(str(tmp_path), tensorboard=True)
    for r in records:
        log(r)
    log.close()
    assert rundir.read_metrics(str(tmp_path)) == records  # metrics.jsonl stays the source of truth
    expected = {(f"{r['split']}/{k}", r["step"]): v for r in records for k, v in r.items()
                if k not in ("split", "step", "time", "note", "skipped")}
    got = _tensorboard_scalars(tmp_path / "tensorboard")
    assert set(got) == set(expected)
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=1e-6)  # float32 values


def test_tensorboard_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # `import tensorboardX` raises ImportError
    with pytest.raises(ConfigError, match=r"logging.tensorboard: .*pip install 'jbptt\[tensorboard\]'"):
        rundir.check_tensorboard()
    with pytest.raises(ConfigError, match="tensorboardX"):
        rundir.MetricsLog(str(tmp_path), tensorboard=True)
    assert not os.listdir(tmp_path)  # nothing written
    log = rundir.MetricsLog(str(tmp_path))  # off: no package needed
    log({"split": "train", "step": 1, "loss": 0.5})
    log.close()
    assert rundir.read_metrics(str(tmp_path)) == [{"split": "train", "step": 1, "loss": 0.5}]


def test_overwrite_removes_the_old_event_files(tmp_path):
    cfg = parse_config(tiny_raw(tmp_path))
    run_dir = rundir.open_run_dir(cfg, str(tmp_path / "r"))
    os.makedirs(tmp_path / "r" / "tensorboard")
    (tmp_path / "r" / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"old")
    (tmp_path / "r" / "tensorboard" / "mine.txt").write_text("kept")
    with pytest.raises(ConfigError, match="already holds a run"):
        rundir.open_run_dir(cfg, run_dir)
    rundir.open_run_dir(cfg, run_dir, overwrite=True)
    assert os.listdir(tmp_path / "r" / "tensorboard") == ["mine.txt"]


def test_sweep_parses_its_axes_and_hands_them_to_the_sweep_module(monkeypatch, capsys):
    args = cli.parser().parse_args(["sweep", "c.yaml", "optimizer.lr=1e-3,3e-3", "seed=0..4", "training.steps=5",
                                    "--parallel", "vmap", "--sweep-dir", "out", "--quiet"])
    assert (args.command, args.config, args.parallel, args.sweep_dir, args.quiet) == ("sweep", "c.yaml", "vmap",
                                                                                       "out", True)
    assert args.axes == ["optimizer.lr=1e-3,3e-3", "seed=0..4", "training.steps=5"]
    defaults = cli.parser().parse_args(["sweep", "c.yaml"])
    assert (defaults.axes, defaults.parallel, defaults.sweep_dir, defaults.quiet) == ([], "auto", None, False)
    assert cli.main(["sweep", "c.yaml", "--parallel", "threads"]) == 2
    seen = []
    fake = types.ModuleType("jbptt.experiment.sweep")
    fake.run_cli = lambda a: seen.append(a) or 7
    monkeypatch.setitem(sys.modules, "jbptt.experiment.sweep", fake)
    assert cli.main(["sweep", "c.yaml", "seed=0..2"]) == 7 and seen[0].axes == ["seed=0..2"]
    monkeypatch.setitem(sys.modules, "jbptt.experiment.sweep", None)  # not installed: a clear message
    capsys.readouterr()
    assert cli.main(["sweep", "c.yaml"]) == 1
    assert "sweep is not available" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "sample", "plot", "sweep"])
def test_every_option_is_described_in_help(command):
    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    undescribed = [a.dest for a in sub._actions if not a.help]
    assert not undescribed, f"jbptt {command} --help does not describe {undescribed}"
