"""Fast versions of the TBPTT experiments (the runner's ``estimator: tbptt`` is tested in test_parallel.py, in the
plain and the data-parallel loop)."""

import json
import os
import sys

import pytest
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))


@pytest.mark.slow  # the sweep machinery it runs is tested in tests/test_sweep.py
def test_truncation_vs_lag_reduced(tmp_path):
    """One lag, two truncations (echo task, T = 20, lag 5): TBPTT(10, 10) learns, TBPTT(5, 5) stays near chance."""
    import truncation_vs_lag

    with open(truncation_vs_lag.DEFAULT_CONFIG) as f:
        cfg = yaml.safe_load(f)
    cfg["task"]["options"]["length"] = 20
    cfg["model"]["hidden"] = 32
    cfg["training"]["batch_size"] = 16
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = truncation_vs_lag.main(["--config", str(path), "--lags", "5", "--truncations", "5", "10",
                                     "--seeds", "0", "--steps", "200", "--out", str(tmp_path), "--quiet"])
    by_k = {r["truncation"]: r["mean"] for r in result["rows"]}
    assert by_k[5] < 0.5 and by_k[10] > by_k[5] + 0.25, by_k
    for name in ("truncation_vs_lag.json", "truncation_vs_lag.md", "truncation_vs_lag.png"):
        assert os.path.getsize(tmp_path / name) > 0
    with open(tmp_path / "truncation_vs_lag.json") as f:
        assert len(json.load(f)["rows"]) == 2


@pytest.mark.slow
def test_truncation_vs_lag_full_grid(tmp_path):
    import truncation_vs_lag

    result = truncation_vs_lag.main(["--out", str(tmp_path), "--quiet"])
    assert len(result["rows"]) == 20


def test_char_lm_stream_smoke(tmp_path, monkeypatch):
    """The shipped stream config through its wrapper (= `jbptt run configs/char_lm_tbptt.yaml`), made tiny."""
    import runpy

    script = os.path.join(os.path.dirname(__file__), "..", "experiments", "char_lm_tbptt.py")
    run = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", [script, "model.hidden=8", "training.steps=3", "training.eval_every=3",
                                      "training.batch_size=4", "training.eval_batch_size=256", "logging.plots=false",
                                      "logging.gradient_flow=false", "--run-dir", str(run), "--quiet"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(script, run_name="__main__")
    assert e.value.code == 0
    with open(run / "summary.json") as f:
        summary = json.load(f)
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert 0 < summary["final"]["val"]["bpc"] < 7.0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["training"]["chunk"] == 50 and cfg["training"]["stateful_stream"] is True

