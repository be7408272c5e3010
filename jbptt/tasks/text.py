"""Character-level language modelling on English text that ships with Python (``pydoc_data.topics``).

The corpus is the text of the standard library's help topics (about 465,000 characters), mapped to a fixed
96-character vocabulary (newline and printable ASCII; anything else becomes ``"?"``). The first 90% is the
training stretch, the next 5% validation, the last 5% test.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jbptt.batch import Batch
from jbptt.tasks import Task, check_split, classification_metrics, one_hot, register_task

VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
"""The 96 characters of the text tasks; index = token id."""
UNKNOWN = VOCAB.index("?")


def encode(text: str) -> np.ndarray:
    """Text to ``[len(text)]`` int32 token ids (characters outside :data:`VOCAB` become ``"?"``)."""
    table = {c: i for i, c in enumerate(VOCAB)}
    return np.array([table.get(c, UNKNOWN) for c in text], np.int32)


def decode(ids) -> str:
    """Token ids (any iterable of ints) back to text."""
    return "".join(VOCAB[int(i)] for i in ids)


@functools.lru_cache(maxsize=1)
def corpus_splits() -> dict[str, np.ndarray]:
    """``{split: int32 ids}`` of the ``pydoc_data.topics`` corpus (sorted topics joined by newlines)."""
    from pydoc_data.topics import topics

    ids = encode("\n".join(topics[k] for k in sorted(topics)))
    n = len(ids)
    a, b = int(0.9 * n), int(0.95 * n)
    return {"train": ids[:a], "val": ids[a:b], "test": ids[b:]}


def lm_batch(ids, dtype="float32") -> Batch:
    """Next-character batch from ``ids: [B, T + 1]``: one-hot inputs ``[B, T, 96]``, targets ``[B, T]``."""
    ids = jnp.asarray(ids)
    return Batch(one_hot(ids[:, :-1], len(VOCAB), dtype), ids[:, 1:], jnp.ones(ids[:, 1:].shape, dtype))


def lm_metrics(ys, batch: Batch):
    """``loss`` (nats), ``accuracy`` and ``bpc`` (bits per character) over the masked steps."""
    m = classification_metrics(ys, batch)
    return {**m, "bpc": m["loss"] / math.log(2.0)}


@register_task("chars")
def chars(seq_len: int = 100, dtype: str = "float32") -> Task:
    """Next-character prediction on windows of ``seq_len`` characters at random offsets of a split.

    Batches: inputs ``[B, seq_len, 96]`` one-hot, targets ``[B, seq_len]`` ids (every step has a target).
    Loss ``cross_entropy``; headline metric ``bpc`` (bits per character; a uniform guess is log2(96) = 6.58).
    ``info["vocab"]`` holds :data:`VOCAB` for :func:`encode` / :func:`decode` and text sampling.
    For stateful training over contiguous text (truncated BPTT), see :func:`text_stream`.
    """
    if seq_len < 1:
        raise ValueError(f"chars seq_len must be >= 1, got {seq_len}")
    data = {k: jnp.asarray(v) for k, v in corpus_splits().items()}
    offsets = jnp.arange(seq_len + 1)

    def sample(key, batch_size: int, split: str = "train"):
        check_split(split)
        ids = data[split]
        starts = jax.random.randint(key, (batch_size,), 0, ids.shape[0] - seq_len - 1)
        return lm_batch(ids[starts[:, None] + offsets[None]], dtype)

    return Task(
        "chars",
        len(VOCAB),
        len(VOCAB),
        "cross_entropy",
        sample,
        lm_metrics,
        "bpc",
        False,
        {"seq_len": seq_len, "vocab": VOCAB, "split_sizes": {k: len(v) for k, v in data.items()},
         "stream": functools.partial(stream_chunks, dtype=dtype)},
    )


def stream_chunks(batch_size: int, seq_len: int, split: str = "train", *, dtype="float32"):
    """The split cut into ``batch_size`` parallel streams, read in consecutive chunks of ``seq_len`` characters: the
    final carry of chunk ``k`` is the right initial carry of chunk ``k + 1``.

    Returns:
      ``(n_chunks, chunk)``: the chunks in one pass over the split, and ``chunk(k) -> Batch`` (inputs
      ``[batch_size, seq_len, 96]``, targets ``[batch_size, seq_len]``) holding characters ``k * seq_len ..
      (k + 1) * seq_len`` of every stream; ``k`` may be traced (jittable). The chars task's ``info["stream"]``.
    """
    check_split(split)
    ids = corpus_splits()[split]
    per = (len(ids) - 1) // batch_size
    n_seg = (per - 1) // seq_len
    if n_seg < 1:
        raise ValueError(f"split {split!r} is too short for {batch_size} streams of segments of {seq_len}")
    rows = jnp.asarray(np.stack([ids[b * per : (b + 1) * per] for b in range(batch_size)]))
    return n_seg, lambda k: lm_batch(jax.lax.dynamic_slice_in_dim(rows, k * seq_len, seq_len + 1, 1), dtype)


def text_stream(
    batch_size: int, seq_len: int, split: str = "train", *, dtype="float32", repeat: bool = False
) -> Iterator[Batch]:
    """The chunks of :func:`stream_chunks` one after another, for stateful training over contiguous text (truncated
    BPTT): the ``k``-th yielded :class:`~jbptt.Batch` holds characters ``k * seq_len .. (k + 1) * seq_len`` of
    every stream, so the final carry of one segment is the right initial carry of the next.

    Yields batches with inputs ``[batch_size, seq_len, 96]`` and targets ``[batch_size, seq_len]``;
    ``repeat=True`` cycles over the split forever.
    """
    n_seg, chunk = stream_chunks(batch_size, seq_len, split, dtype=dtype)
    while True:
        for k in range(n_seg):
            yield chunk(k)
        if not repeat:
            return
