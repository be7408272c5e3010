"""``jbptt sweep`` (:mod:`jbptt.experiment.sweep`): axes, point folders, aggregates, restarts, vmap == one by one."""

import argparse
import json
import os

import numpy as np
import pytest

from jbptt.experiment import runner, sweep
from jbptt.experiment.config import ConfigError, dump_config, load_config, parse_config
from tests.runner_helpers import metrics_without_time, tiny_raw, write_config


def _config(tmp_path, **sections):
    raw = tiny_raw(tmp_path / "runs", model={"cell": "elman", "hidden": 8, "dtype": "float64"}, **sections)
    return write_config(tmp_path / "tiny.yaml", raw)


def _args(config, axes, **kw):
    return argparse.Namespace(config=config, axes=axes, parallel=kw.get("parallel", "auto"),
                              sweep_dir=kw.get("sweep_dir"), quiet=True)


def test_axes_grid_and_fixed():
    grid, fixed = sweep.parse_axes(["optimizer.lr=0.01,3e-3", "seed=0..2", "model.hidden=16",
                                    "task.options.length=[4,5],6"])
    assert fixed == ["model.hidden=16"]
    assert [(a.key, a.texts, a.values) for a in grid] == [
        ("optimizer.lr", ["0.01", "3e-3"], [0.01, "3e-3"]), ("seed", ["0", "1", "2"], [0, 1, 2]),
        ("task.options.length", ["[4,5]", "6"], [[4, 5], 6])]
    points = sweep.grid_points(grid)
    assert len(points) == 12 and len({p.name for p in points}) == 12
    assert points[0].name == "optimizer.lr=0.01,seed=0,task.options.length=[4,5]"
    assert points[0].group == "optimizer.lr=0.01,task.options.length=[4,5]"
    assert points[1].overrides == ("optimizer.lr=0.01", "seed=0", "task.options.length=6")
    assert {p.group for p in points if p.name.startswith("optimizer.lr=3e-3")} == {
        "optimizer.lr=3e-3,task.options.length=[4,5]", "optimizer.lr=3e-3,task.options.length=6"}
    assert sweep.grid_points(sweep.parse_axes(["seed=3..3"])[0])[0] == sweep.Point("seed=3", ("seed=3",), "run")
    assert sweep.split_values("'a,b',{x: 1, y: 2}") == ["'a,b'", "{x: 1, y: 2}"]


@pytest.mark.parametrize("axes, key", [
    (["seed=2..1"], "seed"), (["seed=0..x"], "seed"), (["seed=0,0"], "seed"), (["lr"], "lr"),
    (["seed=0,1", "seed=2"], "seed"), (["optimizer.lr=0.01,"], "optimizer.lr")])
def test_bad_axes(axes, key):
    with pytest.raises(ConfigError) as e:
        sweep.parse_axes(axes)
    assert e.value.path == key


@pytest.mark.parametrize("axes", [["optimizer.lr=0.01,abc"], ["model.hiden=4,8"], ["seed=0..1", "model.cell=gru,xyz"],
                                  ["optimizer.options.b1=abc,0.9"]])
def test_bad_points_exit_2_before_writing(tmp_path, capsys, axes):
    config = _config(tmp_path)
    assert sweep.run_cli(_args(config, axes)) == 2
    assert "config error" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "runs")


def test_sweep_file_and_default_folder(tmp_path):
    config = _config(tmp_path)
    (tmp_path / "grid.sweep").write_text("config: tiny.yaml\naxes: [seed=0..1, optimizer.lr=0.1]\n")
    path, axes = sweep.read_spec(str(tmp_path / "grid.sweep"), ["optimizer.lr=0.2,0.3"])
    assert path == str(tmp_path / "tiny.yaml") and axes == ["seed=0..1", "optimizer.lr=0.2,0.3"]
    p1, p2 = sweep.plan(config, ["seed=0..1"]), sweep.plan(config, ["seed=0..1"])
    assert p1.sweep_dir == p2.sweep_dir != sweep.plan(config, ["seed=0..2"]).sweep_dir
    assert os.path.basename(p1.sweep_dir).startswith("sweep-tiny-")
    assert os.path.dirname(p1.sweep_dir) == str(tmp_path / "runs")


def _records(path):
    return [{k: v for k, v in r.items() if k != "time"} for r in metrics_without_time(path)]


def _assert_close_records(a, b):
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b, strict=True):
        for k in ra:
            if isinstance(ra[k], float):
                np.testing.assert_allclose(ra[k], rb[k], rtol=1e-9, atol=1e-12, err_msg=k)
            else:
                assert ra[k] == rb[k], k


