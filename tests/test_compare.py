"""The comparison harness end to end on a tiny config (seconds), and its config errors."""

import json
import os

import pytest
import yaml

from jbptt.experiment import compare
from jbptt.experiment.config import ConfigError

TINY = {
    "task": {"name": "delayed_recall", "options": {"length": 6, "lag": 1, "n_symbols": 2}},
    "model": {"cell": "elman", "hidden": 3, "dtype": "float64"},
    "optimizer": {"name": "adam", "lr": 0.01},
    "estimators": ["bptt", {"name": "rtrl", "label": "rtrl_jvp", "options": {"mode": "jvp", "stateful": True}}],
    "agreement": {"batch_size": 2, "batches": 1},
    "training": {"steps": 2, "batch_size": 2, "online_chunk": 3, "eval_every": 2, "eval_batch_size": 4,
                 "align_every": 2},
    "scaling": {"batch_size": 1, "repeats": 1, "series": [
        {"name": "tiny", "cell": "elman", "vary": "n", "values": [2, 3], "T": 3,
         "estimators": ["bptt", {"name": "rtrl", "options": {"max_influence_bytes": 200}}]}]},
}


def test_compare_writes_the_report(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    assert compare.main([str(path), "--out", str(out), "seed=1"]) == 0
    report = json.loads((out / "report.json").read_text())
    ag = report["agreement"]
    assert ag["relative_error"]["rtrl_jvp"] <= 1e-10 and ag["cosine"]["rtrl_jvp"] == pytest.approx(1.0)
    assert len(ag["alignment_matrix"]) == 2
    curves = report["training"]["curves"]
    # stateful estimators update every online_chunk steps (2 chunks a sequence), the others once per sequence
    assert curves["rtrl_jvp"]["updates"][-1] == 4 and curves["bptt"]["updates"][-1] == 2
    # the curves are runs of the runner's loop (training.chunk = online_chunk), one folder per estimator
    run = yaml.safe_load((out / "runs" / "rtrl_jvp" / "config.yaml").read_text())
    assert run["training"]["chunk"] == 3 and run["training"]["steps"] == 4 and run["estimator"]["name"] == "rtrl"
    assert yaml.safe_load((out / "runs" / "bptt" / "config.yaml").read_text())["training"]["chunk"] is None
    assert curves["rtrl_jvp"]["iteration"] == [2.0] and len(curves["rtrl_jvp"]["align_cosine"]) == 1
    assert curves["rtrl_jvp"]["align_cosine"][0] == pytest.approx(1.0)  # exact RTRL along its own training
    tiny = report["scaling"]["tiny"]["estimators"]
    assert len(tiny["bptt"]["points"]) == 2 and tiny["bptt"]["memory_exponent"]["all"] is not None
    assert "max_influence_bytes" in tiny["rtrl"]["skipped"]  # the size guard stops the series with its reason
    for name in ("report.md", "agreement.png", "alignment_matrix.png", "alignment_training.png",
                 "learning_curves.png", "scaling_tiny.png"):
        assert os.path.getsize(out / name) > 0
    assert "| rtrl_jvp |" in (out / "report.md").read_text()


@pytest.mark.parametrize("change,where", [
    ({"estimators": ["rtrl"]}, "estimators"),
    ({"reference": "rtrl_jvp_typo"}, "estimators"),
    ({"bogus": 1}, "bogus"),
    ({"training": {"online_chunk": 0}}, "training.online_chunk"),
    ({"training": {"online_chunk": 7}}, "training.online_chunk"),  # longer than the sequences (T = 6)
    ({"scaling": {"series": [{"cell": "elman", "vary": "x", "values": [1, 2], "estimators": ["bptt"]}]}},
     "scaling.series[0].vary"),
])
def test_compare_config_errors_name_the_key(change, where):
    with pytest.raises(ConfigError, match=where.replace("[", r"\[").replace("]", r"\]")):
        compare.parse_compare_config({**TINY, **change})


def test_fit_exponent():
    assert compare.fit_exponent([1, 2, 4, 8], [3, 12, 48, 192]) == pytest.approx(2.0)
    assert compare.fit_exponent([1], [1]) is None
