"""One loop for segments: ``training.chunk`` and ``training.stateful_stream`` in the runner, checked against the
library's stream driver (:func:`jbptt.train.train_stream`) and a hand-written online loop, resumed mid-stream, and
their config errors."""

import itertools
import os
import shutil
import signal

import jax
import numpy as np
import optax
import pytest

from jbptt import cli, losses
from jbptt.estimator import GradientEstimator, register_estimator
from jbptt.estimators.bptt import bptt
from jbptt.estimators.online import split_segment
from jbptt.estimators.rtrl import rtrl
from jbptt.estimators.tbptt import tbptt
from jbptt.experiment.build import build, build_cell, build_stream, run_keys
from jbptt.experiment.config import ConfigError, load_config, parse_config
from jbptt.experiment.runner import load_run, train
from jbptt.tasks import make_task
from jbptt.tasks.text import VOCAB, text_stream
from jbptt.train import init_train_state, make_train_step, sequence_chunk, start_sequences, train_stream
from tests.runner_helpers import launch, metrics_without_time, tiny_raw, wait_for_step, write_config


def _close(a, b, rtol=1e-10):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-12)


def _stream_raw(root, **training):
    """Stateful TBPTT(4, 6) over the character stream: a small float64 LSTM, 3 parallel streams."""
    return tiny_raw(root, task={"name": "chars", "options": {}},
                    model={"cell": "lstm", "hidden": 6, "dtype": "float64"},
                    estimator={"name": "tbptt", "options": {"k1": 4, "k2": 6}},
                    training={"steps": 5, "batch_size": 3, "chunk": 4, "stateful_stream": True, "eval_every": 5,
                              "eval_batch_size": 512, "checkpoint_every": 2, **training},
                    logging={"log_every": 1})


def test_stream_chunks_are_those_of_text_stream():
    cfg = parse_config(_stream_raw("/unused"))
    stream = build_stream(cfg, make_task("chars"), "val", 40, "<test>")
    reference = list(text_stream(40, 4, "val"))
    assert stream.n_chunks == len(reference) and stream.rows == 40
    for k in (0, 7, stream.n_chunks - 1):
        got, want = stream.chunk(k), reference[k]
        assert np.array_equal(got.inputs, want.inputs) and np.array_equal(got.targets, want.targets)


def test_chunked_tbptt_stream_through_the_runner_equals_train_stream_and_resumes_bit_identically(tmp_path):
    """5 optimizer steps of the runner (stateful_stream) = train_stream over text_stream's first 5 chunks; the run
    resumed from its mid-stream checkpoint of step 2 (carry and TBPTT window in it), as after a kill at step 3,
    logs exactly the same metrics."""
    cfg = parse_config(_stream_raw(tmp_path, keep_checkpoints=3))
    summary = train(cfg, str(tmp_path / "r"))
    assert summary["status"] == "completed" and summary["steps"] == 5
    _, _, state = load_run(str(tmp_path / "r"))

    keys = run_keys(cfg.seed)
    cell = build_cell(cfg, len(VOCAB))
    params = cell.init(keys.init, len(VOCAB))
    est = tbptt(cell, losses.cross_entropy, k1=4, k2=6, stateful=True)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.01))
    chunks = list(itertools.islice(text_stream(3, 4, "train", dtype="float64", repeat=True), 5))
    ref = init_train_state(est, opt, params, cell.initial_carry(params, (3,)), key=keys.estimator,
                           inputs=chunks[0].inputs)
    ref, n = train_stream(jax.jit(make_train_step(est, opt)), ref, chunks, 4)
    assert n == 5 and int(state.step) == 5
    _close(state.params, ref.params)
    _close(state.est_state, ref.est_state)  # carry and the replay window at the stream position
    moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref.params), strict=True)]
    assert all(moved)
    val = summary["final"]["val"]
    assert 0 < val["bpc"] < 7 and val["bpc"] == pytest.approx(val["loss"] / np.log(2))

    killed = tmp_path / "killed"  # the folder a kill at step 3 leaves: metrics to 3, last checkpoint at step 2
    shutil.copytree(tmp_path / "r", killed)
    ckpts = killed / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["best.msgpack", "last.msgpack", "step-00000002.msgpack",
                                         "step-00000004.msgpack"]
    os.replace(ckpts / "step-00000002.msgpack", ckpts / "last.msgpack")
    os.unlink(ckpts / "step-00000004.msgpack")
    records = (killed / "metrics.jsonl").read_text().splitlines(keepends=True)
    (killed / "metrics.jsonl").write_text("".join(records[:3]))
    os.unlink(killed / "summary.json")
    resumed = train(cfg, str(killed), resume=True)
    assert resumed["final"] == summary["final"]
    assert metrics_without_time(killed) == metrics_without_time(tmp_path / "r")


