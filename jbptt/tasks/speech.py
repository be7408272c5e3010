"""Spoken digit strings for CTC: utterances of random digits rendered by eSpeak NG, as log-mel features.

Each utterance says 1-7 random digits (``"three seven one"``) in an eSpeak NG voice (a language voice such as
``en-us`` with a voice variant such as ``m3`` or ``f2``) at a random speaking rate and pitch, with white noise at a
chosen signal-to-noise ratio. The splits use **disjoint voice variants** (speaker-independent validation and test).
Features: 40 log-mel filterbank energies every 10 ms (25 ms windows, :mod:`jbptt.tasks.audio`), normalised per
utterance. Everything is generated once, deterministically from ``seed``, into a cache folder
(:mod:`jbptt.tasks.cache`) and read from there afterwards; only generation needs the ``espeakng-loader`` extra
(``pip install 'jbptt[speech]'``).

Labels follow :mod:`jbptt.ctc`: class 0 is the CTC blank (:data:`jbptt.ctc.BLANK`) and digit ``d`` is class
``d + 1`` (:data:`VOCAB`), so a model has ``output_size = 11`` outputs. Label sequences are right-padded with the
blank, so ``label_lengths = (labels != BLANK).sum(-1)`` (:func:`ctc_labels`).
"""

from __future__ import annotations

import importlib.metadata
import time
import warnings

import jax.numpy as jnp
import numpy as np

from jbptt.batch import Batch
from jbptt.ctc import BLANK, ctc_loss, edit_distances, greedy_decode, padded_labels, required_frames
from jbptt.tasks import SPLITS, Task, audio, cache, check_split, espeak, register_task, take_rows

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOCAB = ("<blank>",) + tuple("0123456789")
"""CTC classes: index 0 is the blank (:data:`jbptt.ctc.BLANK`), index ``d + 1`` the digit ``d``."""
assert VOCAB.index("<blank>") == BLANK
N_MELS, WIN_MS, HOP_MS = 40, 25.0, 10.0
FORMAT = 1  # bump when the generated arrays change meaning
BLOCK = 50  # utterances rendered by one fresh synthesiser (part of the format: it fixes the audio)

TRAIN_VARIANTS = ("m1", "m2", "m4", "m5", "m7", "m8", "f1", "f3", "f5", "Alex", "Andy", "Annie", "Denis", "Gene",
                  "Jacky", "Lee", "Mario", "Michael", "Mike", "adam", "anika", "aunty", "boris", "david", "ed",
                  "edward", "grandma", "grandpa", "iven", "norbert", "paul", "quincy", "rob", "robert", "travis",
                  "zac")
VAL_VARIANTS = ("m6", "f4", "max", "steph")
TEST_VARIANTS = ("m3", "f2", "john", "linda")


def encode_digits(digits: str) -> np.ndarray:
    """A digit string (``"371"``) as ``[len]`` int32 CTC labels (digit + 1)."""
    if not digits.isdigit() or not digits.isascii():
        raise ValueError(f"speech_digits: {digits!r} is not a string of digits 0-9")
    return np.array([int(c) + 1 for c in digits], np.int32)


def decode_labels(labels) -> str:
    """CTC labels (any iterable of ints; blanks and ``-1`` padding skipped) back to a digit string."""
    return "".join(VOCAB[int(i)] for i in labels if 0 < int(i) < len(VOCAB))


def ctc_labels(batch: Batch):
    """``(labels [B, L], label_lengths [B])`` of a speech batch (labels are right-padded with the blank)."""
    return padded_labels(batch.targets)


def ctc_metrics(ys, batch: Batch):
    """``{"loss": mean CTC loss (nats per utterance), "ler": label (digit) error rate of greedy decoding,
    "sequence_accuracy": fraction of utterances decoded exactly}``; ``ys: [B, T, 11]`` logits. Jittable."""
    labels, lengths = ctc_labels(batch)
    dec = greedy_decode(ys, batch.seq_lengths)
    dist = edit_distances(labels, lengths, dec.tokens, dec.lengths)
    return {
        "loss": ctc_loss(ys, labels, lengths, batch.seq_lengths).mean,
        "ler": jnp.sum(dist) / jnp.maximum(jnp.sum(lengths), 1),
        "sequence_accuracy": jnp.mean((dist == 0).astype(ys.dtype)),
    }


# ----------------------------------------------------------------------------------------------------------------
# Generation (host-side numpy, once per parameter set).


