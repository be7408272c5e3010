"""The training loop: determinism, kill-and-resume bit identity, SIGTERM, NaN handling, early stopping,
ESN."""

import json
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbptt import cli, parallel, remat
from jbptt.estimator import GradientEstimator, register_estimator
from jbptt.estimators.bptt import bptt
from jbptt.experiment import rundir
from jbptt.experiment.build import build_optimizer
from jbptt.experiment.config import parse_config
from jbptt.experiment.runner import load_run, train
from tests.runner_helpers import launch, metrics_without_time, tiny_raw, wait_for_step, write_config


@register_estimator("test_nan_after")
def _nan_after(cell, loss_fn, *, after: int = 3):
    """BPTT whose loss and gradients become NaN from update number ``after`` on (counted in the state)."""
    inner = bptt(cell, loss_fn)

    def init(params, carry, *, key=None, inputs=None):
        return (inner.init(params, carry, key=key, inputs=inputs), jnp.zeros((), jnp.int32))

    def update(params, state, batch):
        loss, grads, s = inner.update(params, state[0], batch)
        bad = state[1] >= after
        poison = lambda x: jnp.where(bad, jnp.nan, x)
        return poison(loss), jax.tree.map(poison, grads), (s, state[1] + 1)

    return GradientEstimator(init, update)


def _rich_raw(root):
    """Exercises dropout keys, stacking, a learned initial carry, adamw and a warm-up schedule."""
    return tiny_raw(
        root,
        model={"cell": "lstm", "hidden": 8, "layers": 2, "dropout": 0.3, "learned_initial_carry": True},
        optimizer={"name": "adamw", "weight_decay": 0.01, "schedule": "warmup_cosine", "warmup_steps": 5},
    )


def test_same_seed_same_metrics_and_run_folder(tmp_path):
    a = train(parse_config(_rich_raw(tmp_path)), str(tmp_path / "a"))
    b = train(parse_config(_rich_raw(tmp_path)), str(tmp_path / "b"))
    assert metrics_without_time(tmp_path / "a") == metrics_without_time(tmp_path / "b")
    losses = [r["loss"] for r in metrics_without_time(tmp_path / "a") if r["split"] == "train"]
    assert len(set(losses)) == len(losses)  # real, changing numbers (the comparison above can fail)
    assert a["status"] == "completed" and a["steps"] == 20 and a["final"] == b["final"]
    recs = metrics_without_time(tmp_path / "a")
    assert [r["step"] for r in recs if r["split"] == "train"] == [5, 10, 15, 20]
    assert [r["step"] for r in recs if r["split"] == "val"] == [10, 20]
    assert set(recs[0]) == {"step", "split", "loss", "grad_norm", "lr", "skipped"}
    files = set(os.listdir(tmp_path / "a"))
    assert {"config.yaml", "metrics.jsonl", "summary.json", "checkpoints"} <= files
    assert set(os.listdir(tmp_path / "a" / "checkpoints")) == {"last.msgpack", "best.msgpack"}
    saved = __import__("yaml").safe_load(open(tmp_path / "a" / "config.yaml"))
    assert parse_config(saved) == parse_config(_rich_raw(tmp_path))


