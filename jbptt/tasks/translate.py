"""Character-level translation of numbers written out in words: one language to another (``num2words``).

Every example is one integer written in the source language (``"one thousand, two hundred and thirty-four"``) and
in the target language (``"mille deux cent trente-quatre"``); ``"digits"`` as a language writes the number in
digits. The numbers are split between train, validation and test **without overlap** (a random permutation of
``[low, high]`` from ``seed``), so every test number is unseen in training. Needs the ``num2words`` extra:
``pip install 'jbptt[translate]'``.

Token conventions (those of :mod:`jbptt.seq2seq`): a target sequence ends with :data:`EOS`, counted in its length,
and is padded with :data:`EOS` (so a padded target equals a decoded sequence of the same tokens); the decoder starts
from :data:`BOS`. Sources are padded with :data:`PAD`. Character ids: source ``1 + i`` and target ``2 + i`` for the
``i``-th character of the sorted character set of that side.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from jbptt.batch import Batch, loss_weights
from jbptt.losses import WholeSequenceLoss, cross_entropy, weighted_mean
from jbptt.tasks import SPLITS, Task, check_split, register_task, take_rows

INSTALL = "pip install 'jbptt[translate]'"
PAD = 0
"""Source padding id."""
EOS, BOS = 0, 1
"""Target ids: end of sequence (also the target padding) and the decoder's start token."""


def _num2words():
    try:
        import num2words
    except ImportError:
        raise ImportError(f"the translate task needs num2words: {INSTALL}") from None
    return num2words


def languages() -> tuple[str, ...]:
    """The language codes num2words knows, plus ``"digits"``."""
    return ("digits",) + tuple(sorted(_num2words().CONVERTER_CLASSES))


@functools.lru_cache(maxsize=4)
def _spell_cached(lang: str, numbers: tuple[int, ...]) -> tuple[str, ...]:
    if lang == "digits":
        return tuple(str(n) for n in numbers)
    convert = _num2words().num2words
    return tuple(convert(n, lang=lang) for n in numbers)


def spell(numbers, lang: str) -> list[str]:
    """``numbers`` written out in ``lang`` (a num2words language code, or ``"digits"``)."""
    if lang not in languages():
        raise ValueError(f"translate: unknown language {lang!r}; choose from {languages()}")
    return list(_spell_cached(lang, tuple(int(n) for n in numbers)))


def split_numbers(low: int, high: int, n_train: int | None, n_val: int, n_test: int, seed: int):
    """Disjoint ``{split: sorted int64 numbers}`` drawn without replacement from ``[low, high]``.

    ``n_train=None`` gives the training split every number not in validation or test.
    """
    total = high - low + 1
    want = n_val + n_test + (0 if n_train is None else n_train)
    if high < low or min(n_val, n_test) < 1 or (n_train is not None and n_train < 1) or want > total:
        raise ValueError(f"translate: cannot draw n_train={n_train}, n_val={n_val}, n_test={n_test} (each >= 1) "
                         f"disjoint numbers from [{low}, {high}] ({max(total, 0)} numbers)")
    order = low + np.random.default_rng(seed).permutation(total)
    test, val = order[:n_test], order[n_test:n_test + n_val]
    train = order[n_test + n_val:] if n_train is None else order[n_test + n_val:n_test + n_val + n_train]
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


class Vocab:
    """A character vocabulary: ``chars[i]`` has id ``offset + i``; ids below ``offset`` are special tokens."""

    def __init__(self, chars, specials: tuple[str, ...]):
        self.specials = tuple(specials)
        self.chars = tuple(sorted(set(chars)))
        self.offset = len(self.specials)
        self.ids = {c: self.offset + i for i, c in enumerate(self.chars)}

    def __len__(self):
        return self.offset + len(self.chars)

    def tokens(self) -> tuple[str, ...]:
        """Every token, index = id."""
        return self.specials + self.chars

    def encode(self, text: str) -> np.ndarray:
        """``[len(text)]`` int32 ids; a character outside the vocabulary is an error naming it."""
        try:
            return np.array([self.ids[c] for c in text], np.int32)
        except KeyError as e:
            raise ValueError(f"translate: character {e.args[0]!r} of {text!r} is not in the vocabulary") from None

    def decode(self, ids, stop: int | None = None) -> str:
        """Ids back to text; special ids are skipped, and decoding ends at the first ``stop`` id."""
        out = []
        for i in (int(i) for i in ids):
            if i == stop:
                break
            if i >= self.offset:
                out.append(self.chars[i - self.offset])
        return "".join(out)


def pad_ids(seqs: list[np.ndarray], length: int, fill: int) -> np.ndarray:
    """Right-pads int sequences to ``[N, length]`` with ``fill``."""
    out = np.full((len(seqs), length), fill, np.int32)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out


def target_lengths(batch: Batch):
    """``[B]`` target lengths (the ``EOS`` included) of a translation batch: position of the first EOS + 1."""
    tgt = jnp.asarray(batch.targets)
    return (jnp.argmax(tgt == EOS, axis=-1) + 1).astype(jnp.int32)


def _token_loss(ys, targets, weights):
    del weights  # the batch's weights follow the source lengths; the target lengths come from the targets
    tgt = jnp.asarray(targets)
    B, L = tgt.shape
    lengths = (jnp.argmax(tgt == EOS, axis=-1) + 1).astype(jnp.int32)
    return weighted_mean(cross_entropy(ys, tgt), loss_weights(B, L, seq_lengths=lengths, dtype=ys.dtype))


