"""experiments/bench_online.py: its --quick run writes a complete report, and its naive RTRL is exact RTRL."""

import importlib.util
import json
import os
import sys

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jbptt.estimators  # noqa: F401  (importing it registers every estimator)
from jbptt import losses
from jbptt.batch import Batch
from jbptt.cells import elman, learned_initial_carry, lstm, sparse_elman, with_readout
from jbptt.estimator import make_estimator
from jbptt.testing import to_f64

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_online", os.path.join(ROOT, "experiments", "bench_online.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_online", module)  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _point_ok(p):
    if "skipped" in p:
        return isinstance(p["skipped"], str)
    return (p["time_s"] > 0 and p["temp_bytes"] is not None and p["state_bytes"] > 0
            and p["peak_bytes"] == p["temp_bytes"] + p["state_bytes"] and len(p["times_s"]) >= 1)


def _check_target(report, naive_fits=True):
    target = report["target"]
    assert set(target["points"]) == {"rtrl", "rtrl_nosplit", "naive"}
    assert all(_point_ok(p) for p in target["points"].values())
    assert ("skipped" in target["points"]["naive"]) == (not naive_fits) == ("small" in target)
    if not naive_fits:  # measured again where the naive RTRL fits
        assert target["small"]["n"] < target["n"]
        target = target["small"]
        assert all(_point_ok(p) for p in target["points"].values())
    assert "skipped" not in target["points"]["naive"] and "skipped" not in target["points"]["rtrl"]
    assert ("skipped" in target["points"]["rtrl_nosplit"]) == (not report["split_supported"])
    assert target["ratios"]["time_naive_over_rtrl"] > 0 and target["ratios"]["cpu_time_naive_over_rtrl"] > 0
    assert set(target["ratios"]) >= set(target["targets"])


def _check_sweep(report, labels):
    for vary in ("n", "T"):
        rows = report["sweep"][vary]
        assert rows and all(set(r["points"]) == {"naive", *labels} for r in rows)
        assert all(_point_ok(p) for r in rows for p in r["points"].values())
        assert rows[0]["ratios"][labels[0]]["time_naive_over"] > 0


@pytest.mark.slow  # the naive RTRL of the script is checked in the default run below
def test_quick_target_and_sweep(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    # a basis limit between the quick target's naive basis (95^2 floats) and the smaller one's (52^2)
    assert bench.main(["--quick", "--case", "target", "--case", "sweep", "--estimators", "bptt,rtrl_nosplit",
                       "--naive-max-bytes", str(20e3 / 2**30), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "### target" in printed and "### target (small" in printed and "### sweep over T" in printed
    assert report["quick"] and isinstance(report["split_supported"], bool) and "sparse" not in report
    _check_target(report, naive_fits=False)
    _check_sweep(report, ["bptt", "rtrl_nosplit"])


@pytest.mark.slow
def test_quick_run_writes_every_case(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--estimators", "bptt,rtrl,snap2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "### sparse" in capsys.readouterr().out
    _check_target(report)
    _check_sweep(report, ["bptt", "rtrl", "snap2"])
    sparse = report["sparse"]
    assert set(sparse["points"]) == {"snap2", "rtrl", "snap1", "bptt", "naive"}
    assert all(_point_ok(p) for p in sparse["points"].values())
    assert sparse["ratios"]["time_rtrl_over_snap2"] > 0 and sparse["ratios"]["peak_memory_rtrl_over_snap2"] > 0


def test_naive_skips_a_basis_over_the_limit(bench):
    p = bench.measure_naive(with_readout(elman(8), 2), B=1, T=2, input_size=2, dtype=np.float32, repeats=1,
                            max_bytes=1000)
    assert "skipped" in p and p["basis_bytes"] == (8 * 8 + 2 * 8 + 8 + 8 * 2 + 2 + 8) ** 2 * 4


@pytest.mark.parametrize("make_cell", [
    lambda: with_readout(elman(5), 3),
    pytest.param(lambda: with_readout(sparse_elman(6, density=0.3), 2), marks=pytest.mark.slow),
    pytest.param(lambda: learned_initial_carry(lstm(3)), marks=pytest.mark.slow),
], ids=["elman_readout", "sparse_elman", "learned_carry_lstm"])
def test_naive_rtrl_is_exact_rtrl(bench, make_cell):
    cell = make_cell()
    B, T, I = 2, 5, 3
    k0, k1, k2 = jax.random.split(jax.random.key(3), 3)
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(k0, a.shape, a.dtype),
                          to_f64(cell.init(jax.random.key(1), I)))  # a learned carry / bias away from zero
    batch = Batch(jax.random.normal(k1, (B, T, I)), jax.random.normal(k2, (B, T, cell.output_size)))
    loss, grads = jax.jit(bench.naive_rtrl(cell, losses.mse))(params, batch.inputs, batch.targets)
    est = make_estimator("rtrl", cell, losses.mse)
    ref_loss, ref_grads, _ = est.update(params, est.init(params, cell.initial_carry(params, (B,))), batch)
    g, g_ref = ravel_pytree(grads)[0], ravel_pytree(ref_grads)[0]
    assert g.dtype == np.float64 and float(np.abs(g_ref).max()) > 1e-3
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=0, atol=1e-10)