def test_vmap_equals_one_by_one_and_aggregates(tmp_path):
    """The seeds of a group trained vmapped write what runs of one seed each write (float64), and sweep.json's
    group lines are the mean/min/max of its points' summaries."""
    config = _config(tmp_path)
    axes = ["seed=0..1", "model.hidden=6"]
    vm = sweep.run_sweep(config, axes, sweep_dir=str(tmp_path / "vm"))
    assert [p["mode"] for p in vm["points"]] == ["vmap"] * 2
    for seed in (0, 1):  # the same seeds one by one, as a sweep runs them in process mode
        runner.train(load_config(config, [f"seed={seed}", "model.hidden=6"]), str(tmp_path / "seq" / f"seed={seed}"))
    for name in ("seed=0", "seed=1"):
        a, b = tmp_path / "vm" / name, tmp_path / "seq" / name
        _assert_close_records(_records(a), _records(b))
        sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
        assert sorted(sa) == sorted(sb)
        assert sa["status"] == "completed" and sa["run_dir"] == str(a)
        for k in ("final", "best"):
            np.testing.assert_allclose(sa[k]["test"]["mse"], sb[k]["test"]["mse"], rtol=1e-9)
        np.testing.assert_allclose(sa["final"]["val"]["mse"], sb["final"]["val"]["mse"], rtol=1e-9)
        assert load_config(str(a / "config.yaml")).seed == int(name[-1])
    cfg, _, state = runner.load_run(str(tmp_path / "vm" / "seed=1"))  # a standard run folder: its checkpoint loads
    assert int(state.step) == 20 and cfg.model.hidden == 6 and cfg.seed == 1
    (g,) = vm["groups"]
    finals = [json.loads((tmp_path / "vm" / f"seed={s}" / "summary.json").read_text())["final"] for s in range(2)]
    vals = [f["val"]["mse"] for f in finals]
    assert g["group"] == "run" and g["metric"] == "mse" and g["statuses"] == {"completed": 2}
    assert g["final_val"] == {"mean": pytest.approx(np.mean(vals)), "min": min(vals), "max": max(vals), "n": 2}
    assert g["final_test"]["max"] == max(f["test"]["mse"] for f in finals)
    assert json.loads((tmp_path / "vm" / "sweep.json").read_text())["groups"] == vm["groups"]
    assert "| run | 2/2 |" in (tmp_path / "vm" / "sweep.md").read_text()


def test_killed_sweep_continues(tmp_path, monkeypatch):
    """Point seed=0 finished, seed=1 stopped after its step-10 checkpoint, seed=2 holds a checkpoint that cannot be
    read: a re-run leaves seed=0 alone, resumes seed=1 (its first records kept), reports seed=2 failed and goes on,
    and writes the aggregates over the finished seeds; a third run retries only the failed point."""
    config = _config(tmp_path)
    plan = _corrupt_point(config, str(tmp_path / "sw"), ["seed=0..2"], "seed=2")
    done, half, bad = (os.path.join(plan.sweep_dir, n) for n in ("seed=0", "seed=1", "seed=2"))
    runner.train(plan.configs[0], done)
    short = load_config(config, ["seed=1", "training.steps=10"])
    runner.train(short, half)  # = a 20-step run killed right after its step-10 checkpoint:
    os.unlink(os.path.join(half, "summary.json"))
    with open(os.path.join(half, "config.yaml"), "w") as f:
        f.write(dump_config(plan.configs[1]))
    before = {n: open(os.path.join(d, "metrics.jsonl")).read() for n, d in (("done", done), ("half", half))}
    calls = []
    real = runner.train
    monkeypatch.setattr(runner, "train", lambda cfg, run_dir, **kw: calls.append((run_dir, kw["resume"]))
                        or real(cfg, run_dir, **kw))
    result = sweep.run_sweep(config, ["seed=0..2"], sweep_dir=str(tmp_path / "sw"), subprocesses=False)
    assert calls == [(half, True), (bad, True)]
    assert [p["mode"] for p in result["points"]] == ["earlier", "inline", "inline"]
    assert [p["status"] for p in result["points"]] == ["completed", "completed", "failed"]
    assert "CheckpointError" in result["points"][2]["message"]
    assert open(os.path.join(done, "metrics.jsonl")).read() == before["done"]
    after = open(os.path.join(half, "metrics.jsonl")).read()
    assert after.startswith(before["half"]) and len(after) > len(before["half"])
    assert [r["step"] for r in _records(half) if r["split"] == "val"] == [10, 20]
    (g,) = result["groups"]
    assert g["statuses"] == {"completed": 2, "failed": 1} and g["final_val"]["n"] == 2 and g["metric"] == "mse"
    assert "| run | 2/3 |" in (tmp_path / "sw" / "sweep.md").read_text()
    assert os.path.getsize(os.path.join(plan.sweep_dir, "curves.png")) > 0
    sweep.run_sweep(config, ["seed=0..2"], sweep_dir=str(tmp_path / "sw"), subprocesses=False)
    assert calls[2:] == [(bad, True)]