seq2seq_loss = WholeSequenceLoss(_token_loss, "the seq2seq token cross-entropy")
"""The task's loss ``"seq2seq"`` as a :class:`~jbptt.losses.WholeSequenceLoss`: ``fn(ys [B, L, V], targets [B, L],
weights) -> scalar``, the token cross-entropy of teacher-forced logits averaged over every valid target token (the
``EOS`` included; :func:`target_lengths`), i.e. :meth:`jbptt.seq2seq.Seq2Seq.loss`. ``weights`` (the batch's, which
follow the *source* lengths) are not used. Only whole-sequence estimators (``bptt``) take it."""


def seq2seq_metrics(ys, batch: Batch):
    """Metrics of teacher-forced logits ``ys: [B, L, V]`` (``Seq2Seq.logits``); jittable.

    ``{"loss": token cross-entropy over the valid target tokens, "token_accuracy", "exact_match"}``. A sequence
    counts as an exact match when every valid token's argmax is right: that is exactly when greedy decoding
    reproduces the target (ties aside), so ``exact_match`` is the greedy exact-match accuracy.
    """
    tgt = jnp.asarray(batch.targets)
    B, L = tgt.shape
    w = loss_weights(B, L, seq_lengths=target_lengths(batch), dtype=ys.dtype)
    right = (jnp.argmax(ys, axis=-1) == tgt).astype(ys.dtype)
    return {
        "loss": weighted_mean(cross_entropy(ys, tgt), w),
        "token_accuracy": weighted_mean(right, w),
        "exact_match": jnp.mean(jnp.all((right > 0) | (w == 0), axis=-1).astype(ys.dtype)),
    }


@register_task("translate")
def translate(src: str = "en", tgt: str = "fr", low: int = 0, high: int = 9999, n_train: int | None = None,
              n_val: int = 500, n_test: int = 1000, seed: int = 0, dtype: str = "float32") -> Task:
    """Translate a number written in words (``src`` language) into another language (``tgt``), character by
    character.

    Args:
      src / tgt: num2words language codes (``"en"``, ``"fr"``, ``"de"`` ...) or ``"digits"``.
      low / high: the numbers drawn from (inclusive).
      n_train / n_val / n_test: numbers per split, disjoint; ``n_train=None``: every number left.
      seed: the split's seed.
      dtype: accepted for the experiment layer (which passes ``model.dtype``); the batches hold int32 ids only.

    Batches: inputs ``(src [B, S], tgt [B, L])``: int32 source ids (padded with :data:`PAD`) and the target ids
    again, which the decoder reads shifted by one step (teacher forcing); ``seq_lengths: [B]`` source lengths;
    targets ``[B, L]`` int32 target ids ending with :data:`EOS` and padded with it (:func:`target_lengths`); ``mask``
    None. ``S`` and ``L`` are the longest source and target (EOS included) over all splits. ``sample`` returns the
    whole split, in order, when ``batch_size`` reaches its size. ``input_size`` / ``output_size`` are the source and
    target vocabulary sizes. Loss ``"seq2seq"`` (:data:`seq2seq_loss`, i.e. :meth:`jbptt.seq2seq.Seq2Seq.loss` with
    ``bos=BOS, eos=EOS``); metrics :func:`seq2seq_metrics` on teacher-forced logits, headline ``exact_match``.
    ``info`` holds the vocabularies (``src_vocab`` / ``tgt_vocab`` :class:`Vocab`), ``bos``, ``eos``, ``pad``, the
    numbers of each split and the texts.
    """
    del dtype
    if src == tgt:
        raise ValueError(f"translate: src and tgt are both {src!r}")
    numbers = split_numbers(low, high, n_train, n_val, n_test, seed)
    texts = {k: (spell(v, src), spell(v, tgt)) for k, v in numbers.items()}
    src_vocab = Vocab("".join(s for a, _ in texts.values() for s in a), ("<pad>",))
    tgt_vocab = Vocab("".join(t for _, b in texts.values() for t in b), ("<eos>", "<bos>"))
    S = max(len(s) for a, _ in texts.values() for s in a)
    L = 1 + max(len(t) for _, b in texts.values() for t in b)
    data = {}
    for split, (a, b) in texts.items():
        src_ids = pad_ids([src_vocab.encode(s) for s in a], S, PAD)
        tgt_ids = pad_ids([np.append(tgt_vocab.encode(t), EOS) for t in b], L, EOS)
        data[split] = (jnp.asarray(src_ids), jnp.asarray([len(s) for s in a], jnp.int32), jnp.asarray(tgt_ids))

    def sample(key, batch_size: int, split: str = "train"):
        check_split(split)
        src_ids, src_len, tgt_ids = data[split]
        rows = take_rows(key, src_len.shape[0], batch_size)
        return Batch((src_ids[rows], tgt_ids[rows]), tgt_ids[rows], None, src_len[rows])

    return Task(
        "translate",
        len(src_vocab),
        len(tgt_vocab),
        "seq2seq",
        sample,
        seq2seq_metrics,
        "exact_match",
        True,
        {"src_vocab": src_vocab, "tgt_vocab": tgt_vocab, "bos": BOS, "eos": EOS, "pad": PAD, "max_src_len": S,
         "max_tgt_len": L, "numbers": numbers, "texts": texts, "split_sizes": {k: len(v) for k, v in numbers.items()},
         "splits": SPLITS},
    )
