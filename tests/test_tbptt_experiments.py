"""Fast versions of the TBPTT experiments (the runner's ``estimator: tbptt`` is tested in test_parallel.py, in the
plain and the data-parallel loop)."""

import json
import os
import sys

import pytest
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))


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


def test_char_lm_stream_smoke(tmp_path):
    import char_lm_tbptt

    cfg = {"model": {"cell": "lstm", "hidden": 16}, "tbptt": {"k1": 10, "k2": 15},
           "optimizer": {"lr": 0.01, "clip_norm": 1.0}, "training": {"batch_size": 4, "chunks": 4, "eval_every": 2},
           "eval": {"batch_size": 128}, "seed": 0, "out": str(tmp_path)}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = char_lm_tbptt.main(["--config", str(path), "--quiet"])
    assert result["chunks"] == 4 and 0 < result["final_val_bpc"] < 7.0 and result["train_chars_per_s"] > 0
    assert os.path.getsize(tmp_path / "char_lm_tbptt.json") > 0


def test_readme_tbptt_example_runs():
    import pathlib
    import re

    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("## Truncated BPTT (`jbptt.estimators.tbptt`)", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