def test_online_rtrl_chunked_through_the_runner_equals_a_manual_online_loop(tmp_path):
    """RTRL with an update every 3 steps of T = 7 (chunks 3, 3, 1): 5 runner steps end mid-way through the second
    batch; a hand-written loop of est.update + optimizer over split_segment chunks gives the same parameters."""
    raw = tiny_raw(tmp_path, task={"name": "delayed_recall", "options": {"length": 7, "lag": 2, "n_symbols": 3}},
                   model={"cell": "elman", "hidden": 4, "dtype": "float64"}, estimator={"name": "rtrl"},
                   optimizer={"clip_norm": None}, training={"steps": 5, "batch_size": 2, "chunk": 3, "eval_every": 5,
                                                            "checkpoint_every": 5})
    cfg = parse_config(raw)
    train(cfg, str(tmp_path / "r"))
    _, exp, state = load_run(str(tmp_path / "r"))

    keys = run_keys(cfg.seed)
    cell = build_cell(cfg, 3)
    params = cell.init(keys.init, 3)
    est, opt = rtrl(cell, losses.cross_entropy, stateful=True), optax.adam(0.01)
    opt_state, steps = opt.init(params), 0

    @jax.jit
    def online_step(params, opt_state, est_state, segment):
        _, grads, est_state = est.update(params, est_state, segment)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, est_state

    for b in itertools.count():
        batch = exp.task.sample(jax.random.fold_in(keys.data, b), 2, "train")
        est_state = est.init(params, cell.initial_carry(params, (2,)), inputs=batch.inputs)  # a new batch: afresh
        for segment in split_segment(batch, 3):
            if steps == 5:
                break
            params, opt_state, est_state = online_step(params, opt_state, est_state, segment)
            steps += 1
        if steps == 5:
            break
    _close(state.params, params)
    _close(state.est_state.carry, est_state.carry)
    _close(state.est_state.trace, est_state.trace)  # the influence matrix crossed the chunks


@pytest.mark.slow
def test_sigkill_mid_stream_and_resume_is_bit_identical(tmp_path):
    raw = _stream_raw(tmp_path, steps=10**6, checkpoint_every=7, eval_every=50)
    run_dir = tmp_path / "killed"
    proc = launch(write_config(tmp_path / "c.yaml", raw), run_dir)
    reached = wait_for_step(run_dir, proc, 9)  # after the checkpoint at step 7
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged = max(r["step"] for r in metrics_without_time(run_dir))
    assert reached <= logged < 60, "the run must be killed part-way"
    assert cli.main(["run", "--resume", str(run_dir), "training.steps=60", "--quiet"]) == 0
    raw["training"]["steps"] = 60
    train(parse_config(raw), str(tmp_path / "full"))
    a, b = metrics_without_time(tmp_path / "full"), metrics_without_time(run_dir)
    assert len(a) == 62 and a == b  # 60 train records and validations at 50 and 60


