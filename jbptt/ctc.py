"""Connectionist temporal classification (CTC): a sequence-level loss, greedy and prefix beam search decoding,
and label / word error rates.

CTC (Graves et al., 2006) scores a label sequence ``l`` (length ``U``) against per-step logits ``[T, C]`` by summing
the probabilities of every frame alignment ``pi`` (one class per frame) that collapses to ``l`` — merge repeated
classes, then drop blanks: ``-log p(l | x) = -log sum_{pi -> l} prod_t softmax(logits_t)[pi_t]``.

Conventions:

- **Blank**: class ``blank_id`` (default 0, as in ``optax.ctc_loss``) is the blank; real labels are the other
  ``C - 1`` classes. Labels equal to ``blank_id`` are rejected.
- **Padding**: batches are right-padded. ``labels: [B, L]`` with ``label_lengths: [B]`` and logits ``[B, T, C]``
  with ``seq_lengths: [B]`` (frames); whatever sits in the padding is ignored.
- **Feasibility**: a label sequence of length ``U`` with ``R`` adjacent repeats needs ``U + R`` frames (a blank must
  separate two equal labels). Inputs that break this, or whose shapes do not fit, raise a ``ValueError`` wherever
  the values are concrete (outside ``jit``, and for labels and lengths under ``jax.grad`` of the logits).
- **Empty labels** are allowed: the loss is ``-log p(all frames blank)`` (0 for an utterance of zero frames).

The loss is ``optax.ctc_loss`` (not re-derived here). It is a *sequence-level* loss: it cannot be written as a
per-step ``loss_fn(y, target)``, so it trains through whole-sequence BPTT (``jax.grad`` of :func:`ctc_loss` over
:func:`jbptt.unroll.unroll`), not through estimators that need a per-step loss.

:func:`greedy_decode` is jittable; :func:`beam_search` and the error rates run on the host in numpy.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jbptt.batch import sequence_mask
from jbptt.losses import WholeSequenceLoss

BLANK = 0


class CTCLoss(NamedTuple):
    """The CTC loss of a batch: ``per_example: [B]`` (nats, ``-log p(labels | logits)``, summed over frames, not
    normalised by length) and ``mean``: the plain mean of ``per_example`` over the batch (a scalar)."""

    per_example: jax.Array
    mean: jax.Array


class Labels(NamedTuple):
    """CTC targets of a batch (the ``targets`` of a :class:`~jbptt.batch.Batch` trained with
    :func:`ctc_sequence_loss`): ``labels: [B, L]`` right-padded label ids (no blank) and ``lengths: [B]``."""

    labels: jax.Array
    lengths: jax.Array


def padded_labels(targets, blank_id: int = BLANK) -> Labels:
    """:class:`Labels` of ``targets: [B, L]`` right-padded with the blank: the lengths count the non-blank entries."""
    targets = jnp.asarray(targets)
    return Labels(targets, jnp.sum(targets != blank_id, axis=-1).astype(jnp.int32))


def ctc_sequence_loss(*, blank_id: int = BLANK, normalize: str = "frames") -> WholeSequenceLoss:
    """The CTC loss as a :class:`~jbptt.losses.WholeSequenceLoss` for the estimators that take one (``bptt``).

    ``fn(logits [B, T, C], targets, weights [B, T])``: the valid frames of each example are its steps with a
    positive weight (right-padded: ``seq_lengths``); ``targets`` is :class:`Labels` or a ``[B, L]`` array
    right-padded with the blank (its lengths are the counts of non-blank entries).

    Args:
      blank_id: the blank class.
      normalize: ``"frames"`` (default) divides the batch's summed negative log-likelihood by its number of valid
        frames (nats per frame: step sizes do not depend on utterance length), ``"labels"`` by its number of
        labels, ``"none"`` gives the plain mean over examples (:attr:`CTCLoss.mean`).

    Returns:
      A :class:`~jbptt.losses.WholeSequenceLoss` named ``"the CTC loss"``.
    """
    if normalize not in ("frames", "labels", "none"):
        raise ValueError(f"ctc_sequence_loss: normalize must be 'frames', 'labels' or 'none', got {normalize!r}")

    def fn(logits, targets, weights):
        if not isinstance(targets, Labels):
            targets = padded_labels(targets, blank_id)
        frames = jnp.sum(weights > 0, axis=1).astype(jnp.int32)
        out = ctc_loss(logits, targets.labels, targets.lengths, frames, blank_id=blank_id)
        if normalize == "none":
            return out.mean
        count = frames if normalize == "frames" else jnp.asarray(targets.lengths)
        return jnp.sum(out.per_example) / jnp.maximum(jnp.sum(count), 1).astype(logits.dtype)

    return WholeSequenceLoss(fn, "the CTC loss")


def _concrete(x):
    """``x`` as a numpy array, or None when it is a tracer (inside ``jit``/``vmap`` or differentiated)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def required_frames(labels, label_lengths) -> np.ndarray:
    """Frames each label sequence needs under CTC: its length plus its number of adjacent repeats.

    Args:
      labels: ``[B, L]`` ints (right-padded).
      label_lengths: ``[B]`` ints.

    Returns:
      ``[B]`` numpy ints. Host-side (needs concrete values).
    """
    labels, lengths = np.asarray(labels), np.asarray(label_lengths)
    L = labels.shape[1]
    pairs = (np.arange(1, L)[None, :] < lengths[:, None]) & (labels[:, 1:] == labels[:, :-1])
    return lengths + pairs.sum(axis=1)


