"""speech_digits: eSpeak NG utterances as log-mel features for CTC — generation, determinism, held-out voices,
the cache (reuse, corruption, atomic writes), bad input, and the CTC loss on a batch."""

import io
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbptt import ctc
from jbptt.tasks import audio, cache, make_task, speech

pytest.importorskip("espeakng_loader")
from jbptt.tasks import espeak  # noqa: E402

SMALL = dict(n_train=6, n_val=2, n_test=3, max_digits=4, progress=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny data set generated once into a module-wide cache folder: ``(task, cache_dir)``."""
    root = tmp_path_factory.mktemp("speech_cache")
    return make_task("speech_digits", cache_dir=str(root), **SMALL), root


def _manifest(task):
    return json.loads((cache.Path(task.info["cache"]) / cache.MANIFEST).read_text())


class _Count:
    """Wraps ``speech.generate_split`` and counts its calls per split."""

    def __init__(self, monkeypatch):
        self.calls, self.inner = [], speech.generate_split
        monkeypatch.setattr(speech, "generate_split", self)

    def __call__(self, params, split, **kw):
        self.calls.append(split)
        return self.inner(params, split, **kw)


def test_shapes_labels_and_whole_splits(built, key):
    task, _ = built
    assert (task.input_size, task.output_size, task.loss, task.metric) == (40, 11, "ctc", "ler")
    assert task.info["vocab"][ctc.BLANK] == "<blank>" and task.info["split_sizes"] == {"train": 6, "val": 2,
                                                                                          "test": 3}
    b = jax.jit(task.sample, static_argnums=(1, 2))(key, 4, "train")
    T = task.info["max_steps"]
    assert b.inputs.shape == (4, T, 40) and b.inputs.dtype == jnp.float32 and b.mask is None
    assert b.targets.shape == (4, 4) and b.targets.dtype == jnp.int32 and b.seq_lengths.shape == (4,)
    labels, lengths = speech.ctc_labels(b)
    for row, n, frames, x in zip(np.asarray(labels), np.asarray(lengths), np.asarray(b.seq_lengths),
                                 np.asarray(b.inputs), strict=True):
        assert 1 <= n <= 4 and np.all((row[:n] >= 1) & (row[:n] <= 10)) and np.all(row[n:] == ctc.BLANK)
        assert np.all(x[frames:] == 0) and np.all(np.abs(x[:frames]).sum(-1) > 0)
        assert abs(float(x[:frames].mean())) < 1e-2  # per-utterance normalised (float16 storage)
    whole = task.sample(key, 100, "test")  # the whole split, in order
    assert whole.inputs.shape[0] == 3
    np.testing.assert_array_equal(whole.targets, task.sample(jax.random.key(5), 3, "test").targets)
    digits = speech.decode_labels(whole.targets[0])
    assert speech.encode_digits(digits).tolist() == [int(v) for v in whole.targets[0] if v]


def test_deterministic_from_the_seed(built, key, tmp_path):
    task, _ = built
    again = make_task("speech_digits", cache_dir=str(tmp_path), **SMALL)  # generated afresh elsewhere
    assert _manifest(again)["parts"]["train"]["sha256"] == _manifest(task)["parts"]["train"]["sha256"]
    for x, y in zip(task.sample(key, 5), again.sample(key, 5), strict=True):
        if x is not None:
            np.testing.assert_array_equal(x, y)
    assert not np.array_equal(task.sample(key, 5).targets, task.sample(jax.random.key(1), 5).targets)
    other = make_task("speech_digits", cache_dir=str(tmp_path), seed=1, **{**SMALL, "n_train": 1, "n_val": 1,
                                                                             "n_test": 1})
    assert other.info["cache"] != again.info["cache"]
    assert _manifest(other)["parts"]["test"]["sha256"] != _manifest(again)["parts"]["test"]["sha256"]


def test_a_fresh_synthesiser_forgets_what_was_said_before():
    """eSpeak keeps state between utterances; each Synthesizer is a fresh instance, so the order does not matter."""
    said = [("m3", 150, 40), ("f2", 200, 60)]

    def run(order):
        with espeak.Synthesizer(seed=3) as synth:
            return [synth.say("four two", variant=v, rate=r, pitch=p) for v, r, p in order]

    first, second = run(said), run(said)
    with espeak.Synthesizer() as synth, pytest.raises(RuntimeError, match="another Synthesizer is open"):
        espeak.Synthesizer()
    synth.close()  # idempotent
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert first[0].dtype == np.int16 and first[0].size > 0.2 * 22050


def test_held_out_voices_are_disjoint(built):
    task, _ = built
    v = task.info["variants"]
    assert not set(v["train"]) & set(v["test"]) and not set(v["train"]) & set(v["val"])
    assert not set(v["val"]) & set(v["test"])
    used = {s: {v[s][i] for i in task.info["meta"][s]["variant"]} for s in ("train", "val", "test")}
    assert used["test"] <= set(speech.TEST_VARIANTS) and not used["test"] & set(speech.TRAIN_VARIANTS)
    assert set(speech.TRAIN_VARIANTS + speech.VAL_VARIANTS + speech.TEST_VARIANTS) <= set(espeak.variants())
    with pytest.raises(ValueError, match=r"train and test voice variants must be .*disjoint.*'m1'"):
        make_task("speech_digits", test_variants=("m3", "m1"), **SMALL)


def test_second_load_reads_the_cache(built, monkeypatch):
    task, root = built
    count = _Count(monkeypatch)
    again = make_task("speech_digits", cache_dir=str(root), **SMALL)
    assert count.calls == []
    assert again.info["cache"] == task.info["cache"]
    m = _manifest(task)
    assert {k: p["utterances"] for k, p in m["parts"].items()} == {"train": 6, "val": 2, "test": 3}
    assert m["params"]["variants"]["test"] == list(speech.TEST_VARIANTS) and m["params"]["seed"] == 0


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupted_cache_file_is_regenerated(built, tmp_path, monkeypatch, damage):
    root = tmp_path / "c"
    task = make_task("speech_digits", cache_dir=str(root), **SMALL)
    folder = cache.Path(task.info["cache"])
    path = folder / "val.npz"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:100]))
    else:
        path.unlink()
    count = _Count(monkeypatch)
    with pytest.warns(UserWarning, match=r"val\.npz .*content hash; regenerating the 'val' split"):
        again = make_task("speech_digits", cache_dir=str(root), **SMALL)
    assert count.calls == ["val"]
    assert _manifest(again) == _manifest(task) | {"parts": _manifest(again)["parts"]}
    assert _manifest(again)["parts"]["val"]["sha256"] == _manifest(built[0])["parts"]["val"]["sha256"]
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_unreadable_manifest_regenerates_everything(tmp_path, monkeypatch):
    small = {**SMALL, "n_train": 1, "n_val": 1, "n_test": 1}
    task = make_task("speech_digits", cache_dir=str(tmp_path), **small)
    (cache.Path(task.info["cache"]) / cache.MANIFEST).write_text("{not json")
    count = _Count(monkeypatch)
    with pytest.warns(UserWarning, match="manifest .* is unreadable; regenerating"):
        make_task("speech_digits", cache_dir=str(tmp_path), **small)
    assert count.calls == ["train", "val", "test"] and _manifest(task)["parts"]["test"]["utterances"] == 1


def test_writes_are_atomic(tmp_path, monkeypatch):
    """A write that fails half-way leaves neither the target nor a temporary file."""
    def broken(f, **arrays):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        cache.save_arrays(tmp_path / "x.npz", {"a": np.zeros(3)})
    assert list(tmp_path.iterdir()) == []


def test_bad_input_errors_name_the_item(built):
    task, root = built
    with pytest.raises(ValueError, match="empty label sequence"):
        make_task("speech_digits", min_digits=0, **SMALL)
    longest = task.info["max_frames"]  # the longest utterance, in frames
    with pytest.raises(ValueError, match=rf"utterance \d+ \(digits '\d+'\) has \d+ frames, more than "
                                         rf"max_frames={longest - 1}"):
        make_task("speech_digits", cache_dir=str(root), max_frames=longest - 1, **SMALL)
    with pytest.raises(ValueError, match=r"utterance \d+ \(digits '\d+'\) needs \d CTC steps .* stack=400"):
        make_task("speech_digits", cache_dir=str(root), stack=400, **SMALL)  # one step per utterance
    arrays = {"labels": np.array([[3, 4], [0, 0]], np.int32), "lengths": np.array([50, 50], np.int32)}
    with pytest.raises(ValueError, match="test utterance 1 .* empty label sequence"):
        speech.check_split_data(arrays, "test", max_frames=100)
    arrays = {"labels": np.array([[3, 3]], np.int32), "lengths": np.array([2], np.int32)}
    with pytest.raises(ValueError, match=r"val utterance 0 \(digits '22'\) needs 3 CTC steps"):
        speech.check_split_data(arrays, "val", max_frames=100)  # a repeat needs a blank between
    with pytest.raises(ValueError, match="unknown voice variant 'nobody'"):
        with espeak.Synthesizer() as synth:
            synth.say("one", variant="nobody")
    with pytest.raises(ValueError, match="rate"):
        make_task("speech_digits", rate=(20, 30), **SMALL)


def test_missing_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install 'jbptt\[speech\]'"):
        espeak.Synthesizer()
    with pytest.raises(ImportError, match=r"pip install 'jbptt\[speech\]'"):
        make_task("speech_digits", cache_dir=str(tmp_path), **SMALL)
    assert not list(tmp_path.rglob("*.npz"))


def test_ctc_loss_and_metrics_on_a_speech_batch(built, key):
    task, _ = built
    b = task.sample(key, 6)
    labels, lengths = speech.ctc_labels(b)
    logits = jax.random.normal(key, b.inputs.shape[:2] + (task.output_size,), jnp.float64)
    loss = ctc.ctc_loss(logits, labels, lengths, b.seq_lengths)
    assert loss.per_example.shape == (6,) and bool(jnp.all(jnp.isfinite(loss.per_example)))
    metrics = jax.jit(task.metrics)
    m = metrics(logits, b)
    assert set(m) == {"loss", "ler", "sequence_accuracy"} and np.isclose(m["loss"], loss.mean)
    dec = ctc.greedy_decode(logits, b.seq_lengths)
    refs, hyps = ctc.to_lists(labels, lengths), ctc.to_lists(dec.tokens, dec.lengths)
    assert np.isclose(m["ler"], ctc.error_rate(refs, hyps))
    best = np.zeros(b.inputs.shape[:2], int)  # all blank, except label j at frame 2j (a blank between repeats)
    for i, (row, n) in enumerate(zip(np.asarray(labels), np.asarray(lengths), strict=True)):
        best[i, 0:2 * n:2] = row[:n]
    m = metrics(jnp.asarray(np.eye(11)[best] * 10.0), b)
    assert float(m["ler"]) == 0.0 and float(m["sequence_accuracy"]) == 1.0


def test_edit_distances_match_the_reference(key):
    rng = np.random.default_rng(0)
    ref, hyp = rng.integers(1, 4, (40, 5)), rng.integers(1, 4, (40, 8))
    rl, hl = rng.integers(0, 6, 40), rng.integers(0, 9, 40)
    got = jax.jit(ctc.edit_distances)(ref, rl, hyp, hl)
    want = [ctc.edit_distance(r[:a].tolist(), h[:b].tolist()) for r, a, h, b in zip(ref, rl, hyp, hl, strict=True)]
    np.testing.assert_array_equal(got, want)


def test_log_mel_noise_and_normalisation():
    rate = 22050
    t = np.arange(rate // 2) / rate
    tone = np.sin(2 * np.pi * 1000.0 * t)
    mel = audio.log_mel(tone, rate)
    win, hop = 551, 220
    assert mel.shape == (1 + -(-(len(tone) - win) // hop), 40)
    edges = audio.mel_to_hz(np.linspace(audio.hz_to_mel(20.0), audio.hz_to_mel(8000.0), 42))[1:-1]
    assert int(np.argmax(mel[5])) == int(np.argmin(np.abs(edges - 1000.0)))  # the 1 kHz filter peaks
    many = audio.log_mel_many([tone, tone[:3000], np.zeros(0)], rate)
    np.testing.assert_allclose(many[0], mel, rtol=1e-5, atol=1e-5)
    assert [m.shape[0] for m in many[1:]] == [1 + -(-(3000 - win) // hop), 1]
    noisy = audio.add_noise(tone, 10.0, np.random.default_rng(0))
    snr = 10 * np.log10(np.mean(tone ** 2) / np.mean((noisy - tone) ** 2))
    assert abs(snr - 10.0) < 0.2
    z = audio.normalise(np.random.default_rng(1).normal(3.0, 2.0, (50, 4)))
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-12)


def test_progress_bar_plain_lines():
    out = io.StringIO()
    bar = cache.Progress(7, "gen", stream=out)
    for _ in range(7):
        bar.update()
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("gen [####################] 7/7") and 2 <= len(lines) <= 8
