"""Data-parallel training (jbptt.parallel) on 8 forced CPU devices and across two processes.

JAX fixes its device count when it starts, so the checks run in subprocesses (tests/parallel_worker.py): one
8-device process runs every single-process check (and experiments/bench_scaling.py); under ``-m slow`` two
2-device processes (gloo collectives on 127.0.0.1) also run `jbptt run` as one two-process run and then the library's
multi-process checks.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from runner_helpers import metrics_without_time, tiny_raw, write_config

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "parallel_worker.py")
EXACT = ["bptt", "tbptt", "rtrl", "snap1"]         # estimators checked step for step in float64
SHORT = ["bptt"]          # estimators run ten float32 steps in every mode
TIME_LIMIT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    """The workers' environment: this one (conftest's XLA compile settings included) without a device-count flag
    (each worker sets its own)."""
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if not f.startswith("--xla_force_host_platform_device_count"))
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_all(commands, out):
    """Starts every ``(argv, extra_env)`` at once; returns their exit codes and logs. A process that fails
    ends the others at once (its peers would wait for it), and none outlives ``TIME_LIMIT_S``."""
    procs, files = [], []
    try:
        for i, (cmd, extra) in enumerate(commands):
            files.append(open(out / f"log{i}.txt", "w+"))
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(**extra), stdout=files[-1],
                                          stderr=subprocess.STDOUT))
        deadline = time.monotonic() + TIME_LIMIT_S
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.1)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    logs = []
    for f in files:
        f.seek(0)
        logs.append(f.read())
        f.close()
    return [p.returncode for p in procs], logs


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Runs the 8-device worker (which also runs the runner's 4-device reference and the scaling benchmark).
    Returns its results, the folder and the tiny runner config."""
    out = tmp_path_factory.mktemp("parallel")
    config = write_config(out / "tiny.yaml", tiny_raw(out / "runs"))
    single = [sys.executable, WORKER, "single", "--devices", "8", "--out", str(out / "single.json"),
              "--estimators", ",".join(EXACT), "--short", ",".join(SHORT), "--runner-config", config,
              "--runner-dir", str(out / "run4"), "--bench-json", str(out / "scaling.json")]
    codes, logs = run_all([(single, {})], out)
    assert codes[0] == 0, logs[0][-4000:]
    return {"single": json.loads((out / "single.json").read_text()), "dir": out, "config": config}