def plan_split(params: dict, split: str) -> list[dict]:
    """The utterances of ``split``: digits, voice, variant, rate, pitch and SNR of each, from ``params["seed"]``.

    Returns a list of dicts (deterministic: a numpy generator seeded with ``(seed, split index)``).
    """
    rng = np.random.default_rng([params["seed"], SPLITS.index(split)])
    snr = params["snr_db"]
    plan = []
    for _ in range(params["n"][split]):
        n = int(rng.integers(params["min_digits"], params["max_digits"] + 1))
        plan.append({
            "digits": "".join(str(d) for d in rng.integers(0, 10, n)),
            "voice": str(rng.choice(params["accents"])),
            "variant": str(rng.choice(params["variants"][split])),
            "rate": int(rng.integers(params["rate"][0], params["rate"][1] + 1)),
            "pitch": int(rng.integers(params["pitch"][0], params["pitch"][1] + 1)),
            "snr_db": None if snr is None else float(rng.uniform(snr[0], snr[1])),
        })
    return plan


def render(synth: espeak.Synthesizer, utt: dict, noise_seed) -> np.ndarray:
    """Says one planned utterance: ``[N]`` float64 samples in [-1, 1] (silence trimmed), plus noise."""
    samples = synth.say(" ".join(WORDS[int(c)] for c in utt["digits"]), voice=utt["voice"], variant=utt["variant"],
                        rate=utt["rate"], pitch=utt["pitch"])
    x = audio.trim_silence(samples, synth.rate).astype(np.float64) / 32768.0
    if utt["snr_db"] is not None:
        x = audio.add_noise(x, utt["snr_db"], np.random.default_rng(noise_seed))
    return x


def render_block(params: dict, split: str, plan: list[dict], start: int) -> list[np.ndarray]:
    """Renders ``plan`` (utterances ``start, start + 1, ...`` of ``split``) with one fresh synthesiser and returns
    their normalised log-mel features, ``[frames, 40]`` float64 each."""
    seeds = [params["seed"], SPLITS.index(split)]
    with espeak.Synthesizer(seed=int(np.random.default_rng(seeds + [start]).integers(2**31))) as synth:
        signals = [render(synth, utt, seeds + [start + i]) for i, utt in enumerate(plan)]
        rate = synth.rate
    mels = audio.log_mel_many(signals, rate, n_mels=N_MELS, win_ms=WIN_MS, hop_ms=HOP_MS)
    return [audio.normalise(m) for m in mels]


def generate_split(params: dict, split: str, *, progress: bool = True) -> dict[str, np.ndarray]:
    """Renders every utterance of ``split``, in blocks of :data:`BLOCK` utterances, each block with a fresh
    synthesiser (so a block's audio depends only on the parameters, not on what was rendered before).

    Returns:
      ``{"features": [total frames, 40] float16 (utterances concatenated), "lengths": [N] frames,
      "labels": [N, max_digits] int32 (blank-padded), "variant": [N] index into params["variants"][split],
      "rate": [N], "pitch": [N], "snr_db": [N] (nan when clean)}``.
    """
    plan = plan_split(params, split)
    n = len(plan)
    labels = np.full((n, params["max_digits"]), BLANK, np.int32)
    for i, utt in enumerate(plan):
        labels[i, :len(utt["digits"])] = encode_digits(utt["digits"])
    feats, bar = [], cache.Progress(n, f"speech_digits {split}", enabled=progress)
    for start in range(0, n, BLOCK):
        feats += [f.astype(np.float16) for f in render_block(params, split, plan[start:start + BLOCK], start)]
        bar.update(len(plan[start:start + BLOCK]))
    variants = list(params["variants"][split])
    return {
        "features": np.concatenate(feats) if feats else np.zeros((0, N_MELS), np.float16),
        "lengths": np.array([len(f) for f in feats], np.int32),
        "labels": labels,
        "variant": np.array([variants.index(u["variant"]) for u in plan], np.int32),
        "rate": np.array([u["rate"] for u in plan], np.int32),
        "pitch": np.array([u["pitch"] for u in plan], np.int32),
        "snr_db": np.array([np.nan if u["snr_db"] is None else u["snr_db"] for u in plan], np.float64),
    }


