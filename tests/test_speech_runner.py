"""speech_digits through the runner: a BiLSTM-CTC config trains, `jbptt decode` reads the run back, and the
estimators that need a per-step loss are refused by name."""

import os

import pytest

pytest.importorskip("espeakng_loader")

from jbptt.cli import main  # noqa: E402
from jbptt.experiment.config import ConfigError, load_config  # noqa: E402
from jbptt.experiment.runner import train  # noqa: E402


def _overrides(cache):
    return [f"task.options={{n_train: 12, n_val: 4, n_test: 4, max_digits: 3, stack: 3, progress: false, "
            f"cache_dir: {cache}}}", "model.hidden=8", "model.layers=1", "training.steps=3",
            "training.batch_size=4", "training.eval_every=3", "training.eval_batch_size=4",
            "training.checkpoint_every=3", "logging.plots=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("speech_run")
    cfg = load_config("configs/speech_digits.yaml", _overrides(tmp / "cache"))
    summary = train(cfg, str(tmp / "run"))
    return tmp, summary


def test_the_config_trains_a_bidirectional_lstm_with_ctc(run):
    _, summary = run
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert set(summary["final"]["test"]) == {"ler", "loss", "sequence_accuracy"}
    assert summary["final"]["test"]["ler"] >= 0.0  # (insertions can take an untrained model above 1)


def test_decode_prints_reference_and_hypothesis(run, capsys):
    tmp, _ = run
    out = str(tmp / "utterance.png")
    assert main(["decode", str(tmp / "run"), "--n", "3", "--plot", out]) == 0
    text = capsys.readouterr().out
    assert "reference" in text and "hypothesis" in text and "label error rate over these 3 items" in text
    assert os.path.getsize(out) > 1000
    assert main(["decode", str(tmp / "run"), "--n", "2", "--beam", "3"]) == 0


def test_decode_refuses_a_run_of_another_kind(tmp_path, capsys):
    cfg = load_config("configs/quickstart.yaml", ["training.steps=1", "training.eval_every=1",
                                                   "training.eval_batch_size=8", "logging.plots=false",
                                                   "logging.gradient_flow=false"])
    train(cfg, str(tmp_path / "adding"))
    assert main(["decode", str(tmp_path / "adding")]) == 2
    assert "CTC" in capsys.readouterr().out
    assert main(["decode", str(tmp_path / "nothing")]) == 1


@pytest.mark.parametrize("name", ["rtrl", "tbptt", "snap1"])
def test_per_step_estimators_are_config_errors(run, name, tmp_path):
    tmp, _ = run
    cfg = load_config("configs/speech_digits.yaml", _overrides(tmp / "cache") + [f"estimator.name={name}",
                                                                                 "model.bidirectional=false"])
    with pytest.raises(ConfigError, match="per-step loss"):
        train(cfg, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
