"""Encoder–decoder (sequence-to-sequence) models from jbptt cells, with optional additive attention.

A :class:`Seq2Seq` is a NamedTuple of pure functions built by :func:`seq2seq` from an encoder (a :class:`Cell` or a
:class:`~jbptt.unroll.Bidirectional` layer) and a decoder :class:`Cell`::

    model = seq2seq(gru(64), gru(64), src_vocab=12, tgt_vocab=12, bos=1, eos=0, attention_size=32)
    params = model.init(key)
    loss = model.loss(params, src, tgt, src_lengths, tgt_lengths)          # BPTT through both unrolls
    out = model.decode_greedy(params, src, src_lengths, max_len=20)        # out.tokens, out.lengths, out.attention
    best = model.decode_beam(params, src, src_lengths, max_len=20, beam_width=4)

Token conventions: ``src: [B, S]`` and ``tgt: [B, L]`` are integer tokens, right-padded (any in-range value past
the lengths). A target sequence ends with its ``eos`` token, which ``tgt_lengths`` counts. The decoder reads the
previous target token (teacher forcing; ``bos`` at ``t = 0``) and predicts the next one. Decoded sequences follow
the same convention: ``lengths`` counts the ``eos`` (``max_len`` when none was produced) and ``tokens`` holds
``eos`` past the lengths.

Bridge: the decoder starts from the encoder's final carry (each sequence's carry after its last valid step). When
the two carries have the same structure and shapes (e.g. LSTM -> LSTM of one size) it is passed on unchanged;
otherwise (different sizes, different cells, a bidirectional encoder) a learned linear bridge maps the encoder's
flattened carry to the decoder's: ``flat_dec = flat_enc @ W + b``, split back into the decoder's carry leaves.

Attention (Bahdanau et al. 2015, additive): before each decoder step the decoder's flattened carry ``s`` queries
the encoder outputs ``h_j``: ``e_j = v . tanh(h_j W_k + s W_q + b)``, masked to the valid source steps, ``a =
softmax(e)``, ``context = sum_j a_j h_j``. The context is concatenated to the decoder input (the embedded previous
token) and to the decoder output that the readout maps to logits.

Decoding runs on the device: greedy decoding and beam search are ``lax.while_loop`` s over fixed-size buffers of
``max_len`` steps (static) that stop once every sequence has produced ``eos``. Beam search prunes by raw
log-probability and picks the best final beam by ``log_prob / length ** length_penalty`` (GNMT-style length
normalisation without the +5 offset; ``0`` keeps the raw log-probability, ``1`` is the per-token average).

Everything is safe under ``jit``; ``loss`` and ``logits`` also under ``grad``. Real-valued carries only (the bridge
and the attention query flatten the carry); cells that take per-step PRNG keys (dropout) are not supported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jbptt.batch import batch_where, loss_weights
from jbptt.cells import Cell, lecun, params_dtype
from jbptt.losses import cross_entropy, weighted_mean
from jbptt.unroll import Bidirectional, unroll

_MASKED = -1e30  # attention score of a padded source step: exp underflows to exactly 0 in float32 and float64


class Encoded(NamedTuple):
    """The encoder's result for one batch.

    Attributes:
      memory: ``[B, S, O_enc]`` encoder outputs (zero past ``src_lengths``).
      carry: the decoder's initial carry for batch shape ``(B,)`` (after the bridge).
      src_lengths: ``[B]`` source lengths.
    """

    memory: jax.Array
    carry: Any
    src_lengths: jax.Array


class Decoded(NamedTuple):
    """A decoded batch.

    Attributes:
      tokens: ``[B, max_len]`` int32 tokens, ``eos`` past ``lengths``.
      lengths: ``[B]`` int32 lengths counting the ``eos`` (``max_len`` when none was produced).
      log_prob: ``[B]`` the model's log-probability of ``tokens[:, :lengths]`` (the ``eos`` included).
      attention: ``[B, max_len, S]`` attention weights of each emitted token (zero past ``lengths``), from greedy
        decoding of a model with attention; ``None`` otherwise.
    """

    tokens: jax.Array
    lengths: jax.Array
    log_prob: jax.Array
    attention: jax.Array | None = None


class Seq2Seq(NamedTuple):
    """An encoder–decoder model as pure functions (see the module docstring for conventions).

    Attributes:
      init: ``init(key) -> params``, a dict with ``"encoder"``, ``"decoder"``, ``"readout"`` and, where used,
        ``"src_embed"``, ``"tgt_embed"``, ``"bridge"``, ``"attention"``.
      encode: ``encode(params, src, src_lengths=None) -> Encoded``.
      decoder: ``decoder(params, encoded) -> Cell``: the decoder step (attention included) as a Cell bound to one
        encoded batch; its step takes the full ``params``, the decoder carry and the embedded previous token
        ``[B, E]`` and returns ``[B, tgt_vocab]`` logits. It only runs with batch shape ``(B,)`` of ``encoded``.
      logits: ``logits(params, src, tgt, src_lengths=None, tgt_lengths=None) -> [B, L, tgt_vocab]`` teacher-forced
        logits (zero past ``tgt_lengths``).
      loss: same arguments; the token cross-entropy averaged over every valid target token of the batch.
      decode_greedy: ``decode_greedy(params, src, src_lengths=None, *, max_len) -> Decoded`` (with attention);
        jittable with static ``max_len``.
      decode_beam: ``decode_beam(params, src, src_lengths=None, *, max_len, beam_width, length_penalty=0.0) ->
        Decoded`` (the best beam; no attention). Jittable with static ``max_len``, ``beam_width``,
        ``length_penalty``; width 1 is greedy decoding.
    """

    init: Callable
    encode: Callable
    decoder: Callable
    logits: Callable
    loss: Callable
    decode_greedy: Callable
    decode_beam: Callable


def _flat(carry):
    """A carry pytree with leaves ``[B, ...]`` as one ``[B, C]`` array."""
    leaves = jax.tree.leaves(carry)
    return jnp.concatenate([jnp.reshape(a, (a.shape[0], -1)) for a in leaves], axis=-1)


def _unflat(flat, like):
    """Inverse of :func:`_flat` for a carry shaped like ``like`` (leaves ``[B, ...]``)."""
    leaves, treedef = jax.tree.flatten(like)
    out, start = [], 0
    for a in leaves:
        size = a.size // a.shape[0]
        out.append(jnp.reshape(flat[:, start:start + size], a.shape).astype(a.dtype))
        start += size
    return jax.tree.unflatten(treedef, out)


def _lengths(lengths, B: int, T: int):
    return jnp.full((B,), T, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)


def seq2seq(encoder: Cell | Bidirectional, decoder: Cell, *, src_vocab: int, tgt_vocab: int, bos: int, eos: int,
            embed_size: int | None = None, attention_size: int | None = None, bridge: bool | None = None) -> Seq2Seq:
    """Builds an encoder–decoder model.

    Args:
      encoder: a :class:`Cell` (unrolled forward with the source lengths) or a
        :class:`~jbptt.unroll.Bidirectional` layer (its final carry is the pair ``(fwd, bwd)``).
      decoder: a :class:`Cell`; its outputs go through a learned linear readout to ``tgt_vocab`` logits.
      src_vocab / tgt_vocab: vocabulary sizes.
      bos / eos: target tokens that start decoding and end a sequence.
      embed_size: learned embeddings ``[vocab, embed_size]`` for source and target tokens; ``None``: one-hot.
      attention_size: width ``A`` of the additive attention; ``None``: no attention.
      bridge: ``True`` always learns a linear bridge between the encoder's and the decoder's carries, ``False``
        never (the carries must match), ``None`` (default) learns one only when they differ.

    Returns:
      A :class:`Seq2Seq`. The parameters take the floating dtype of the cells' parameters.
    """
    bidir = isinstance(encoder, Bidirectional)
    enc_out = encoder.output_size
    src_in = src_vocab if embed_size is None else embed_size
    tgt_in = tgt_vocab if embed_size is None else embed_size
    ctx = 0 if attention_size is None else enc_out

    def run_encoder(params, xs, lengths):
        if bidir:
            return encoder.apply(params, xs, seq_lengths=lengths)
        return unroll(encoder, params, xs, seq_lengths=lengths)

    def init(key):
        ke, kd, ks, kt, kb, ka, kr = jax.random.split(key, 7)
        params = {"encoder": encoder.init(ke, src_in), "decoder": decoder.init(kd, tgt_in + ctx)}
        dtype = params_dtype(params)
        if embed_size is not None:
            params["src_embed"] = jax.random.normal(ks, (src_vocab, embed_size), dtype)
            params["tgt_embed"] = jax.random.normal(kt, (tgt_vocab, embed_size), dtype)
        enc_carry, _ = jax.eval_shape(lambda p: run_encoder(p, jnp.zeros((1, 1, src_in), dtype), None),
                                      params["encoder"])
        dec_carry = jax.eval_shape(lambda p: decoder.initial_carry(p, (1,)), params["decoder"])
        same = jax.tree.structure(enc_carry) == jax.tree.structure(dec_carry) and all(
            a.shape == b.shape for a, b in zip(jax.tree.leaves(enc_carry), jax.tree.leaves(dec_carry), strict=True))
        if bridge is False and not same:
            raise ValueError("seq2seq: bridge=False needs the encoder's final carry to match the decoder's carry; "
                             f"got {enc_carry} and {dec_carry}")
        if bridge or not same:
            c_enc = sum(a.size for a in jax.tree.leaves(enc_carry))
            c_dec = sum(a.size for a in jax.tree.leaves(dec_carry))
            params["bridge"] = {"w": lecun(kb, (c_enc, c_dec), dtype), "b": jnp.zeros((c_dec,), dtype)}
        if attention_size is not None:
            c_dec = sum(a.size for a in jax.tree.leaves(dec_carry))
            k1, k2, k3 = jax.random.split(ka, 3)
            params["attention"] = {"w_k": lecun(k1, (enc_out, attention_size), dtype),
                                   "w_q": lecun(k2, (c_dec, attention_size), dtype),
                                   "b": jnp.zeros((attention_size,), dtype),
                                   "v": lecun(k3, (attention_size, 1), dtype)[:, 0]}
        params["readout"] = {"w": lecun(kr, (decoder.output_size + ctx, tgt_vocab), dtype),
                             "b": jnp.zeros((tgt_vocab,), dtype)}
        return params

    def embed(params, tokens, name, vocab):
        if embed_size is None:
            return jax.nn.one_hot(tokens, vocab, dtype=params_dtype(params["readout"]))
        return params[name][tokens]

    def encode(params, src, src_lengths=None) -> Encoded:
        src = jnp.asarray(src)
        lengths = _lengths(src_lengths, *src.shape)
        enc_carry, memory = run_encoder(params["encoder"], embed(params, src, "src_embed", src_vocab), lengths)
        like = decoder.initial_carry(params["decoder"], (src.shape[0],))
        if "bridge" in params:
            carry = _unflat(_flat(enc_carry) @ params["bridge"]["w"] + params["bridge"]["b"], like)
        else:
            carry = jax.tree.map(lambda a, b: a.astype(b.dtype), enc_carry, like)
        return Encoded(memory, carry, lengths)

    def attend(params, enc: Encoded, carry):
        """Returns ``(weights [B, S], context [B, O_enc])`` for the decoder carry entering a step."""
        att = params["attention"]
        keys = enc.memory @ att["w_k"]  # [B, S, A]; XLA hoists it out of the decode loop
        query = _flat(carry) @ att["w_q"] + att["b"]  # [B, A]
        scores = jnp.tanh(keys + query[:, None, :]) @ att["v"]  # [B, S]
        valid = jnp.arange(enc.memory.shape[1])[None, :] < enc.src_lengths[:, None]
        weights = jax.nn.softmax(jnp.where(valid, scores, jnp.asarray(_MASKED, scores.dtype)), axis=-1)
        return weights, jnp.einsum("bs,bso->bo", weights, enc.memory)

    def attend_step(params, enc: Encoded, carry, x):
        """One decoder step: ``(carry, logits [B, V], attention weights [B, S] or None)``."""
        if attention_size is None:
            carry, y = decoder.step(params["decoder"], carry, x)
            return carry, y @ params["readout"]["w"] + params["readout"]["b"], None
        weights, context = attend(params, enc, carry)
        carry, y = decoder.step(params["decoder"], carry, jnp.concatenate([x, context], axis=-1))
        y = jnp.concatenate([y, context], axis=-1)
        return carry, y @ params["readout"]["w"] + params["readout"]["b"], weights

    def bound_decoder(params, enc: Encoded) -> Cell:
        del params  # the cell's step receives the parameters as its argument

        def cell_init(key, input_size):
            raise ValueError("the seq2seq decoder cell is bound to trained parameters; initialise the Seq2Seq")

        def step(p, carry, x):
            carry, logits, _ = attend_step(p, enc, carry, x)
            return carry, logits

        return Cell(cell_init, lambda p, batch_shape: enc.carry, step, decoder.hidden_size, tgt_vocab)

    def logits(params, src, tgt, src_lengths=None, tgt_lengths=None):
        enc = encode(params, src, src_lengths)
        tgt = jnp.asarray(tgt)
        B, L = tgt.shape
        prev = jnp.concatenate([jnp.full((B, 1), bos, tgt.dtype), tgt[:, :-1]], axis=1)
        xs = embed(params, prev, "tgt_embed", tgt_vocab)
        _, ys = unroll(bound_decoder(params, enc), params, xs, enc.carry, seq_lengths=_lengths(tgt_lengths, B, L))
        return ys

    def loss(params, src, tgt, src_lengths=None, tgt_lengths=None):
        ys = logits(params, src, tgt, src_lengths, tgt_lengths)
        B, L = ys.shape[:2]
        return weighted_mean(cross_entropy(ys, tgt), loss_weights(B, L, seq_lengths=tgt_lengths, dtype=ys.dtype))

    def decode_greedy(params, src, src_lengths=None, *, max_len: int) -> Decoded:
        enc = encode(params, src, src_lengths)
        B, S = enc.memory.shape[:2]
        dtype = enc.memory.dtype
        attn0 = None if attention_size is None else jnp.zeros((B, max_len, S), dtype)
        state0 = (0, enc.carry, jnp.full((B,), bos, jnp.int32), jnp.zeros((B,), bool),
                  jnp.full((B, max_len), eos, jnp.int32), jnp.zeros((B,), jnp.int32), jnp.zeros((B,), dtype), attn0)

        def cond(state):
            return (state[0] < max_len) & ~jnp.all(state[3])

        def body(state):
            t, carry, prev, done, tokens, lengths, logp, attn = state
            new, logit, weights = attend_step(params, enc, carry, embed(params, prev, "tgt_embed", tgt_vocab))
            lsm = jax.nn.log_softmax(logit, axis=-1)
            tok = jnp.argmax(lsm, axis=-1).astype(jnp.int32)
            tok = jnp.where(done, eos, tok)
            picked = jnp.take_along_axis(lsm, tok[:, None], axis=-1)[:, 0]
            logp = logp + jnp.where(done, 0.0, picked)
            tokens = tokens.at[:, t].set(tok)
            if attn is not None:
                attn = attn.at[:, t].set(jnp.where(done[:, None], 0.0, weights))
            lengths = lengths + (~done).astype(jnp.int32)
            carry = batch_where(done, carry, new)
            return t + 1, carry, tok, done | (tok == eos), tokens, lengths, logp, attn

        _, _, _, _, tokens, lengths, logp, attn = lax.while_loop(cond, body, state0)
        return Decoded(tokens, lengths, logp, attn)

    def decode_beam(params, src, src_lengths=None, *, max_len: int, beam_width: int,
                    length_penalty: float = 0.0) -> Decoded:
        """Beam search, jittable (a ``lax.while_loop`` over at most ``max_len`` steps on fixed-size buffers).

        The beams are pruned by their raw log-probability; a finished beam stays in the beam with its score
        frozen. The best of the final ``beam_width`` beams is chosen by ``log_prob / lengths ** length_penalty``
        (``0``: raw log-probability; ``1``: per-token average). Beam width 1 is greedy decoding.
        """
        k = beam_width
        enc = encode(params, src, src_lengths)
        B = enc.memory.shape[0]
        dtype = enc.memory.dtype
        rep = Encoded(*jax.tree.map(lambda a: jnp.repeat(a, k, axis=0), tuple(enc)))  # rows b * k + j
        scores0 = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf).astype(dtype)
        state0 = (0, rep.carry, jnp.full((B, k), bos, jnp.int32), jnp.zeros((B, k), bool),
                  jnp.full((B, k, max_len), eos, jnp.int32), jnp.zeros((B, k), jnp.int32),
                  jnp.broadcast_to(scores0, (B, k)))
        only_eos = jnp.where(jnp.arange(tgt_vocab) == eos, 0.0, -jnp.inf).astype(dtype)  # a finished beam's step

        def cond(state):
            t, _, _, done, _, _, scores = state
            return (t < max_len) & ~jnp.all(done | (scores == -jnp.inf))

        def gather(a, parent):  # a: [B, k, ...], parent: [B, k]
            return jnp.take_along_axis(a, jnp.reshape(parent, parent.shape + (1,) * (a.ndim - 2)), axis=1)

        def body(state):
            t, carry, prev, done, tokens, lengths, scores = state
            x = embed(params, jnp.reshape(prev, (B * k,)), "tgt_embed", tgt_vocab)
            new, logit, _ = attend_step(params, rep, carry, x)
            lsm = jnp.reshape(jax.nn.log_softmax(logit, axis=-1), (B, k, tgt_vocab))
            lsm = jnp.where(done[..., None], only_eos, lsm)
            top, idx = lax.top_k(jnp.reshape(scores[..., None] + lsm, (B, k * tgt_vocab)), k)
            parent, tok = idx // tgt_vocab, (idx % tgt_vocab).astype(jnp.int32)
            carry = batch_where(jnp.reshape(done, (B * k,)), carry, new)
            carry = jax.tree.map(
                lambda a: jnp.reshape(gather(jnp.reshape(a, (B, k) + a.shape[1:]), parent), a.shape), carry)
            was_done = gather(done, parent)
            tokens = gather(tokens, parent).at[:, :, t].set(tok)
            lengths = gather(lengths, parent) + (~was_done).astype(jnp.int32)
            return t + 1, carry, tok, was_done | (tok == eos), tokens, lengths, top

        _, _, _, _, tokens, lengths, scores = lax.while_loop(cond, body, state0)
        norm = scores / jnp.maximum(lengths, 1).astype(dtype) ** length_penalty
        best = jnp.argmax(norm, axis=1)[:, None]
        pick = lambda a: gather(a, best)[:, 0]  # noqa: E731
        return Decoded(pick(tokens), pick(lengths), pick(scores), None)

    return Seq2Seq(init, encode, bound_decoder, logits, loss, decode_greedy, decode_beam)