def load_or_generate(params: dict, *, cache_dir=None, progress: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """The arrays of every split (:func:`generate_split`), read from the cache folder or generated into it.

    A part whose file is missing, unreadable or does not match the manifest's content hash is regenerated (with a
    warning when the manifest listed it); the manifest records parameters, counts, content hashes and speed.
    """
    folder = cache.dataset_dir("speech_digits", params, cache_dir)
    manifest = cache.read_manifest(folder)
    if manifest is None and (folder / cache.MANIFEST).exists():
        warnings.warn(f"speech_digits: the cache manifest {folder / cache.MANIFEST} is unreadable; regenerating",
                      stacklevel=3)
    if not manifest or manifest.get("params") != params or manifest.get("format") != FORMAT:
        manifest = {"name": "speech_digits", "format": FORMAT, "params": params, "parts": {}}
    out = {}
    for split in SPLITS:
        path = folder / f"{split}.npz"
        entry = manifest["parts"].get(split)
        arrays = cache.load_arrays(path, entry["sha256"]) if entry else None
        if entry and arrays is None:
            warnings.warn(f"speech_digits: cache file {path} is missing, unreadable or does not match its manifest's "
                          f"content hash; regenerating the {split!r} split", stacklevel=3)
        if arrays is None:
            start = time.perf_counter()
            arrays = generate_split(params, split, progress=progress)
            seconds = time.perf_counter() - start
            manifest["parts"][split] = {
                "file": path.name, "sha256": cache.save_arrays(path, arrays), "utterances": len(arrays["lengths"]),
                "frames": int(arrays["lengths"].sum()), "seconds": round(seconds, 3),
                "utterances_per_second": round(len(arrays["lengths"]) / max(seconds, 1e-9), 1),
                "espeakng_loader": importlib.metadata.version("espeakng-loader"),
            }
            cache.write_manifest(folder, manifest)
        out[split] = arrays
    return out


def check_split_data(arrays: dict[str, np.ndarray], split: str, *, max_frames: int, stack: int = 1) -> None:
    """Validates one split's arrays; raises a ``ValueError`` naming the first bad utterance.

    Checks: no empty label sequence, no utterance longer than ``max_frames`` frames, and every label sequence fits
    its ``ceil(frames / stack)`` model steps under CTC (labels + adjacent repeats <= steps).
    """
    labels, frames = arrays["labels"], arrays["lengths"]
    lengths = (labels != BLANK).sum(-1)
    steps = -(-frames // stack)
    need = required_frames(labels, lengths)
    for i in range(len(frames)):
        what = f"speech_digits: {split} utterance {i} (digits {decode_labels(labels[i])!r})"
        if lengths[i] == 0:
            raise ValueError(f"{what} has an empty label sequence; every utterance needs at least one digit")
        if frames[i] > max_frames:
            raise ValueError(f"{what} has {frames[i]} frames, more than max_frames={max_frames}; raise max_frames, "
                             "or lower max_digits or raise the slowest rate")
        if need[i] > steps[i]:
            raise ValueError(f"{what} needs {need[i]} CTC steps (labels + adjacent repeats) but has only {steps[i]} "
                             f"({frames[i]} frames, stack={stack}); lower stack or the fastest rate")


def stack_frames(features: np.ndarray, lengths: np.ndarray, stack: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenates every ``stack`` consecutive frames of each utterance (zero-padding its last group).

    Args:
      features: ``[total, F]`` utterances concatenated; ``lengths: [N]`` frames each.

    Returns:
      ``([total', F * stack], lengths' [N])`` with ``lengths' = ceil(lengths / stack)``.
    """
    if stack == 1:
        return features, lengths
    parts, start = [], 0
    for n in lengths:
        f = features[start:start + n]
        start += n
        f = np.pad(f, ((0, -n % stack), (0, 0)))
        parts.append(f.reshape(-1, stack * f.shape[1]))
    return np.concatenate(parts), -(-lengths // stack)


def _pair(name: str, value, lo, hi, cast=float) -> list:
    v = [value, value] if np.isscalar(value) else list(value)
    if len(v) != 2 or not lo <= v[0] <= v[1] <= hi or any(cast(x) != x for x in v):
        raise ValueError(f"speech_digits: {name} must be a number or a range [low, high] within [{lo}, {hi}], "
                         f"got {value!r}")
    return [cast(x) for x in v]


@register_task("speech_digits")
def speech_digits(n_train: int = 4000, n_val: int = 400, n_test: int = 400, min_digits: int = 1,
                  max_digits: int = 7, snr_db=20.0, rate=(130, 210), pitch=(25, 75), accents=("en-us", "en"),
                  train_variants=TRAIN_VARIANTS, val_variants=VAL_VARIANTS, test_variants=TEST_VARIANTS,
                  max_frames: int = 400, stack: int = 1, seed: int = 0, cache_dir: str | None = None,
                  progress: bool = True, dtype: str = "float32") -> Task:
    """Recognise spoken digit strings (CTC): generated once into the cache, then sampled from memory.

    Args:
      n_train / n_val / n_test: utterances per split.
      min_digits / max_digits: digits per utterance (uniform; ``min_digits >= 1``).
      snr_db: white-noise SNR in dB, a range ``[low, high]`` drawn per utterance, or None for clean audio.
      rate / pitch: eSpeak speaking rate (words per minute) and pitch (0-100), a number or a range drawn per
        utterance.
      accents: language voices drawn per utterance (``"en-us"``, ``"en"`` ...).
      train_variants / val_variants / test_variants: disjoint voice variants per split (:func:`espeak.variants`).
      max_frames: the longest utterance allowed (10 ms frames); a longer one is an error naming it.
      stack: frames concatenated per model step (``stack = 3``: 30 ms steps of ``120`` features).
      seed: the data set's seed (generation is deterministic from it and the other options).
      cache_dir: the cache root (default ``$JBPTT_CACHE`` or ``~/.cache/jbptt``).
      progress: draw a progress bar while generating.

    Batches: inputs ``[B, T, 40 * stack]`` (zero past ``seq_lengths``), targets ``[B, max_digits]`` int32 CTC labels
    right-padded with the blank (:func:`ctc_labels`), ``seq_lengths: [B]`` steps, ``mask`` None. ``T`` is the
    longest utterance of the whole data set (``info["max_steps"]``), the same for every split. ``sample`` returns
    the whole split, in order, when ``batch_size`` reaches its size. Loss ``"ctc"`` (:func:`jbptt.ctc.ctc_loss`);
    metrics :func:`ctc_metrics`, headline ``ler`` (digit error rate, lower is better). ``info`` holds the vocabulary,
    the variants of each split and per-utterance ``meta`` (variant, rate, pitch, SNR).
    """
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"speech_digits: need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits} "
                         "(an utterance with no digits would have an empty label sequence)")
    if min(n_train, n_val, n_test) < 1 or max_frames < 1 or stack < 1:
        raise ValueError(f"speech_digits: n_train, n_val, n_test, max_frames and stack must be >= 1, got "
                         f"{n_train}, {n_val}, {n_test}, {max_frames}, {stack}")
    variants = {"train": list(train_variants), "val": list(val_variants), "test": list(test_variants)}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = sorted(set(variants[a]) & set(variants[b]))
        if shared or not variants[a] or not variants[b]:
            raise ValueError(f"speech_digits: the {a} and {b} voice variants must be non-empty and disjoint "
                             f"(speaker-independent splits); shared: {shared}")
    if isinstance(accents, str) or not accents:
        raise ValueError(f"speech_digits: accents must be a non-empty list of voices, got {accents!r}")
    params = {
        "format": FORMAT, "seed": int(seed), "n": {"train": n_train, "val": n_val, "test": n_test},
        "min_digits": min_digits, "max_digits": max_digits, "accents": list(accents), "variants": variants,
        "rate": _pair("rate", rate, *espeak.RATE_RANGE, int), "pitch": _pair("pitch", pitch, *espeak.PITCH_RANGE, int),
        "snr_db": None if snr_db is None else _pair("snr_db", snr_db, -50, 200),
        "features": {"n_mels": N_MELS, "win_ms": WIN_MS, "hop_ms": HOP_MS, "stored": "float16"},
    }
    raw = load_or_generate(params, cache_dir=cache_dir, progress=progress)
    for split in SPLITS:
        check_split_data(raw[split], split, max_frames=max_frames, stack=stack)
    stacked = {k: stack_frames(v["features"], v["lengths"], stack) for k, v in raw.items()}
    T = int(max(lengths.max() for _, lengths in stacked.values()))
    data = {}
    for split, (feats, lengths) in stacked.items():
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)
        padded = np.concatenate([feats, np.zeros((T, feats.shape[1]), feats.dtype)])  # gathers stay in bounds
        data[split] = (jnp.asarray(padded, dtype), jnp.asarray(starts), jnp.asarray(lengths, jnp.int32),
                       jnp.asarray(raw[split]["labels"]))
    steps = jnp.arange(T)

    def sample(key, batch_size: int, split: str = "train"):
        check_split(split)
        feats, starts, lengths, labels = data[split]
        rows = take_rows(key, lengths.shape[0], batch_size)
        valid = steps[None, :] < lengths[rows][:, None]
        x = feats[starts[rows][:, None] + steps[None, :]] * valid[..., None].astype(feats.dtype)
        return Batch(x, labels[rows], None, lengths[rows])

    meta = {k: {m: raw[k][m] for m in ("variant", "rate", "pitch", "snr_db")} for k in SPLITS}
    return Task(
        "speech_digits",
        N_MELS * stack,
        len(VOCAB),
        "ctc",
        sample,
        ctc_metrics,
        "ler",
        False,
        {"vocab": VOCAB, "blank": BLANK, "max_steps": T, "stack": stack,
         "max_frames": int(max(v["lengths"].max() for v in raw.values())), "variants": variants, "meta": meta,
         "split_sizes": {k: len(v["lengths"]) for k, v in raw.items()},
         "cache": str(cache.dataset_dir("speech_digits", params, cache_dir))},
    )