def check_inputs(logits_shape, labels, label_lengths, seq_lengths=None, *, blank_id: int = BLANK) -> None:
    """Validates CTC inputs; raises one ``ValueError`` naming the shapes or the offending example.

    Shapes are always checked; values (ranges, labels, feasibility ``U + repeats <= frames``) only when concrete.

    Args:
      logits_shape: ``(B, T, C)``.
      labels: ``[B, L]`` integer labels, right-padded.
      label_lengths: ``[B]`` ints in ``[0, L]``.
      seq_lengths: ``[B]`` ints in ``[0, T]`` (frames), or None for all ``T``.
      blank_id: the blank class.
    """
    labels, label_lengths = jnp.asarray(labels), jnp.asarray(label_lengths)
    seq_lengths = None if seq_lengths is None else jnp.asarray(seq_lengths)
    lab_shape, len_shape = tuple(labels.shape), tuple(label_lengths.shape)
    seq_shape = None if seq_lengths is None else tuple(seq_lengths.shape)
    shapes = (f"logits {tuple(logits_shape)} (want [B, T, C]), labels {lab_shape} (want [B, L]), "
              f"label_lengths {len_shape} (want [B]), seq_lengths {seq_shape} (want [B] or None)")
    if len(logits_shape) != 3:
        raise ValueError(f"ctc: shapes do not fit: {shapes}")
    B, T, C = logits_shape
    if (len(lab_shape) != 2 or lab_shape[0] != B or len_shape != (B,)
            or (seq_shape is not None and seq_shape != (B,))):
        raise ValueError(f"ctc: shapes do not fit: {shapes}")
    if not 0 <= blank_id < C:
        raise ValueError(f"ctc: blank_id {blank_id} is not a class of logits with C = {C}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"ctc: labels must be integers, got dtype {labels.dtype}")

    labels, label_lengths = _concrete(labels), _concrete(label_lengths)
    frames = np.full((B,), T) if seq_lengths is None else _concrete(seq_lengths)
    if labels is None or label_lengths is None or frames is None:
        return
    L = lab_shape[1]
    for name, v, hi in (("label_lengths", label_lengths, L), ("seq_lengths", frames, T)):
        bad = np.flatnonzero((v < 0) | (v > hi))
        if bad.size:
            b = int(bad[0])
            raise ValueError(f"ctc: {name}[{b}] = {int(v[b])} is outside [0, {hi}] ({shapes})")
    valid = np.arange(L)[None, :] < label_lengths[:, None]
    bad = valid & ((labels < 0) | (labels >= C) | (labels == blank_id))
    if bad.any():
        b, n = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"ctc: labels[{b}, {n}] = {int(labels[b, n])} is not a label class: labels are in "
                         f"[0, {C}) except the blank {blank_id}")
    need = required_frames(labels, label_lengths)
    bad = np.flatnonzero(need > frames)
    if bad.size:
        b = int(bad[0])
        raise ValueError(f"ctc: example {b} has {int(label_lengths[b])} labels with {int(need[b] - label_lengths[b])} "
                         f"adjacent repeats, so it needs {int(need[b])} frames, but has only {int(frames[b])} "
                         f"(labels + repeats must be <= frames)")