@register_estimator("test_no_state")
def _no_state(cell, loss_fn):
    """An estimator without a ``stateful`` option (it cannot be chunked)."""
    return GradientEstimator(lambda params, carry, *, key=None, inputs=None: (),
                             lambda params, state, batch: (0.0, jax.tree.map(np.zeros_like, params), state))


@register_estimator("test_kw_bptt")
def _kw_bptt(cell, loss_fn, **options):
    """BPTT behind a ``**options`` factory (its ``stateful`` option is not in the signature)."""
    return bptt(cell, loss_fn, **options)


@pytest.mark.parametrize("sections, key", [
    ({"training": {"chunk": 9}}, "training.chunk"),  # the adding task's T is 8
    ({"training": {"stateful_stream": True}}, "training.stateful_stream"),  # no chunk length
    ({"training": {"chunk": 4, "stateful_stream": True}}, "training.stateful_stream"),  # adding has no stream
    ({"training": {"chunk": 4}, "estimator": {"name": "test_no_state"}}, "training.chunk"),
    ({"training": {"chunk": 4}, "estimator": {"name": "rtrl", "options": {"stateful": False}}},
     "estimator.options.stateful"),
    ({"task": {"name": "chars", "options": {}}, "training": {"chunk": 10**5, "stateful_stream": True}},
     "training.chunk"),
    ({"training": {"chunk": 4}, "estimator": {"name": "esn"}}, "training.chunk"),
    ({"training": {"chunk": 4}, "model": {"bidirectional": True}}, "training.chunk"),
])
def test_chunk_config_errors_name_the_key_before_anything_is_written(tmp_path, sections, key):
    raw = tiny_raw(tmp_path / "runs", **sections)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train(parse_config(raw), str(tmp_path / "r"))
    assert not os.path.exists(tmp_path / "r") and not os.path.exists(tmp_path / "runs")


def test_bptt_chunked_is_tbptt_of_the_chunk_length(tmp_path):
    """``bptt`` with ``training.chunk: K`` is built stateful: BPTT over each chunk from the last one's carry, i.e.
    TBPTT(K, K) (the same gradients chunk after chunk); so is a factory taking its options as ``**options``."""
    sections = {"training": {"chunk": 3}, "model": {"dtype": "float64"}}
    a, b, c = (build(parse_config(tiny_raw(tmp_path, estimator=e, **sections)))
               for e in ({"name": "bptt"}, {"name": "tbptt", "options": {"k1": 3}}, {"name": "test_kw_bptt"}))
    params = a.cell.init(jax.random.key(1), a.task.input_size)
    batch = start_sequences(a.task.sample(jax.random.key(2), 4, "train"))
    updates = [jax.jit(e.estimator.update) for e in (a, b, c)]
    states = [e.estimator.init(params, a.cell.initial_carry(params, (4,))) for e in (a, b, c)]
    for j in range(3):  # T = 8: chunks 3, 3, 2 (padded)
        chunk = sequence_chunk(batch, 3, j)
        out = [u(params, s, chunk) for u, s in zip(updates, states, strict=True)]
        states = [o[2] for o in out]
        _close(out[0][:2], out[1][:2])
        _close(out[0][:2], out[2][:2])
    assert not np.allclose(states[0].carry, a.cell.initial_carry(params, (4,)))


@register_estimator("test_kw_bptt")
def _kw_bptt(cell, loss_fn, **options):
    """BPTT behind a ``**options`` factory (its ``stateful`` option is not in the signature)."""
    return bptt(cell, loss_fn, **options)


@pytest.mark.parametrize("estimator", ["rtrl", "snap1"])
def test_the_online_recall_config_builds_a_chunked_online_run(estimator):
    """configs/online_recall.yaml (trained in full by hand, see its comments): valid and buildable for both."""
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "online_recall.yaml"),
                      [f"estimator.name={estimator}"])
    exp = build(cfg)
    assert cfg.training.chunk == 5 and not cfg.training.stateful_stream and exp.task.name == "delayed_recall"
