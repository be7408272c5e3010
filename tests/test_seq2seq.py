"""Encoder–decoder models: gradients through both unrolls, padding, greedy and beam decoding, a tiny learned task."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from jbptt.cells import gru, lstm
from jbptt.losses import cross_entropy
from jbptt.seq2seq import seq2seq
from jbptt.unroll import bidirectional

F64 = jnp.float64
EOS, BOS = 0, 1


def _model(kind: str, *, tgt_vocab=5, src_vocab=4, dtype=F64):
    """Two small models: without attention (LSTM -> LSTM of one size: no bridge, one-hot tokens), and with
    attention (bidirectional GRU -> LSTM: a bridge, embeddings, attention over both directions)."""
    if kind == "plain":
        return seq2seq(lstm(4, dtype=dtype), lstm(4, dtype=dtype), src_vocab=src_vocab, tgt_vocab=tgt_vocab,
                       bos=BOS, eos=EOS)
    assert kind == "attention"
    return seq2seq(bidirectional(gru(3, dtype=dtype), gru(2, dtype=dtype)), lstm(4, dtype=dtype),
                   src_vocab=src_vocab, tgt_vocab=tgt_vocab, bos=BOS, eos=EOS, embed_size=3, attention_size=3)


@functools.cache
def _params(kind: str):
    """The parameters of ``_model(kind)``, initialised once per test session (initialising compiles QRs)."""
    return jax.jit(_model(kind).init)(jax.random.key(0))


@functools.cache
def _jitted(kind: str):
    """``_model(kind)`` with its functions jitted, shared by the tests so each compiles once per shape."""
    model = _model(kind)
    decode = ("max_len", "beam_width", "length_penalty")
    return model._replace(encode=jax.jit(model.encode), logits=jax.jit(model.logits), loss=jax.jit(model.loss),
                          decode_greedy=jax.jit(model.decode_greedy, static_argnames=decode[:1]),
                          decode_beam=jax.jit(model.decode_beam, static_argnames=decode))


def _problem(key, B=3, S=5, L=4, src_vocab=4, tgt_vocab=5):
    ks, kt = jax.random.split(key)
    src = jax.random.randint(ks, (B, S), 0, src_vocab)
    tgt = jax.random.randint(kt, (B, L), 0, tgt_vocab)
    return src, tgt, jnp.array([S, 2, 1][:B]), jnp.array([L, 1, 3][:B])


@pytest.mark.parametrize("kind", ["plain", "attention"])
def test_gradient_matches_central_finite_differences(kind, key):
    model = _model(kind)
    theta, unravel = ravel_pytree(_params(kind))
    src, tgt, sl, tl = _problem(jax.random.key(1))

    def loss(theta):
        return model.loss(unravel(theta), src, tgt, sl, tl)

    eps = 1e-5
    central = jax.jit(jax.vmap(lambda v: (loss(theta + eps * v) - loss(theta - eps * v)) / (2 * eps)))
    grads = np.asarray(jax.jit(jax.grad(loss))(theta))
    # one random direction per parameter leaf (each part of the model checked on its own), and one over all
    sizes = [a.size for a in jax.tree.leaves(unravel(theta))]  # ravel_pytree's order
    parts = np.repeat(np.arange(len(sizes)), sizes)
    noise = np.asarray(jax.random.normal(jax.random.key(2), theta.shape, F64))
    dirs = np.stack([noise * (parts == i) for i in range(len(sizes))] + [noise])
    exact = dirs @ grads
    assert np.all(np.abs(exact) > 1e-8)  # every part of the model, the encoder included, gets a gradient
    np.testing.assert_allclose(central(jnp.asarray(dirs)), exact, rtol=1e-6, atol=0)


def test_padded_batch_equals_each_example_alone(key):
    model = _model("attention")
    params = _params("attention")

    @jax.jit
    def run(params, src, tgt, sl=None, tl=None):
        return (model.logits(params, src, tgt, sl, tl), model.loss(params, src, tgt, sl, tl),
                model.encode(params, src, sl).carry, model.decode_greedy(params, src, sl, max_len=6),
                model.decode_beam(params, src, sl, max_len=6, beam_width=3))

    src, tgt, sl, tl = _problem(jax.random.key(3))
    src = src.at[1, 2:].set(3)  # padding content must not matter
    logits, loss, carry, greedy, beam = run(params, src, tgt, sl, tl)
    total = jnp.sum(cross_entropy(logits[0], tgt[0]))  # example 0 is unpadded; 1 and 2 are padded in both
    for b in (1, 2):
        s, n = int(sl[b]), int(tl[b])
        one, _, carry1, g1, b1 = run(params, src[b:b + 1, :s], tgt[b:b + 1, :n])
        np.testing.assert_allclose(logits[b, :n], one[0], rtol=0, atol=1e-10)
        np.testing.assert_array_equal(logits[b, n:], 0.0)
        total += jnp.sum(cross_entropy(one[0], tgt[b, :n]))
        for leaf_batch, leaf_one in zip(jax.tree.leaves(carry), jax.tree.leaves(carry1), strict=True):
            np.testing.assert_allclose(leaf_batch[b], leaf_one[0], rtol=0, atol=1e-10)
        np.testing.assert_array_equal(greedy.tokens[b], g1.tokens[0])
        np.testing.assert_array_equal(greedy.lengths[b], g1.lengths[0])
        np.testing.assert_allclose(greedy.log_prob[b], g1.log_prob[0], rtol=1e-10)
        np.testing.assert_allclose(greedy.attention[b, :, :s], g1.attention[0], rtol=0, atol=1e-10)
        np.testing.assert_array_equal(greedy.attention[b, :, s:], 0.0)
        np.testing.assert_array_equal(beam.tokens[b], b1.tokens[0])
        np.testing.assert_allclose(beam.log_prob[b], b1.log_prob[0], rtol=1e-10)
    np.testing.assert_allclose(loss, total / jnp.sum(tl), rtol=1e-10)  # a mean over the valid tokens


def _sequence_log_prob(model, params, src, sl, tokens, lengths):
    """The model's log-probability of each ``tokens[b, :lengths[b]]`` by teacher forcing."""
    logp = jax.nn.log_softmax(model.logits(params, src, tokens, sl, lengths), axis=-1)
    picked = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(jnp.arange(tokens.shape[1]) < lengths[:, None], picked, 0.0), axis=1)