def ctc_loss(logits, labels, label_lengths, seq_lengths=None, *, blank_id: int = BLANK) -> CTCLoss:
    """CTC loss of right-padded label sequences under per-step logits (``optax.ctc_loss``).

    Args:
      logits: ``[B, T, C]`` unnormalised scores (a log-softmax is taken over ``C``), e.g. the ``ys`` of
        :func:`jbptt.unroll.unroll` with a readout of ``C`` classes.
      labels: ``[B, L]`` integer labels in ``[0, C)`` without the blank; entries at ``n >= label_lengths[b]``
        are ignored.
      label_lengths: ``[B]`` ints, ``0 <= label_lengths[b] <= L`` (0: the all-blank labelling).
      seq_lengths: ``[B]`` valid frames per example, or None for all ``T``; logits past it are ignored.
      blank_id: the blank class (default 0).

    Returns:
      :class:`CTCLoss` ``(per_example [B], mean)``; differentiate ``.mean`` (or a weighting of ``.per_example``).

    Raises:
      ValueError: shapes that do not fit, or (where values are concrete) lengths out of range, blank or
        out-of-range labels, or labels that need more frames than there are.

    Safe under ``jit``, ``grad`` and ``vmap`` (value checks are skipped for traced values).
    """
    logits = jnp.asarray(logits)
    check_inputs(logits.shape, labels, label_lengths, seq_lengths, blank_id=blank_id)
    B, T, _ = logits.shape
    frames = jnp.full((B,), T) if seq_lengths is None else jnp.asarray(seq_lengths)
    per_example = _ctc_loss(logits, jnp.asarray(labels), jnp.asarray(label_lengths), frames, blank_id)
    return CTCLoss(per_example, jnp.mean(per_example))


@functools.partial(jax.jit, static_argnums=4)
def _ctc_loss(logits, labels, label_lengths, seq_lengths, blank_id):
    """The checked inputs as paddings for ``optax.ctc_loss`` (one compiled program per shape). Returns ``[B]``."""
    label_valid = sequence_mask(label_lengths, labels.shape[1])
    frames_valid = sequence_mask(seq_lengths, logits.shape[1])
    dtype = logits.dtype
    return optax.ctc_loss(logits, (~frames_valid).astype(dtype), labels, (~label_valid).astype(dtype),
                          blank_id=blank_id)


class Decoded(NamedTuple):
    """Decoded label sequences, right-padded: ``tokens: [B, T]`` ints (``-1`` past each length), ``lengths: [B]``."""

    tokens: jax.Array
    lengths: jax.Array


