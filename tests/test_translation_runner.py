"""Translation through `jbptt run`: a config with the translate task builds an encoder-decoder (jbptt.experiment.
translation) that bptt trains with the seq2seq loss; its gradient is Seq2Seq.loss's; `jbptt decode` inspects it."""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from jbptt.experiment import decode, runner, translation
from jbptt.experiment.build import build, build_model, precision
from jbptt.experiment.config import ConfigError, parse_config
from jbptt.tasks import translate

pytest.importorskip("num2words")

TASK = {"name": "translate", "options": {"src": "en", "tgt": "fr", "low": 0, "high": 99, "n_val": 8, "n_test": 12}}


def raw_config(root=None, **model):
    raw = {"task": TASK, "model": {"cell": "gru", "hidden": 6, "attention": 4, **model},
           "optimizer": {"name": "adam", "lr": 0.01, "clip_norm": 1.0},
           "training": {"steps": 4, "batch_size": 8, "eval_every": 2, "eval_batch_size": 12, "checkpoint_every": 2},
           "logging": {"root": str(root or "/tmp"), "name": "tiny_translate", "plots": False,
                       "gradient_flow": False}}
    return raw


def test_a_tiny_translation_run_trains_and_decodes(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    summary = runner.train(parse_config(raw_config(tmp_path)), run_dir)
    assert summary["status"] == "completed" and summary["metric"] == "exact_match"
    test = summary["final"]["test"]
    assert set(test) >= {"exact_match", "token_accuracy", "loss"} and np.isfinite(test["loss"])
    first = json.loads(open(f"{run_dir}/metrics.jsonl").readline())
    assert test["loss"] < first["loss"]  # 4 steps of adam at lr 0.01 lower the loss

    rows, extra = decode.decode_rows(run_dir, 5, split="test")
    task = translate.translate(**TASK["options"])
    pairs = dict(zip(*task.info["texts"]["test"], strict=True))
    assert len(rows) == 5 and all(pairs[r["source"]] == r["reference"] for r in rows)
    assert all(r["match"] == (r["reference"] == r["hypothesis"]) for r in rows)
    att = extra["attention"]
    n_src = extra["src_lengths"]
    assert att.shape[:2] == (5, task.info["max_tgt_len"])
    for i in range(5):  # each emitted character's attention is a distribution over the valid source steps
        k = int(extra["out_lengths"][i])
        np.testing.assert_allclose(att[i, :k].sum(-1), 1.0, rtol=1e-5)
        assert np.all(att[i, :, n_src[i]:] == 0) and np.all(att[i, k:] == 0)
    plot = tmp_path / "att.png"
    args = argparse.Namespace(run_dir=run_dir, n=5, split="test", beam=2, checkpoint="last", seed=0, plot=str(plot))
    assert decode.run_cli(args) == 0
    out = capsys.readouterr().out
    assert "exact match over these 5 items" in out and rows[0]["source"] in out and plot.stat().st_size > 1000


def test_accuracy_by_length_and_format():
    rows = [{"source": "a", "reference": "x" * n, "hypothesis": "x" * n if ok else "y", "match": ok, "length": n}
            for n, ok in ((10, True), (12, False), (22, True), (24, True), (41, False))]
    by = translation.accuracy_by_length(rows, edges=(0, 20, 40, 100))
    assert by == [{"lo": 0, "hi": 20, "items": 2, "exact_match": 0.5}, {"lo": 20, "hi": 40, "items": 2,
                                                                         "exact_match": 1.0},
                  {"lo": 40, "hi": 100, "items": 1, "exact_match": 0.0}]
    text = translation.format_rows(rows, max_rows=3)
    assert "exact match over these 5 items: 60.00%" in text and "2 more items" in text and "<- differs" in text


def test_bptt_gradient_is_the_seq2seq_loss_gradient(key):
    """bptt through the wrapped model == jax.grad of Seq2Seq.loss (float64, 1e-10), with attention."""
    raw = raw_config(dtype="float64")
    with precision("float64"):
        exp = build(parse_config(raw))
        model = translation.build_seq2seq(exp.config, exp.task, jnp.float64)
        params = exp.cell.init(key, exp.task.input_size)
        params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(key, a.shape, a.dtype), params)
        assert "attention" in params
        b = exp.task.sample(jax.random.fold_in(key, 1), 6, "train")
        tl = translate.target_lengths(b)

        @jax.jit
        def both(params, b):
            loss, grads, _ = exp.estimator.update(params, exp.estimator.init(params, ()), b)
            return (loss, grads), jax.value_and_grad(model.loss)(params, b.inputs[0], b.targets, b.seq_lengths, tl)

        (loss, grads), (ref_loss, ref) = both(params, b)
        assert jax.tree.leaves(grads)[0].dtype == jnp.float64
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-10)
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)
        assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3


def test_config_errors_and_no_attention():
    with pytest.raises(ConfigError, match=r"estimator\.options.*'rtrl' needs a per-step loss"):
        build(parse_config({**raw_config(), "estimator": {"name": "rtrl"}}))
    for model, key in (({"layers": 2}, "model.layers"), ({"dropout": 0.1}, "model.dropout"),
                       ({"attention": 0}, "model.attention")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            build(parse_config(raw_config(**model)))
    with pytest.raises(ConfigError, match=r"training\.chunk"):
        build(parse_config({**raw_config(), "training": {"chunk": 4}}))
    plain = build_model(parse_config(yaml.safe_load(yaml.safe_dump(raw_config(attention=None)))))
    params = plain.cell.init(jax.random.key(0), plain.task.input_size)
    assert "attention" not in params and "bridge" not in params  # GRU -> GRU of one size: carry passed on
    b = plain.task.sample(jax.random.key(1), 3, "val")
    _, ys = plain.cell.apply(params, b.inputs, seq_lengths=b.seq_lengths)
    assert ys.shape == b.targets.shape + (plain.task.output_size,)
    with pytest.raises(ValueError, match="no attention"):
        translation.plot_attention([{"source": "x"}], {"attention": None}, "/tmp/never.png")