def test_sigkill_and_resume_is_bit_identical(tmp_path):
    """A `jbptt run` killed with SIGKILL part-way and resumed from its last checkpoint logs exactly the metrics of
    the same run done in one go (here in-process)."""
    raw = tiny_raw(tmp_path, training={"steps": 10**6, "checkpoint_every": 37, "eval_every": 50},
                   logging={"log_every": 10})
    run_dir = tmp_path / "killed"
    proc = launch(write_config(tmp_path / "c.yaml", raw), run_dir)  # trains "forever"; resumed up to step 300
    reached = wait_for_step(run_dir, proc, 40)  # after the first checkpoint (step 37)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    logged = max(r["step"] for r in metrics_without_time(run_dir))
    assert reached <= logged < 300, "the run must be killed part-way"
    assert cli.main(["run", "--resume", str(run_dir), "training.steps=300", "--quiet"]) == 0
    raw["training"]["steps"] = 300  # (a constant learning rate: the schedule does not depend on the step count)
    assert train(parse_config(raw), str(tmp_path / "full"))["status"] == "completed"
    a, b = metrics_without_time(tmp_path / "full"), metrics_without_time(run_dir)
    assert len(a) == len(b) == 36 and a == b


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, capsys):
    """SIGTERM (sent to this process while `jbptt run` trains in it) saves a checkpoint and exits with 143."""
    import threading

    raw = tiny_raw(tmp_path, training={"steps": 10**6, "checkpoint_every": 10**5, "eval_every": 10**5})
    cfg_file, run_dir = write_config(tmp_path / "c.yaml", raw), tmp_path / "term"
    done = threading.Event()

    def send_when_running():
        path = run_dir / "metrics.jsonl"
        while not done.is_set():
            if path.exists() and path.read_text().count("\n") >= 10:  # 50 steps logged, still training
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.02)

    sender = threading.Thread(target=send_when_running)
    sender.start()
    try:
        code = cli.main(["run", cfg_file, "--run-dir", str(run_dir), "--quiet"])
    finally:
        done.set()
        sender.join()
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGTERM, err
    assert "SIGTERM received: checkpoint saved at step" in err and "--resume" in err
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["status"] == "interrupted" and 50 <= summary["steps"] < 10**5
    _, _, state = load_run(str(run_dir))
    assert int(state.step) == summary["steps"]  # saved at the step it stopped, not at checkpoint_every


def test_nan_halts_and_keeps_last_good_checkpoint(tmp_path):
    raw = tiny_raw(
        tmp_path,
        estimator={"name": "test_nan_after", "options": {"after": 13}},
        training={"checkpoint_every": 5},
    )
    summary = train(parse_config(raw), str(tmp_path / "r"))
    assert summary["status"] == "halted_nan" and summary["steps"] == 13
    assert "non-finite loss at step 14" in summary["message"]
    _, _, state = load_run(str(tmp_path / "r"))
    assert int(state.step) == 10 and all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
    assert max(r["step"] for r in metrics_without_time(tmp_path / "r")) == 10


def test_nan_skip_leaves_params_alone(tmp_path):
    raw = tiny_raw(
        tmp_path, estimator={"name": "test_nan_after", "options": {"after": 13}}, training={"on_nan": "skip"}
    )
    summary = train(parse_config(raw), str(tmp_path / "r"))
    assert summary["status"] == "completed" and summary["skipped_steps"] == 7
    recs = [r for r in metrics_without_time(tmp_path / "r") if r["split"] == "val"]
    assert recs[0]["step"] == 10 and np.isfinite(recs[-1]["mse"])


def test_early_stopping_and_bad_checkpoint(tmp_path, capsys):
    raw = tiny_raw(tmp_path, training={"patience": 1, "min_delta": 1e9, "steps": 100})
    summary = train(parse_config(raw), str(tmp_path / "r"))
    assert summary["status"] == "early_stopped" and summary["steps"] == 20 and summary["best"]["step"] == 10
    shutil.copytree(tmp_path / "r", tmp_path / "s")
    last = tmp_path / "r" / "checkpoints" / "last.msgpack"
    last.write_bytes(last.read_bytes()[:50])
    assert cli.main(["run", "--resume", str(tmp_path / "r")]) == 1
    assert "checkpoint error" in capsys.readouterr().err
    # A checkpoint of another model: change the hidden size in the run's config.
    cfg_text = (tmp_path / "s" / "config.yaml").read_text().replace("hidden: 8", "hidden: 9")
    (tmp_path / "s" / "config.yaml").write_text(cfg_text)
    assert cli.main(["run", "--resume", str(tmp_path / "s")]) == 1
    assert "does not match" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam", "adamw", "adagrad", "adadelta", "rmsprop"])