def greedy_decode(logits, seq_lengths=None, *, blank_id: int = BLANK) -> Decoded:
    """Best-path decoding: argmax per frame, merge repeats, drop blanks; frames ``t >= seq_lengths[b]`` are ignored.

    Args:
      logits: ``[B, T, C]`` scores (or log-probabilities).
      seq_lengths: ``[B]`` valid frames, or None for all ``T``.
      blank_id: the blank class.

    Returns:
      :class:`Decoded` with ``tokens: [B, T]`` (``-1`` padding) and ``lengths: [B]``; :func:`to_lists` turns it
      into Python lists. Jittable.
    """
    logits = jnp.asarray(logits)
    if logits.ndim != 3:
        raise ValueError(f"greedy_decode: logits must be [B, T, C], got shape {logits.shape}")
    B, T, _ = logits.shape
    best = jnp.argmax(logits, axis=-1)
    prev = jnp.concatenate([jnp.full((B, 1), -1, best.dtype), best[:, :-1]], axis=1)
    valid = jnp.ones((B, T), bool) if seq_lengths is None else sequence_mask(seq_lengths, T)
    keep = valid & (best != blank_id) & (best != prev)
    order = jnp.argsort(~keep, axis=1, stable=True)  # kept frames first, in time order
    lengths = jnp.sum(keep, axis=1)
    tokens = jnp.take_along_axis(best, order, axis=1)
    tokens = jnp.where(jnp.arange(T)[None, :] < lengths[:, None], tokens, -1)
    return Decoded(tokens, lengths)


def to_lists(tokens, lengths) -> list[list[int]]:
    """Right-padded ``tokens: [B, N]`` with ``lengths: [B]`` → a list of ``B`` Python lists (host-side)."""
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    return [[int(v) for v in tokens[b, :lengths[b]]] for b in range(tokens.shape[0])]


def _prefix_beam_search(logp: np.ndarray, beam_width: int, blank_id: int) -> tuple[tuple[int, ...], float]:
    """One utterance: ``logp: [T, C]`` log-probabilities → (best labelling, its beam log-probability)."""
    neg_inf = -np.inf
    beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, neg_inf)}  # prefix -> (log p_blank, log p_label)
    classes = [c for c in range(logp.shape[1]) if c != blank_id]
    for lp in logp:
        nxt: dict[tuple[int, ...], list[float]] = {}

        def add(prefix, which, value, nxt=nxt):
            entry = nxt.setdefault(prefix, [neg_inf, neg_inf])
            entry[which] = np.logaddexp(entry[which], value)

        for prefix, (pb, pl) in beams.items():
            total = np.logaddexp(pb, pl)
            add(prefix, 0, total + lp[blank_id])  # a blank keeps the prefix
            last = prefix[-1] if prefix else None
            for c in classes:
                if c == last:
                    add(prefix, 1, pl + lp[c])  # a repeat merges into the last label
                    add(prefix + (c,), 1, pb + lp[c])  # a new equal label needs a blank before it
                else:
                    add(prefix + (c,), 1, total + lp[c])
        ranked = sorted(nxt.items(), key=lambda kv: -np.logaddexp(*kv[1]))  # stable: ties keep insertion order
        beams = {prefix: (pb, pl) for prefix, (pb, pl) in ranked[:beam_width]}
    prefix, (pb, pl) = next(iter(beams.items()))
    return prefix, float(np.logaddexp(pb, pl))


def beam_search(logits, seq_lengths=None, *, beam_width: int = 8, blank_id: int = BLANK
                ) -> tuple[list[list[int]], np.ndarray]:
    """CTC prefix beam search (Hannun et al., 2014, without a language model), in log space, **on the host**.

    Keeps the ``beam_width`` most probable label prefixes, each with the probability of its alignments ending in a
    blank and ending in its last label, so that all alignments of a labelling are summed (unlike best path, which
    follows one alignment). With a beam at least as wide as the number of labellings it is exact.

    Args:
      logits: ``[B, T, C]`` scores (a log-softmax is taken over ``C``); converted to numpy (not jittable).
      seq_lengths: ``[B]`` valid frames, or None for all ``T``.
      beam_width: number of prefixes kept per frame (``>= 1``).
      blank_id: the blank class.

    Returns:
      ``(hypotheses, log_probs)``: the best labelling of each example as a list of ints, and ``[B]`` numpy
      float64 log-probabilities of those labellings summed over the alignments kept in the beam.
    """
    if beam_width < 1:
        raise ValueError(f"beam_search: beam_width must be >= 1, got {beam_width}")
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 3:
        raise ValueError(f"beam_search: logits must be [B, T, C], got shape {logits.shape}")
    B, T, C = logits.shape
    frames = np.full((B,), T) if seq_lengths is None else np.asarray(seq_lengths)
    if frames.shape != (B,) or np.any(frames < 0) or np.any(frames > T):
        raise ValueError(f"beam_search: seq_lengths must be [B] = [{B}] ints in [0, {T}] for logits "
                         f"{logits.shape}, got {frames.tolist()}")
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    hyps, scores = [], np.zeros((B,))
    for b in range(B):
        prefix, scores[b] = _prefix_beam_search(logp[b, :frames[b]], beam_width, blank_id)
        hyps.append(list(prefix))
    return hyps, scores


