"""CTC: the loss against a brute-force sum over alignments, its gradients (also through an unroll: the BPTT path),
greedy and prefix beam search decoding, edit distance and error rates, bad input."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbptt import ctc
from jbptt.cells.combinators import with_readout
from jbptt.cells.recurrent import elman
from jbptt.unroll import bidirectional, unroll


def collapse(path, blank=0):
    """Merge repeats, then drop blanks."""
    out, prev = [], None
    for c in path:
        if c != prev and c != blank:
            out.append(int(c))
        prev = c
    return tuple(out)


def labelling_probs(logits, blank=0):
    """``{labelling: p}`` for one utterance ``logits: [T, C]``, by enumerating all ``C**T`` alignments."""
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float64), axis=-1))
    T, C = logp.shape
    probs = {}
    for path in itertools.product(range(C), repeat=T):
        lab = collapse(path, blank)
        probs[lab] = probs.get(lab, 0.0) + np.exp(sum(logp[t, c] for t, c in enumerate(path)))
    return probs


def brute_force_loss(logits, labels, blank=0):
    return -np.log(labelling_probs(logits, blank).get(tuple(labels), 0.0))


def test_brute_force_reference_is_a_distribution():
    logits = np.random.default_rng(0).normal(size=(4, 3))
    assert sum(labelling_probs(logits).values()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("blank", [0, 2])
def test_loss_equals_sum_over_alignments(blank):
    rng = np.random.default_rng(1 + blank)
    B, T, C, L = 6, 4, 3, 3
    logits = rng.normal(size=(B, T, C)) * 2.0
    others = [c for c in range(C) if c != blank]
    # (labels, label_length, frames): repeats, empty labels, tight fits, padding left as junk
    cases = [([others[0], others[1], others[0]], 3, 4), ([others[0], others[0]], 2, 3), ([], 0, 4),
             ([others[1]], 1, 2), ([others[1], others[1]], 2, 4), ([], 0, 0)]
    labels = np.full((B, L), others[0])  # padding equal to the last label must not read as a repeat
    for b, (lab, _, _) in enumerate(cases):
        labels[b, :len(lab)] = lab
    lengths = np.array([c[1] for c in cases])
    frames = np.array([c[2] for c in cases])
    padded = logits.copy()
    for b in range(B):
        padded[b, frames[b]:] = 50.0 * rng.normal(size=(T - frames[b], C))  # junk past the frames
    out = ctc.ctc_loss(padded, labels, lengths, frames, blank_id=blank)
    want = np.array([brute_force_loss(logits[b, :frames[b]], cases[b][0], blank) for b in range(B)])
    np.testing.assert_allclose(out.per_example, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.mean, want.mean(), rtol=1e-10)
    assert out.per_example[-1] == 0.0  # no frames, no labels: probability 1


def test_empty_labels_is_all_blank():
    logits = np.random.default_rng(2).normal(size=(1, 5, 4))
    out = ctc.ctc_loss(logits, np.zeros((1, 2), np.int32), np.array([0]))
    logp = jax.nn.log_softmax(logits, axis=-1)
    np.testing.assert_allclose(out.per_example[0], -jnp.sum(logp[0, :, 0]), rtol=1e-12)
    no_columns = ctc.ctc_loss(logits.tolist(), np.zeros((1, 0), int), [0])  # L = 0; Python lists
    np.testing.assert_allclose(no_columns.per_example, out.per_example, rtol=1e-12)


def test_padded_batch_equals_each_example_alone():
    rng = np.random.default_rng(3)
    B, T, C, L = 3, 9, 5, 4
    logits = rng.normal(size=(B, T, C))
    frames = np.array([9, 5, 3])
    lengths = np.array([4, 0, 1])
    labels = rng.integers(1, C, size=(B, L))
    labels[np.arange(L)[None, :] >= lengths[:, None]] = -1  # padding need not be a class
    out = ctc.ctc_loss(logits, labels, lengths, frames)
    for b in range(B):
        alone = ctc.ctc_loss(logits[b:b + 1, :frames[b]], labels[b:b + 1, :lengths[b]], lengths[b:b + 1])
        np.testing.assert_allclose(out.per_example[b], alone.per_example[0], rtol=1e-10)


def directional_check(f, x, key, eps=1e-5, n=3, rtol=1e-6):
    """``<grad f(x), v>`` against central differences along ``n`` random directions ``v`` (pytrees)."""
    g = jax.grad(f)(x)
    leaves, tree = jax.tree.flatten(x)
    for k in jax.random.split(key, n):
        keys = jax.random.split(k, len(leaves))
        v = jax.tree.unflatten(tree, [jax.random.normal(kk, jnp.shape(a), jnp.float64)
                                      for kk, a in zip(keys, leaves, strict=True)])
        plus = jax.tree.map(lambda a, d: a + eps * d, x, v)
        minus = jax.tree.map(lambda a, d: a - eps * d, x, v)
        fd = (f(plus) - f(minus)) / (2 * eps)
        an = sum(jnp.vdot(a, d) for a, d in zip(jax.tree.leaves(g), jax.tree.leaves(v), strict=True))
        np.testing.assert_allclose(an, fd, rtol=rtol, atol=1e-9)


def test_gradient_wrt_logits_matches_finite_differences(key):
    rng = np.random.default_rng(4)
    logits = jnp.asarray(rng.normal(size=(3, 6, 4)))
    labels, lengths, frames = np.array([[1, 2, 2], [3, 0, 0], [1, 1, 0]]), np.array([3, 1, 2]), np.array([6, 4, 5])
    f = jax.jit(lambda z: ctc.ctc_loss(z, labels, lengths, frames).mean)
    directional_check(f, logits, key)
    g = jax.grad(f)(logits)
    assert float(jnp.max(jnp.abs(g[1, 4:]))) == 0.0  # no gradient past the frames


@pytest.mark.parametrize("kind", ["plain", "bidirectional"])
def test_bptt_through_unroll_matches_finite_differences(kind, key):
    """The BPTT path for a sequence-level loss: ``jax.grad`` of the CTC loss over a whole unroll."""
    B, T, I, H, C = 3, 7, 2, 4, 4
    kx, kp, kc = jax.random.split(key, 3)
    xs = jax.random.normal(kx, (B, T, I), jnp.float64)
    frames = jnp.array([7, 4, 6])
    labels, lengths = np.array([[1, 3, 3], [2, 0, 0], [3, 1, 2]]), np.array([3, 1, 3])
    if kind == "plain":
        cell = with_readout(elman(H, dtype=jnp.float64), C)
        params = cell.init(kp, I)

        def logits_of(p):
            return unroll(cell, p, xs, seq_lengths=frames)[1]
    else:
        layer = bidirectional(elman(H, dtype=jnp.float64), elman(H, dtype=jnp.float64))
        k1, k2 = jax.random.split(kp)
        params = {"rnn": layer.init(k1, I), "w": jax.random.normal(k2, (2 * H, C), jnp.float64) / 3.0}

        def logits_of(p):
            return layer.apply(p["rnn"], xs, seq_lengths=frames)[1] @ p["w"]

    def loss(p):
        return ctc.ctc_loss(logits_of(p), labels, lengths, frames).mean

    directional_check(jax.jit(loss), params, kc)


def test_greedy_decode_hand_made():
    # frames: a a _ a b b _ | b (past the frames)  ->  [a, a, b] with a = 1, b = 2
    path = [1, 1, 0, 1, 2, 2, 0, 2]
    logits = np.full((2, 8, 3), -3.0)
    logits[0, np.arange(8), path] = 2.0
    logits[1, np.arange(8), [0, 2, 2, 2, 0, 0, 1, 0]] = 2.0
    dec = ctc.greedy_decode(logits, np.array([7, 8]))
    assert ctc.to_lists(*dec) == [[1, 1, 2], [2, 1]]
    assert dec.tokens.shape == (2, 8) and int(dec.tokens[0, 3]) == -1
    jitted = jax.jit(ctc.greedy_decode)(logits, np.array([7, 8]))
    assert ctc.to_lists(*jitted) == [[1, 1, 2], [2, 1]]
    assert ctc.to_lists(*ctc.greedy_decode(logits[:, :, ::-1], blank_id=2)) == [[1, 1, 0, 0], [0, 1]]


def test_beam_width_one_equals_greedy_on_peaked_logits():
    rng = np.random.default_rng(5)
    B, T, C = 4, 12, 5
    logits = rng.normal(size=(B, T, C))
    logits[np.arange(B)[:, None], np.arange(T)[None, :], rng.integers(0, C, size=(B, T))] += 8.0
    frames = np.array([12, 9, 5, 1])
    hyps, _ = ctc.beam_search(logits, frames, beam_width=1)
    assert hyps == ctc.to_lists(*ctc.greedy_decode(logits, frames))


def test_beam_search_finds_the_most_probable_labelling_where_best_path_does_not():
    # Each frame: blank 0.4, a 0.35, b 0.25. Best path "blank blank" gives "" (0.16), but "a" has
    # a a + a _ + _ a = 0.4025.
    logits = np.log(np.array([[[0.4, 0.35, 0.25]] * 2]))
    probs = labelling_probs(logits[0])
    best = max(probs, key=probs.get)
    assert best == (1,) and probs[best] > probs[()]
    assert ctc.to_lists(*ctc.greedy_decode(logits)) == [[]]
    hyps, scores = ctc.beam_search(logits, beam_width=3)
    assert hyps == [list(best)]
    np.testing.assert_allclose(scores[0], np.log(probs[best]), rtol=1e-12)


def test_wide_beam_is_exact_on_random_logits():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(5, 4, 3)) * 1.5
    hyps, scores = ctc.beam_search(logits, beam_width=81)
    for b in range(5):
        probs = labelling_probs(logits[b])
        best = max(probs, key=probs.get)
        assert tuple(hyps[b]) == best
        np.testing.assert_allclose(scores[b], np.log(probs[best]), rtol=1e-10)
        np.testing.assert_allclose(scores[b], -ctc.ctc_loss(logits[b:b + 1], np.array([best + (1,) * (3 - len(
            best))]), np.array([len(best)])).per_example[0], rtol=1e-10)


def reference_edit_distance(a, b):
    """Plain recursive Levenshtein (memoised), the independent reference."""
    @functools.cache
    def d(i, j):
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


@pytest.mark.parametrize("ref, hyp, want", [
    ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("abc", "", 3), ("", "", 0),
    ("abc", "abc", 0), ("intention", "execution", 5), ([1, 2, 3, 4], [2, 3, 4, 5], 2),
    ("the cat sat".split(), "the cat sat down".split(), 1)])
def test_edit_distance_known_pairs(ref, hyp, want):
    assert ctc.edit_distance(ref, hyp) == want
    assert ctc.edit_distance(hyp, ref) == want


def test_edit_distance_random_against_reference():
    rng = np.random.default_rng(7)
    for _ in range(40):
        a = tuple(rng.integers(0, 3, size=rng.integers(0, 9)).tolist())
        b = tuple(rng.integers(0, 3, size=rng.integers(0, 9)).tolist())
        assert ctc.edit_distance(a, b) == reference_edit_distance(a, b)


def test_error_rates():
    assert ctc.error_rate([[1, 2, 3], [4]], [[1, 3], [4, 4]]) == pytest.approx(2 / 4)
    assert ctc.word_error_rate(["one two three", "four"], ["one too three", ""]) == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="2 references but 1"):
        ctc.error_rate([[1], [2]], [[1]])
    with pytest.raises(ValueError, match="all empty"):
        ctc.error_rate([[]], [[1]])


@pytest.mark.parametrize("args, match", [
    ((np.zeros((2, 3)), np.ones((2, 1), int), np.ones(2, int), None), r"logits \(2, 3\)"),
    ((np.zeros((2, 3, 4)), np.ones((3, 1), int), np.ones(2, int), None), r"labels \(3, 1\)"),
    ((np.zeros((2, 3, 4)), np.ones((2, 1), int), np.ones(3, int), None), r"label_lengths \(3,\)"),
    ((np.zeros((2, 3, 4)), np.ones((2, 1), int), np.ones(2, int), np.ones((2, 3), int)), r"seq_lengths \(2, 3\)"),
    ((np.zeros((2, 3, 4)), np.ones((2, 1)), np.ones(2, int), None), "integers"),
    ((np.zeros((1, 3, 4)), np.array([[1, 2]]), np.array([3]), None), r"label_lengths\[0\] = 3"),
    ((np.zeros((1, 3, 4)), np.array([[1, 2]]), np.array([2]), np.array([4])), r"seq_lengths\[0\] = 4"),
    ((np.zeros((1, 3, 4)), np.array([[1, 0]]), np.array([2]), None), r"labels\[0, 1\] = 0 .*blank"),
    ((np.zeros((1, 3, 4)), np.array([[1, 4]]), np.array([2]), None), r"labels\[0, 1\] = 4"),
    # two labels with a repeat need 3 frames
    ((np.zeros((2, 3, 4)), np.array([[1, 2], [2, 2]]), np.array([2, 2]), np.array([3, 2])),
     "example 1 has 2 labels with 1 adjacent repeats, so it needs 3 frames, but has only 2"),
    ((np.zeros((1, 3, 4)), np.array([[1, 2, 3, 1]]), np.array([4]), None), "needs 4 frames, but has only 3"),
])
def test_bad_input_raises(args, match):
    with pytest.raises(ValueError, match=match):
        ctc.ctc_loss(*args)


def test_checks_run_under_grad_of_logits_and_skip_under_jit():
    labels, lengths = np.array([[2, 2]]), np.array([2])
    with pytest.raises(ValueError, match="needs 3 frames"):
        jax.grad(lambda z: ctc.ctc_loss(z, labels, lengths).mean)(jnp.zeros((1, 2, 3)))
    out = jax.jit(lambda z, lab, n: ctc.ctc_loss(z, lab, n).mean)(jnp.zeros((1, 3, 3)), labels, lengths)
    assert np.isfinite(out)


def test_decoder_bad_input():
    with pytest.raises(ValueError, match=r"\[B, T, C\]"):
        ctc.greedy_decode(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="beam_width"):
        ctc.beam_search(np.zeros((1, 3, 4)), beam_width=0)
    with pytest.raises(ValueError, match="seq_lengths"):
        ctc.beam_search(np.zeros((1, 3, 4)), np.array([5]))