def test_every_optimizer_and_schedule_steps(name):
    schedule = {"sgd": "cosine", "momentum": "warmup", "adamw": "warmup_cosine"}.get(name, "constant")
    cfg = parse_config(
        {
            "task": {"name": "adding"},
            "training": {"steps": 10},
            "optimizer": {
                "name": name,
                "lr": 0.1,
                "schedule": schedule,
                "warmup_steps": 2,
                "clip_value": 0.5,
                "weight_decay": 0.01,
                "l1": 1e-3,
                "l2": 1e-3,
            },
        }
    )
    params = {"w": jnp.ones(3)}
    opt, sched = build_optimizer(cfg, params)
    g, state = {"w": jnp.array([1.0, -2.0, 3.0])}, opt.init(params)
    for _ in range(2):  # the warm-up schedules start at 0
        upd, state = jax.jit(opt.update)(g, state, params)
    assert np.isfinite(upd["w"]).all() and float(jnp.abs(upd["w"]).sum()) > 0
    assert float(sched(0)) == (0.0 if schedule.startswith("warmup") else 0.1)


def test_clipping_and_penalties():
    cfg = parse_config({"task": {"name": "adding"}, "optimizer": {"name": "sgd", "lr": 1.0, "clip_norm": 1.0}})
    params = {"w": jnp.zeros(2)}
    opt, _ = build_optimizer(cfg, params)
    upd, _ = opt.update({"w": jnp.array([3.0, 4.0])}, opt.init(params), params)
    np.testing.assert_allclose(upd["w"], [-0.6, -0.8], rtol=1e-6)
    cfg = parse_config({"task": {"name": "adding"}, "optimizer": {"name": "sgd", "lr": 1.0, "l1": 0.5, "l2": 2.0}})
    params = {"w": jnp.array([1.0, -1.0])}
    opt, _ = build_optimizer(cfg, params)
    upd, _ = opt.update({"w": jnp.zeros(2)}, opt.init(params), params)
    np.testing.assert_allclose(upd["w"], [-2.5, 2.5])


def test_esn_readout_fits_closed_form(tmp_path):
    from jbptt.experiment.esn import ridge_readout

    rng = np.random.default_rng(0)
    s, w = rng.normal(size=(50, 4)), rng.normal(size=(4, 2))
    fw, fb = ridge_readout(s, s @ w + 0.5, 0.0)
    np.testing.assert_allclose(fw, w, atol=1e-10)
    np.testing.assert_allclose(fb, [0.5, 0.5], atol=1e-10)
    raw = tiny_raw(
        tmp_path,
        task={"name": "mackey_glass", "options": {"length": 60, "washout": 20}},
        model={"cell": "esn", "hidden": 50, "options": {"leak_rate": 0.5}},
        estimator={"name": "esn", "options": {"ridge": 1e-6, "fit_batches": 2}},
    )
    summary = train(parse_config(raw), str(tmp_path / "esn"))
    assert summary["final"]["test"]["nrmse"] < 0.1  # one-step prediction of a smooth series
    assert summary["estimator"] == "esn" and summary["steps"] == 0


def test_float64_is_scoped_to_the_run(tmp_path):
    """A float64 run trains in float64 with x64 switched on for the run only; builders that hand back float64
    arrays raise one clear error while x64 is off. (The ESN fit: no compile of a training step.)"""
    from jbptt.experiment.build import build_model
    from jbptt.experiment.config import ConfigError

    raw = tiny_raw(tmp_path, task={"name": "mackey_glass", "options": {"length": 30, "washout": 10}},
                   model={"cell": "esn", "hidden": 20, "dtype": "float64"},
                   estimator={"name": "esn", "options": {"fit_batches": 1}})
    with jax.enable_x64(False):
        summary = train(parse_config(raw), str(tmp_path / "esn64"))
        assert not jax.config.jax_enable_x64
        with pytest.raises(ConfigError, match="model.dtype: float64 needs jax_enable_x64"):
            build_model(parse_config(raw))
        with pytest.raises(ConfigError, match="model.dtype"):
            load_run(str(tmp_path / "esn64"), "best")
    assert summary["status"] == "completed"
    _, model, params = load_run(str(tmp_path / "esn64"), "best")  # x64 is on in the tests
    assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype("float64")}


