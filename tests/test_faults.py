"""Faults found by using ``jbptt`` as a user would (issue 14): each one pinned by a test."""

import ast
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import yaml

from jbptt import checkpoint as ckpt
from jbptt import cli
from jbptt.experiment import loop, rundir
from jbptt.experiment.config import ConfigError, load_config, parse_config
from jbptt.experiment.runner import train
from tests import test_runner  # noqa: F401 (registers the test_nan_after estimator)
from tests.runner_helpers import metrics_without_time, tiny_raw, write_config


def run_cli(*args):
    """``(exit code, stdout, stderr)`` of ``jbptt *args`` run in-process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("overrides, key", [
    (["optimizer.options.b1=abc"], "optimizer.options"),
    (["model.cell=lstm", "model.options.forget_bias=abc"], "model.options"),
    (["task.options.dtype=float16"], "task.options.dtype"),
    (["estimator.name=uoro", "estimator.options.eps=abc"], "estimator.options"),
])
def test_bad_option_values_are_config_errors_before_anything_is_written(tmp_path, overrides, key):
    root = tmp_path / "runs"
    config = write_config(tmp_path / "c.yaml", tiny_raw(root))
    code, out, err = run_cli("run", config, *overrides, "--quiet")
    assert code == 2, err
    assert "config error" in err and f": {key}: " in err and "Traceback" not in err
    assert "multiple values" not in err
    assert not os.path.exists(root)


def test_a_duplicate_yaml_key_is_a_config_error_naming_the_key_and_file(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("task: {name: adding}\nmodel:\n  hidden: 8\n  cell: gru\n  hidden: 16\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert "hidden" in str(e.value) and str(path) in str(e.value) and "duplicate" in str(e.value)
    assert "line 5" in str(e.value)
    path.write_text("task: {name: adding}\nmodel: {hidden: 8}\nmodel: {cell: gru}\n")
    code, _, err = run_cli("run", path)
    assert code == 2 and "duplicate key" in err and ": model: " in err
    path.write_text("task: {name: adding}\nmodel: {hidden: 8, cell: gru}\n")  # same key in two mappings: fine
    assert load_config(str(path)).model.hidden == 8


def test_a_nan_validation_halts_before_saving_and_says_what_exists(tmp_path):
    # lr 1e30: the loss of step 1 is finite, the parameters after it are not usable: validation is Inf/NaN.
    raw = tiny_raw(tmp_path, optimizer={"lr": 1e30}, training={"eval_every": 1, "steps": 5})
    summary = train(parse_config(raw), str(tmp_path / "r"))
    assert summary["status"] == "halted_nan" and summary["steps"] == 1, summary
    assert "non-finite validation" in summary["message"] and "before saving" in summary["message"]
    assert not os.path.exists(tmp_path / "r" / "checkpoints" / "best.msgpack")
    last = tmp_path / "r" / "checkpoints" / "last.msgpack"
    if last.exists():  # whatever exists is what the message names
        assert "step 0) is left as it was" in summary["message"]
    else:
        assert "no checkpoint has been written" in summary["message"]


def test_skipping_non_finite_steps_halts_after_a_bound(tmp_path):
    raw = tiny_raw(tmp_path, estimator={"name": "test_nan_after", "options": {"after": 3}},
                   training={"on_nan": "skip", "max_consecutive_skips": 4})
    code, _, err = run_cli("run", write_config(tmp_path / "c.yaml", raw), "--run-dir", tmp_path / "r", "--quiet")
    assert code == 1, err
    with open(tmp_path / "r" / "summary.json") as f:
        summary = json.load(f)
    assert summary["status"] == "halted_nan" and summary["steps"] == 7
    assert summary["skipped_steps"] == 4 and summary["consecutive_skips"] == 4
    assert "4 consecutive steps skipped" in summary["message"] and "max_consecutive_skips" in summary["message"]
    assert "no checkpoint has been written" in summary["message"] or "is left as it was" in summary["message"]
    with pytest.raises(ConfigError, match="training.max_consecutive_skips"):
        parse_config(tiny_raw(tmp_path, training={"max_consecutive_skips": 0}))


def test_a_truncated_last_metrics_line_is_trimmed_on_resume_and_skipped_by_plot(tmp_path):
    raw = tiny_raw(tmp_path, training={"steps": 10, "checkpoint_every": 5})
    config = write_config(tmp_path / "c.yaml", raw)
    run = tmp_path / "r"
    assert run_cli("run", config, "--run-dir", run, "--quiet")[0] == 0
    metrics = run / "metrics.jsonl"
    complete = metrics_without_time(run)
    metrics.write_text(metrics.read_text() + '{"step": 11, "split": "tr')  # killed mid-write
    with pytest.warns(RuntimeWarning, match="incomplete last line"):
        code, out, err = run_cli("plot", run, "--out", tmp_path / "p.png")
    assert code == 0 and os.path.exists(tmp_path / "p.png"), err
    with pytest.warns(RuntimeWarning, match="incomplete last line"):
        code, out, err = run_cli("run", "--resume", run, "training.steps=15", "--quiet")
    assert code == 0, err
    resumed = metrics_without_time(run)  # every line parses again
    assert resumed[: len(complete)] == complete and max(r["step"] for r in resumed) == 15
    metrics.write_text('{"step": 1\n' + metrics.read_text())  # a bad line before the last: a clear error
    code, _, err = run_cli("plot", run, "--out", tmp_path / "q.png")
    assert code == 1 and "line 1 is not a JSON record" in err


def test_a_checkpoint_corrupted_in_the_middle_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    tree = {"w": rng.normal(size=(16, 16)), "b": rng.normal(size=16).astype(np.float32), "k": jax.random.key(3)}
    path = str(tmp_path / "c.msgpack")
    ckpt.save(path, tree)
    back = ckpt.load(path, tree)
    np.testing.assert_array_equal(back["w"], tree["w"])
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2  # inside w's float64 bytes: msgpack itself would read them without complaint
    data[mid: mid + 8] = bytes(8)
    open(path, "wb").write(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="checksum"):
        ckpt.load(path, tree)
    open(path, "wb").write(ckpt.to_bytes(tree))  # a checkpoint written before checksums: still loads
    np.testing.assert_array_equal(ckpt.load(path, tree)["b"], tree["b"])


def test_run_dir_of_an_existing_run_is_refused_unless_overwrite(tmp_path):
    run = tmp_path / "r"
    first = write_config(tmp_path / "a.yaml", tiny_raw(tmp_path, training={"steps": 5, "eval_every": 5}))
    other = write_config(tmp_path / "b.yaml", tiny_raw(tmp_path, model={"hidden": 4}, training={"steps": 4}))
    assert run_cli("run", first, "--run-dir", run, "--quiet")[0] == 0
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, _, err = run_cli("run", other, "--run-dir", run, "--quiet")
    assert code == 2 and "already holds a run" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing touched
    code, _, err = run_cli("run", other, "--run-dir", run, "--overwrite", "--quiet")
    assert code == 0, err
    assert load_config(str(run / "config.yaml")).model.hidden == 4
    assert max(r["step"] for r in metrics_without_time(run)) == 4
    code, _, err = run_cli("run", "--resume", run, "--run-dir", tmp_path / "x")
    assert code == 2 and "--resume" in err and not (tmp_path / "x").exists()


def test_a_second_resume_of_a_running_run_is_refused(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    write_config(run / "config.yaml", tiny_raw(tmp_path))  # a run folder (the lock is taken before anything else)
    with rundir.run_lock(str(run)):  # what a first `jbptt run --resume` holds while it trains
        code, _, err = run_cli("run", "--resume", run, "training.steps=4", "--quiet")
        assert code == 2 and "in use by another jbptt process" in err and f"pid {os.getpid()}" in err
    assert sorted(p.name for p in run.iterdir()) == [".lock", "config.yaml"]  # the refused resume wrote nothing
    with rundir.run_lock(str(run)):  # released when its holder is done
        pass


@pytest.mark.parametrize("how", ["file in the way", "read-only"])
def test_an_unwritable_runs_folder_is_a_clear_error(tmp_path, how):
    root = tmp_path / "runs"
    if how == "file in the way":
        root.write_text("")  # logging.root is a file: the run folder cannot be made under it
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes to read-only folders")
        root.mkdir()
        root.chmod(0o555)
    config = write_config(tmp_path / "c.yaml", tiny_raw(root))
    code, _, err = run_cli("run", config, "--quiet")
    assert code == 2 and "cannot write the run folder" in err and ": logging.root: " in err, err
    assert "Traceback" not in err


def test_sigint_at_start_up_step_0_checkpoint_and_keep_checkpoints(tmp_path, monkeypatch):
    run, ck = tmp_path / "r", tmp_path / "r" / "checkpoints"
    raw = tiny_raw(tmp_path, training={"steps": 3, "eval_every": 3, "checkpoint_every": 1, "keep_checkpoints": 2})
    config = write_config(tmp_path / "c.yaml", raw)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # SIGINT after the folder is written, before the loop's own handler is on

    with monkeypatch.context() as m:
        m.setattr(loop, "run_steps", interrupted)
        code, _, err = run_cli("run", config, "--run-dir", run, "--quiet")
    assert code == 130 and "interrupted (SIGINT)" in err and "Traceback" not in err
    assert sorted(os.listdir(ck)) == ["last.msgpack"]  # the step-0 checkpoint
    (ck / "last.msgpack").unlink()  # as if killed before it: the run restarts from step 0
    code, _, err = run_cli("run", "--resume", run, "--quiet")
    assert code == 0, err
    assert sorted(os.listdir(ck)) == ["best.msgpack", "last.msgpack", "step-00000002.msgpack"]  # keep 2
    (ck / "last.msgpack").write_bytes(b"JBPTT-CKPT sha256 0\n")  # one bad save: the kept one is used
    with pytest.warns(RuntimeWarning, match="resuming from .*step-00000002"):
        code, _, err = run_cli("run", "--resume", run, "training.steps=4", "--quiet")
    assert code == 0, err
    assert [r["step"] for r in metrics_without_time(run) if r["split"] == "val"] == [3, 4]


def test_version_print_config_and_a_cli_that_loads_jax_only_when_needed(tmp_path, capsys):
    import jbptt.cli as cli_module

    with pytest.raises(SystemExit) as e:
        cli.parser().parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("jbptt ")
    raw = tiny_raw(tmp_path / "runs", model={"hidden": 5})
    config = write_config(tmp_path / "c.yaml", raw)
    code, out, err = run_cli("run", config, "optimizer.lr=0.5", "--print-config")
    assert code == 0, err
    assert parse_config(yaml.safe_load(out)) == load_config(config, ["optimizer.lr=0.5"])
    assert not (tmp_path / "runs").exists()  # nothing ran, nothing was written
    # --help, --version and argument errors answer without the experiment layer: cli imports it lazily.
    with open(cli_module.__file__) as f:
        tree = ast.parse(f.read())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in top if isinstance(n, ast.ImportFrom)]
    assert names and not [m for m in names if m.split(".")[0] in ("jbptt", "jax", "flax", "optax", "matplotlib")]


@pytest.mark.slow
def test_a_real_sigint_during_start_up_exits_130_quietly(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_raw(tmp_path / "runs", training={"steps": 100000}))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", "import sys, jbptt.cli; sys.exit(jbptt.cli.main())", "run",
                             config, "--quiet"], cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list((tmp_path / "runs").glob("*/config.yaml")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # the folder was just written: the run is starting up (step-0 save, compile)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    (run,) = (tmp_path / "runs").iterdir()
    code, _, err = run_cli("run", "--resume", run, "training.steps=2", "--quiet")  # not a dead folder
    assert code == 0, err