def test_folder_of_another_config_refused(tmp_path):
    config = _config(tmp_path)
    plan = sweep.plan(config, ["seed=0,1"], str(tmp_path / "sw"))
    os.makedirs(os.path.join(plan.sweep_dir, "seed=1"))
    with open(os.path.join(plan.sweep_dir, "seed=1", "config.yaml"), "w") as f:
        f.write(dump_config(load_config(config, ["seed=1", "model.hidden=5"])))
    with pytest.raises(ConfigError, match="another config"):
        sweep.plan(config, ["seed=0,1"], str(tmp_path / "sw"))


def test_vmap_blocker():
    def make(**kw):
        return parse_config({"task": {"name": "adding"}, **kw})

    assert sweep.vmap_blocker(make()) is None
    assert "parallel.mode" in sweep.vmap_blocker(make(parallel={"mode": "pmap"}))
    assert "fitted" in sweep.vmap_blocker(make(estimator={"name": "esn"}, model={"cell": "esn"}))


def test_truncation_vs_lag_is_a_sweep():
    """configs/truncation_vs_lag.sweep spans lags x truncations x seeds over a plain run config."""
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    path, axes = sweep.read_spec(os.path.join(root, "truncation_vs_lag.sweep"), ["seed=0"])
    grid, fixed = sweep.parse_axes(axes)
    points = sweep.grid_points(grid)
    assert fixed == ["seed=0"] and len(points) == 20 and len({p.group for p in points}) == 20
    cfg = load_config(path, fixed + list(points[-1].overrides))
    assert (cfg.task.options["lag"], cfg.estimator.options["k1"]) == (40, 60) == (40, cfg.task.options["length"])
    assert cfg.estimator.name == "tbptt" and sweep.vmap_blocker(cfg) is None


def _corrupt_point(config, sweep_dir, axes, name):
    """The plan of ``axes``; point ``name``: a run folder whose only checkpoint is garbage (it cannot be resumed)."""
    plan = sweep.plan(config, axes, sweep_dir)
    bad = os.path.join(plan.sweep_dir, name)
    os.makedirs(os.path.join(bad, "checkpoints"))
    with open(os.path.join(bad, "config.yaml"), "w") as f:
        f.write(dump_config(plan.configs[[p.name for p in plan.points].index(name)]))
    with open(os.path.join(bad, "checkpoints", "last.msgpack"), "wb") as f:
        f.write(os.urandom(64))
    return plan


@pytest.mark.slow
def test_process_mode_cli(tmp_path, capsys, monkeypatch):
    """``--parallel process``: every point in a ``python -m jbptt run`` subprocess; a point that fails is reported,
    the others run, the exit code is 1; run again, nothing runs and the failure is reported again."""
    config = _config(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.path.join(os.path.dirname(__file__), ".."))
    _corrupt_point(config, str(tmp_path / "sw"), ["seed=0,1"], "seed=0")
    args = _args(config, ["seed=0,1"], parallel="process", sweep_dir=str(tmp_path / "sw"))
    assert sweep.run_cli(args) == 1
    out = capsys.readouterr().out
    assert "| run | 1/2 |" in out and "sweep folder:" in out
    result = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [p["mode"] for p in result["points"]] == ["process", "process"]
    assert result["points"][0]["status"] == "failed" and "exit code 1" in result["points"][0]["message"]
    assert json.loads((tmp_path / "sw" / "seed=1" / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_interrupted_vmapped_group_resumes(tmp_path, monkeypatch):
    """A SIGINT while two seeds train vmapped: both checkpoint and stop (summary status interrupted), the sweep
    raises KeyboardInterrupt; run again, each seed is resumed from its own checkpoint by the standard runner and ends
    as a run of its own would (float64)."""
    import signal

    from jbptt.experiment import loop

    config = _config(tmp_path)
    fired, real_log = [], loop.Session.log_train

    def log_train(self, step):
        real_log(self, step)
        if step == 5 and not fired:
            fired.append(step)
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(loop.Session, "log_train", log_train)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(config, ["seed=0,1"], sweep_dir=str(tmp_path / "sw"), subprocesses=False)
    for s in (0, 1):
        summary = json.loads((tmp_path / "sw" / f"seed={s}" / "summary.json").read_text())
        assert summary["status"] == "interrupted" and summary["steps"] == 5
    result = sweep.run_sweep(config, ["seed=0,1"], sweep_dir=str(tmp_path / "sw"), subprocesses=False)
    assert [p["mode"] for p in result["points"]] == ["inline", "inline"] and result["complete"]
    runner.train(load_config(config, ["seed=1"]), str(tmp_path / "ref"))
    _assert_close_records(_records(tmp_path / "sw" / "seed=1"), _records(tmp_path / "ref"))