def test_remat_and_parallel_sections_call_their_modules(tmp_path, monkeypatch):
    """The runner's contract with jbptt.remat and jbptt.parallel, with stand-in functions."""
    import types

    from jax import lax

    from jbptt.train import make_train_step

    calls = {}

    def scan_from_config(cfg):
        calls["remat"] = cfg
        return lambda *a, **k: (calls.__setitem__("scanned", True), lax.scan(*a, **k))[1]

    def data_parallel(estimator, optimizer, params, carry, *, mode, devices, inputs):
        calls["parallel"] = (mode, devices, jax.tree.leaves(carry)[0].shape[0], inputs.shape)
        step = jax.jit(make_train_step(estimator, optimizer))
        return types.SimpleNamespace(place=lambda s: s, step=step, gather=lambda s: s)

    monkeypatch.setattr(remat, "scan_from_config", scan_from_config)
    monkeypatch.setattr(parallel, "data_parallel", data_parallel)
    raw = tiny_raw(
        tmp_path,
        remat={"policy": "every_k", "k": 2},
        parallel={"mode": "sharded", "devices": 1},
        training={"steps": 4, "eval_every": 2},
    )
    summary = train(parse_config(raw), str(tmp_path / "r"))
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert calls == {"remat": {"policy": "every_k", "k": 2}, "scanned": True,
                     "parallel": ("sharded", 1, 8, (8, 8, 2))}


def test_progress_bar_measures_a_rate_after_the_first_step(capsys, monkeypatch):
    clock = iter([0.0, 10.0, 11.0, 12.0, 13.0])
    monkeypatch.setattr(rundir.time, "monotonic", lambda: next(clock))
    progress = rundir.Progress(total=4, start=0, quiet=False)
    progress.update(1, 0.5)  # compiles: excluded from the rate
    progress.update(2, 0.4, force=True)
    progress.update(3, 0.3, force=True)
    line = capsys.readouterr().err.split("\r")[-1]
    assert "1.0 steps/s" in line and "ETA 0:01" in line


def test_shipped_remat_config_trains_like_the_plain_scan(tmp_path):
    """configs/adding_tanh_remat.yaml, shortened: the sqrt schedule (Elman layer on the segments) gives the same
    training curve as remat: none (float32; the layer sums in another order, so not bit for bit)."""
    from jbptt.experiment.config import load_config

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "adding_tanh_remat.yaml"))
    assert cfg.remat.policy == "sqrt"
    raw = tiny_raw(tmp_path, task={"name": "adding", "options": {"length": 40}}, remat={"policy": "sqrt"},
                   training={"steps": 6, "eval_every": 3})
    plain = tiny_raw(tmp_path, task={"name": "adding", "options": {"length": 40}}, remat={"policy": "none"},
                     training={"steps": 6, "eval_every": 3})
    a = train(parse_config(raw), str(tmp_path / "sqrt"))
    b = train(parse_config(plain), str(tmp_path / "none"))
    assert a["status"] == b["status"] == "completed"
    ma, mb = metrics_without_time(tmp_path / "sqrt"), metrics_without_time(tmp_path / "none")
    losses = [(x["loss"], y["loss"]) for x, y in zip(ma, mb, strict=True) if "loss" in x]
    assert losses and all(abs(x - y) < 1e-4 * max(1.0, abs(y)) for x, y in losses), losses


def test_tensorboard_switch_writes_event_files_next_to_the_metrics(tmp_path):
    pytest.importorskip("tensorboardX")
    raw = tiny_raw(tmp_path, training={"steps": 4, "eval_every": 2, "checkpoint_every": 2},
                   logging={"log_every": 2, "tensorboard": True})
    summary = train(parse_config(raw), str(tmp_path / "r"))
    assert summary["status"] == "completed"
    events = os.listdir(tmp_path / "r" / "tensorboard")
    assert events and all(e.startswith("events.out.tfevents.") for e in events)
    assert os.path.getsize(tmp_path / "r" / "tensorboard" / events[0]) > 0