@pytest.mark.parametrize(("kind", "eos_bias"), [("plain", 0.1), ("attention", 0.3)])
def test_greedy_decoding_stops_at_eos_and_scores_its_tokens(kind, eos_bias):
    model = _jitted(kind)
    params = dict(_params(kind))
    src, _, sl, _ = _problem(jax.random.key(4), B=3)
    # a readout bias on EOS chosen so that some sequences end at once and others run to max_len (the trained model
    # of test_learns_to_reverse_with_attention ends its sequences in between)
    params["readout"] = {"w": params["readout"]["w"], "b": params["readout"]["b"].at[EOS].set(eos_bias)}
    max_len = 5
    out = model.decode_greedy(params, src, sl, max_len=max_len)
    assert out.tokens.shape == (3, max_len) and out.lengths.shape == (3,)
    assert len(set(np.asarray(out.lengths).tolist())) > 1
    for b in range(3):
        n = int(out.lengths[b])
        assert 1 <= n <= max_len
        body = np.asarray(out.tokens[b, :n - 1])
        assert not np.any(body == EOS)  # no EOS before the end
        assert n == max_len or int(out.tokens[b, n - 1]) == EOS
        np.testing.assert_array_equal(out.tokens[b, n:], EOS)
        if out.attention is not None:
            np.testing.assert_allclose(jnp.sum(out.attention[b, :n], axis=-1), 1.0, rtol=1e-12)
            np.testing.assert_array_equal(out.attention[b, n:], 0.0)
    np.testing.assert_allclose(out.log_prob, _sequence_log_prob(model, params, src, sl, out.tokens, out.lengths),
                               rtol=1e-10)
    beam1 = model.decode_beam(params, src, sl, max_len=max_len, beam_width=1)
    np.testing.assert_array_equal(beam1.tokens, out.tokens)
    np.testing.assert_array_equal(beam1.lengths, out.lengths)
    np.testing.assert_allclose(beam1.log_prob, out.log_prob, rtol=1e-12)
    assert beam1.attention is None


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_wide_beam_search_finds_the_best_sequence_by_enumeration(length_penalty, key):
    V, max_len = 5, 3
    model = _jitted("attention")
    params = _params("attention")
    src, _, sl, _ = _problem(jax.random.key(5), B=2, tgt_vocab=V)
    seqs = []  # every possible output: <= max_len tokens ending with EOS, or max_len tokens without one
    for n in range(1, max_len + 1):
        for body in itertools.product(range(1, V), repeat=n - 1):
            seqs.append((list(body) + [EOS], n))
        if n == max_len:
            seqs += [(list(t), n) for t in itertools.product(range(1, V), repeat=n)]
    tokens = jnp.array([s + [EOS] * (max_len - n) for s, n in seqs])
    lengths = jnp.array([n for _, n in seqs])
    beam = model.decode_beam(params, src, sl, max_len=max_len, beam_width=len(seqs),
                             length_penalty=length_penalty)
    for b in range(2):
        one_src, one_sl = (jnp.repeat(a[b:b + 1], len(seqs), axis=0) for a in (src, sl))
        logp = _sequence_log_prob(model, params, one_src, one_sl, tokens, lengths)
        best = int(jnp.argmax(logp / lengths.astype(F64) ** length_penalty))
        np.testing.assert_array_equal(beam.tokens[b], tokens[best])
        assert int(beam.lengths[b]) == int(lengths[best])
        np.testing.assert_allclose(beam.log_prob[b], logp[best], rtol=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_beam_search_scores_at_least_greedy(seed):
    model = _jitted("attention")
    theta, unravel = ravel_pytree(_params("attention"))
    params = unravel(theta + jax.random.normal(jax.random.key(seed), theta.shape, F64))  # another random model
    src, _, sl, _ = _problem(jax.random.key(10 + seed))
    greedy = model.decode_greedy(params, src, sl, max_len=6)
    beam = model.decode_beam(params, src, sl, max_len=6, beam_width=4)
    assert np.all(np.asarray(beam.log_prob) >= np.asarray(greedy.log_prob) - 1e-12)


def test_bridge_only_where_the_carries_differ(key):
    assert "bridge" not in _params("plain")
    assert "bridge" in _params("attention")
    forced = seq2seq(lstm(4), lstm(4), src_vocab=3, tgt_vocab=3, bos=1, eos=0, bridge=True)
    assert "bridge" in jax.eval_shape(forced.init, key)
    with pytest.raises(ValueError, match="bridge=False"):
        jax.eval_shape(seq2seq(gru(3), lstm(4), src_vocab=3, tgt_vocab=3, bos=1, eos=0, bridge=False).init, key)


def _reverse_task(key, n, vocab=6, max_src=5):
    """Symbols 2..vocab-1, reversed; targets end with EOS. Returns src, tgt, src_lengths, tgt_lengths."""
    kl, ks = jax.random.split(key)
    lengths = jax.random.randint(kl, (n,), 2, max_src + 1)
    src = jax.random.randint(ks, (n, max_src), 2, vocab)
    src = jnp.where(jnp.arange(max_src) < lengths[:, None], src, 0)
    idx = jnp.clip(lengths[:, None] - 1 - jnp.arange(max_src + 1), 0, max_src - 1)
    rev = jnp.take_along_axis(src, idx[:, :max_src + 1], axis=1)
    tgt = jnp.where(jnp.arange(max_src + 1) < lengths[:, None], rev, EOS)
    return src, tgt, lengths, lengths + 1


@pytest.mark.slow  # learning is shown by configs/translate.yaml; the runner test trains a tiny model
def test_learns_to_reverse_with_attention():
    vocab, steps, batch = 6, 200, 32
    model = seq2seq(gru(16), gru(16), src_vocab=vocab, tgt_vocab=vocab, bos=BOS, eos=EOS, embed_size=8,
                    attention_size=8)
    opt = optax.adam(2e-2)
    data = jax.tree.map(lambda a: jnp.reshape(a, (steps, batch) + a.shape[1:]),
                        _reverse_task(jax.random.key(1), steps * batch, vocab))

    @jax.jit
    def train(params):
        def step(carry, batch):
            params, state = carry
            loss, grads = jax.value_and_grad(model.loss)(params, *batch)
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), data)
        return params, losses

    params, losses = train(model.init(jax.random.key(0)))
    assert float(losses[-1]) < 0.1 * float(losses[0])
    src, tgt, sl, tl = _reverse_task(jax.random.key(2), 200, vocab)
    out = jax.jit(lambda p: model.decode_greedy(p, src, sl, max_len=8))(params)
    exact = jnp.all(jnp.where(jnp.arange(6) < tl[:, None], out.tokens[:, :6] == tgt, True), axis=1) & (
        out.lengths == tl)
    assert float(jnp.mean(exact)) >= 0.9, float(jnp.mean(exact))
    past = jnp.arange(8) >= out.lengths[:, None]
    assert bool(jnp.all(jnp.where(past, out.tokens == EOS, True)))
    np.testing.assert_allclose(jnp.sum(out.attention, axis=-1), 1.0 - past, rtol=0, atol=1e-5)