def edit_distances(ref, ref_lengths, hyp, hyp_lengths):
    """Levenshtein distances between right-padded integer sequences, jittable.

    Args:
      ref: ``[B, L]`` references with ``ref_lengths: [B]``.
      hyp: ``[B, N]`` hypotheses with ``hyp_lengths: [B]`` (e.g. :func:`jbptt.ctc.greedy_decode`).

    Returns:
      ``[B]`` int32 distances. One dynamic-programming row over the hypothesis per reference item (``L`` unrolled
      steps): substitutions and deletions elementwise, insertions by a running minimum.
    """
    ref, hyp = jnp.asarray(ref), jnp.asarray(hyp)
    B, N = hyp.shape
    steps = jnp.arange(N + 1, dtype=jnp.int32)
    row = jnp.broadcast_to(steps, (B, N + 1))
    for i in range(ref.shape[1]):
        diff = (hyp != ref[:, i:i + 1]).astype(jnp.int32)
        cand = jnp.concatenate([jnp.full((B, 1), i + 1, jnp.int32), jnp.minimum(row[:, 1:] + 1, row[:, :-1] + diff)],
                               axis=1)
        new = lax.cummin(cand - steps, axis=1) + steps
        row = jnp.where((i < jnp.asarray(ref_lengths))[:, None], new, row)
    return jnp.take_along_axis(row, jnp.asarray(hyp_lengths, jnp.int32)[:, None], axis=1)[:, 0]


def edit_distance(ref: Sequence[Hashable], hyp: Sequence[Hashable]) -> int:
    """Levenshtein distance: fewest substitutions, insertions and deletions turning ``ref`` into ``hyp``.

    Works on any sequences of hashable items (label lists, strings as characters, lists of words). One numpy row
    per reference item: substitutions and deletions vectorised, insertions by a running minimum.
    """
    vocab: dict[Hashable, int] = {}
    r = np.array([vocab.setdefault(x, len(vocab)) for x in ref], np.int64)
    h = np.array([vocab.setdefault(x, len(vocab)) for x in hyp], np.int64)
    steps = np.arange(len(h) + 1)
    row = steps.copy()  # distance from the empty reference prefix
    for i, x in enumerate(r, start=1):
        cand = np.empty_like(row)
        cand[0] = i
        cand[1:] = np.minimum(row[1:] + 1, row[:-1] + (h != x))  # deletion, substitution / match
        row = np.minimum.accumulate(cand - steps) + steps  # insertions: row[j] = min_k cand[k] + (j - k)
    return int(row[-1])


def error_rate(refs: Sequence[Sequence[Hashable]], hyps: Sequence[Sequence[Hashable]]) -> float:
    """Total edit distance over total reference length (label error rate; can exceed 1).

    Args:
      refs, hyps: equally many reference and hypothesis sequences.

    Raises:
      ValueError: different counts, or every reference empty (the rate is undefined).
    """
    if len(refs) != len(hyps):
        raise ValueError(f"error_rate: {len(refs)} references but {len(hyps)} hypotheses")
    total = sum(len(r) for r in refs)
    if total == 0:
        raise ValueError("error_rate: the references are all empty, so the error rate is undefined")
    return sum(edit_distance(r, h) for r, h in zip(refs, hyps, strict=True)) / total


def word_error_rate(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Word error rate of whitespace-separated strings: :func:`error_rate` over their words."""
    return error_rate([r.split() for r in refs], [h.split() for h in hyps])