@pytest.fixture(scope="module")
def multi(results):
    """Two worker processes of a 2 x 2-device run, started at once: each first runs `jbptt run` (process 0
    configured by dotted overrides, process 1 by the JAX_* environment variables), then the library checks.
    Returns process 0's results (the slow tests compare them with the 8-device worker's 4-device references)."""
    out, config = results["dir"], results["config"]
    port = free_port()
    cmds = [[sys.executable, WORKER, "multi", "--out", str(out / f"multi{p}.json"), "--short", ",".join(SHORT),
             "--runner-config", config, "--runner-dir", str(out / f"cli{p}"), "parallel.mode=sharded"]
            for p in range(2)]
    cmds[0] += ["parallel.num_processes=2", "parallel.process_id=0", f"parallel.coordinator_address=127.0.0.1:{port}"]
    env = [{"JAX_NUM_CPU_DEVICES": "2"},
           {"JAX_NUM_CPU_DEVICES": "2", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": "1"}]
    codes, logs = run_all(list(zip(cmds, env, strict=True)), out)
    for code, log in zip(codes, logs, strict=True):
        assert code == 0, log[-4000:]
    assert not (out / "multi1.json").exists(), "only process 0 writes results"
    return json.loads((out / "multi0.json").read_text())


@pytest.mark.parametrize("mode", ["pmap", "sharded"])
@pytest.mark.parametrize("name", EXACT)
def test_one_step_equals_single_device_float64(results, name, mode):
    """Three steps (per-example estimator state carried between them) equal the whole-batch step, 1e-10;
    the first step's gradient equals plain ``jax.grad`` BPTT on the whole batch."""
    single = results["single"]
    assert single["devices"] == 8
    r = single["exact"][name][mode]
    assert r["dtype"] == "float64"
    for what in ("loss", "grads", "params", "est_state"):
        assert r[what] <= 1e-10, (name, mode, what, r[what])
    if name in ("bptt", "rtrl"):  # TBPTT(2, 3) and SnAp-1 approximate: their reference is the step above
        assert r["first_grads_vs_bptt"] <= 1e-10, (name, mode, r["first_grads_vs_bptt"])


@pytest.mark.parametrize("mode", ["pmap", "sharded"])
@pytest.mark.parametrize("name", SHORT)
def test_ten_steps_identical_across_modes_float32(results, name, mode):
    single = results["single"]
    r = single["short"][name]
    assert r["dtype"] == "float32" and len(r["none_loss"]) == 10
    assert r[mode]["metrics"] <= 1e-6, r
    assert r[mode]["params_abs"] <= 1e-6, r


@pytest.mark.slow  # two more JAX processes (the single-process multi-device paths are in the default run)
@pytest.mark.parametrize("mode", ["pmap", "sharded"])
def test_two_processes_equal_one_process_with_four_devices(results, multi, mode):
    single = results["single"]
    assert (multi["process_count"], multi["devices"], multi["local_devices"]) == (2, 4, 2)
    name = SHORT[0]
    ref, got = single["short4"][name][mode], multi["short4"][name][mode]
    assert len(got) == len(ref) == 10
    for a, b in zip(got, ref, strict=True):
        for k in b:
            assert abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(b[k])), (k, a, b)


@pytest.mark.slow
def test_runner_two_processes_equal_one_process_with_four_devices(results, multi):
    """`jbptt run` in two processes (2 CPU devices each): process 0 writes the run, process 1 writes nothing,
    and the logged metrics equal the single-process 4-device run's."""
    out = results["dir"]
    assert results["single"]["runner"] == "completed"
    assert results["single"]["x64_after_runner"] is True  # the float32 run scoped x64 off and restored it
    assert not (out / "cli1").exists(), "only process 0 writes the run folder"
    ref, got = metrics_without_time(out / "run4"), metrics_without_time(out / "cli0")
    assert len(got) == len(ref) > 0 and [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(got, ref, strict=True):
        assert a.keys() == b.keys()
        for k, v in b.items():
            if isinstance(v, float):
                assert abs(a[k] - v) <= 1e-6 * max(1.0, abs(v)), (k, a, b)
            else:
                assert a[k] == v, (k, a, b)
    assert (out / "cli0" / "summary.json").exists() and (out / "cli0" / "checkpoints" / "last.msgpack").exists()


def test_indivisible_batch_names_both_numbers(results):
    single = results["single"]
    msg = single["indivisible_error"]
    assert msg is not None and "12" in msg and "8" in msg


def test_bench_scaling_smoke(results):
    """experiments/bench_scaling.py runs as a script (in the 8-device worker, on 1 and 2 devices) and writes its
    JSON."""
    result = json.loads((results["dir"] / "scaling.json").read_text())
    assert result["counts"] == [1, 2] and result["platform"] == "cpu"
    assert {(r["scaling"], r["devices"], r["batch"]) for r in result["rows"]} == {
        ("strong", 1, 4), ("strong", 2, 4), ("weak", 1, 2), ("weak", 2, 4)}
    assert all(r["finite"] and r["steps_per_s"] > 0 for r in result["rows"])
    assert "| strong | sharded |" in results["single"]["bench_stdout"]


def test_structure_change_gets_a_clear_error(results):
    single = results["single"]
    msg = single["structure_error"]
    assert msg is not None and "another pytree structure" in msg and "init must allocate its whole state" in msg


# In-process checks (one CPU device is enough).


def _estimator_with_state(make_state):
    from jbptt.estimator import GradientEstimator

    return GradientEstimator(lambda params, carry, **kw: make_state(carry), None)


def test_state_batch_axes_rule():
    import jax
    import jax.numpy as jnp

    from jbptt import parallel

    B = 4
    carry = (jnp.zeros((B, 3)), jnp.zeros((B, 2)))
    est = _estimator_with_state(lambda c: {"carry": c, "trace": jnp.zeros((c[0].shape[0], 5, 3)),
                                           "same_size_as_batch": jnp.zeros((B,)), "count": jnp.zeros(()),
                                           "key": jax.random.key(0)})
    axes = parallel.state_batch_axes(est, {"w": jnp.zeros((3, 3))}, carry)
    assert axes == {"carry": (True, True), "trace": True, "same_size_as_batch": False, "count": False,
                    "key": False}
    bad = _estimator_with_state(lambda c: {"trace": jnp.zeros((5, c[0].shape[0]))})
    with pytest.raises(ValueError, match=r"\['trace'\].*not the leading one"):
        parallel.state_batch_axes(bad, {}, carry)


def test_rtrl_and_tbptt_state_axes():
    import jax
    import jax.numpy as jnp

    import jbptt
    from jbptt import cells, losses, parallel

    cell = cells.with_readout(cells.elman(3), 2)
    params = cell.init(jax.random.key(0), 2)
    carry = cell.initial_carry(params, (3,))  # B = 3 = hidden size: the rule must not rely on sizes
    rtrl = parallel.state_batch_axes(jbptt.make_estimator("rtrl", cell, losses.mse), params, carry)
    assert jax.tree_util.tree_leaves(rtrl.carry) == [True] and jax.tree_util.tree_leaves(rtrl.trace) == [True]
    assert rtrl.key is False
    tb = jbptt.make_estimator("tbptt", cell, losses.mse, k1=2, k2=3, stateful=True, artbp=0.1)
    axes = parallel.state_batch_axes(tb, params, carry, key=jax.random.key(0), inputs=jnp.zeros((3, 1, 2)))
    assert axes.window.inputs is True and axes.since_truncation is True and axes.key is False


def test_weighted_pmean_under_vmap():
    import jax
    import jax.numpy as jnp

    from jbptt import parallel

    x = jnp.array([1.0, 2.0, jnp.nan, 4.0])
    w = jnp.array([1.0, 3.0, 0.0, 0.0])  # a shard without weight contributes nothing, even a NaN
    out = jax.vmap(lambda xi, wi: parallel.weighted_pmean(xi, wi, "d"), axis_name="d")(x, w)
    assert jnp.allclose(out, (1.0 + 6.0) / 4.0)
    zero = jax.vmap(lambda xi, wi: parallel.weighted_pmean(xi, wi, "d"), axis_name="d")(x, jnp.zeros(4))
    assert jnp.all(zero == 0)


def test_bad_mode_and_device_count_errors():
    import jax
    import optax

    import jbptt
    from jbptt import cells, losses, parallel

    cell = cells.with_readout(cells.elman(3), 2)
    params = cell.init(jax.random.key(0), 2)
    carry = cell.initial_carry(params, (4,))
    est = jbptt.make_estimator("bptt", cell, losses.mse)
    with pytest.raises(ValueError, match="mode must be one of"):
        parallel.data_parallel(est, optax.sgd(0.1), params, carry, mode="ddp")
    n = jax.device_count()
    with pytest.raises(ValueError, match=f"devices={n + 1} but {n} device"):
        parallel.data_parallel(est, optax.sgd(0.1), params, carry, mode="sharded", devices=n + 1)
    with pytest.raises(ValueError, match="'auto' or a positive integer"):
        parallel.data_parallel(est, optax.sgd(0.1), params, carry, mode="pmap", devices="all")


def test_every_registered_estimator_has_a_batch_axis_layout():
    """The axis rule classifies every registered estimator's state: per-example carries and traces are
    sharded, keys replicated (B = 3 = hidden size, so sizes alone could not tell)."""
    import jax
    import jax.numpy as jnp

    import jbptt
    from jbptt import cells, losses, parallel
    from jbptt.estimator import ESTIMATORS

    cell = cells.with_readout(cells.elman(3), 2)
    params = cell.init(jax.random.key(0), 2)
    carry = cell.initial_carry(params, (3,))
    options = {"tbptt": {"k1": 2, "k2": 2, "artbp": 0.1}}
    assert {"bptt", "tbptt", "rtrl", "uoro", "snap1"} <= set(ESTIMATORS)
    for name in sorted(n for n, f in ESTIMATORS.items() if f.__module__.startswith("jbptt.")):  # not tests'
        est = jbptt.make_estimator(name, cell, losses.mse, **options.get(name, {}))
        axes = parallel.state_batch_axes(est, params, carry, key=jax.random.key(0), inputs=jnp.zeros((3, 4, 2)))
        assert all(jax.tree_util.tree_leaves(axes.carry)), name
        for field in ("trace", "since_truncation"):
            if hasattr(axes, field):
                assert all(jax.tree_util.tree_leaves(getattr(axes, field))), (name, field)
        if getattr(axes, "key", None) is not None:
            assert axes.key is False, name


def test_parallel_config_process_keys(tmp_path):
    """The runner's multi-process keys are validated with one clear error each; a single-process config
    never starts jax.distributed."""
    from jbptt.experiment.config import ConfigError, parse_config
    from jbptt.experiment.runner import start_processes

    def cfg(**parallel):
        return parse_config(tiny_raw(tmp_path, parallel=parallel))

    with pytest.raises(ConfigError, match="parallel.mode.*multi-process"):
        cfg(mode="none", num_processes=2)
    with pytest.raises(ConfigError, match="parallel.process_id"):
        cfg(mode="pmap", num_processes=2, process_id=2)
    with pytest.raises(ConfigError, match="parallel.num_processes"):
        cfg(mode="pmap", num_processes=0)
    assert start_processes(cfg(mode="sharded", num_processes=1)) is False
    assert start_processes(cfg(mode="sharded")) is False


@pytest.mark.slow  # tbptt's state in the data-parallel layout is in the 8-device worker's checks
def test_runner_tbptt_with_replay_window_in_parallel_mode(tmp_path):
    """`estimator: tbptt` with k2 > k1 (a replay window of past inputs in its state) trains in the runner, and in
    its parallel path like in the plain one: its init allocates the window from the example inputs."""
    from jbptt.experiment.config import parse_config
    from jbptt.experiment.runner import train

    runs = {}
    for mode in ("none", "pmap"):
        raw = tiny_raw(tmp_path, estimator={"name": "tbptt", "options": {"k1": 2, "k2": 4, "stateful": True}},
                       parallel={"mode": mode}, training={"steps": 6, "eval_every": 3, "checkpoint_every": 3})
        summary = train(parse_config(raw), str(tmp_path / mode))
        assert summary["status"] == "completed" and summary["steps"] == 6
        runs[mode] = metrics_without_time(tmp_path / mode)
    assert len(runs["none"]) == len(runs["pmap"]) > 0
    for a, b in zip(runs["pmap"], runs["none"], strict=True):
        for k, v in b.items():
            assert a[k] == v if not isinstance(v, float) else abs(a[k] - v) <= 1e-6 * max(1.0, abs(v)), (k, a, b)
