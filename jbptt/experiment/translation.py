"""Translation runs: an encoder–decoder (:mod:`jbptt.seq2seq`) built from a config, trained by ``bptt`` through
``jbptt run``, and inspected by ``jbptt decode``.

A config whose task has the ``"seq2seq"`` loss (``translate``) builds, instead of a stack of cells with a readout,
a :class:`~jbptt.seq2seq.Seq2Seq` (:func:`build_seq2seq`) wrapped as a whole-sequence model
(:func:`seq2seq_model`, a :class:`~jbptt.unroll.SequenceModel`): it reads the batch's inputs ``(src, tgt)`` and
returns the teacher-forced logits ``[B, L, V]``, which the task's loss and metrics read. From the config:
``model.cell`` and ``model.hidden`` give the encoder's and the decoder's cells (``model.options`` go to both),
``model.bidirectional`` makes the encoder bidirectional (a forward and a backward cell of ``hidden`` units, bridged
to the decoder), ``model.attention`` is the additive attention's width (``null``: none, the decoder only sees the
encoder's final carry). ``model.layers`` must be 1; dropout, residual, a learned initial carry and
``training.chunk`` do not apply.

Inspection (:func:`decode_rows`, :func:`format_rows`, :func:`plot_attention`): greedy (or beam) decoding of test
items, exact match overall and by target length, and the attention map of one item.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jbptt import cells, fused
from jbptt.experiment.config import Config, ConfigError
from jbptt.experiment.plots import pyplot, save_figure
from jbptt.seq2seq import Seq2Seq, seq2seq
from jbptt.tasks import Task
from jbptt.unroll import SequenceModel, bidirectional

LENGTH_BUCKETS = (0, 15, 20, 25, 30, 35, 40, 1000)
"""Edges of the target-length buckets (characters, ``EOS`` not counted): ``[lo, hi)``."""


def build_seq2seq(cfg: Config, task: Task, dtype, source: str = "<config>") -> Seq2Seq:
    """The encoder–decoder of ``cfg.model`` for ``task`` (see the module docstring).

    Args:
      dtype: the parameters' floating dtype (``jnp.float32`` or ``jnp.float64``).

    Raises:
      ConfigError: a model key that does not apply to an encoder–decoder, or a bad cell option.
    """
    m = cfg.model
    bi = m.bidirectional
    for key, bad, why in (
            ("model.layers", m.layers != 1, f"must be 1 for an encoder-decoder (one encoder and one decoder "
                                             f"layer), got {m.layers}"),
            ("model.dropout", m.dropout > 0, "is not available for an encoder-decoder; set it to 0"),
            ("model.residual", m.residual, "is not available for an encoder-decoder"),
            ("model.learned_initial_carry", m.learned_initial_carry, "is not available for an encoder-decoder "
                                                                       "(the decoder starts from the encoder)"),
            ("training.chunk", cfg.training.chunk is not None, f"task {task.name!r} has a whole-sequence loss "
                                                               "(seq2seq); it cannot be trained in chunks")):
        if bad:
            raise ConfigError(key, why, source)
    make = fused.cell if m.fused in ("auto", True) else lambda name, hidden, **kw: cells.CELLS[name](hidden, **kw)
    try:
        enc = make(m.cell, m.hidden, dtype=dtype, **m.options)
        encoder = bidirectional(enc, make(m.cell, m.hidden, dtype=dtype, **m.options)) if any(
            bi if isinstance(bi, list) else [bi]) else enc
        decoder = make(m.cell, m.hidden, dtype=dtype, **m.options)
    except (TypeError, ValueError) as e:
        raise ConfigError("model.options", f"cell {m.cell!r}: {e}", source) from None
    info = task.info
    return seq2seq(encoder, decoder, src_vocab=task.input_size, tgt_vocab=task.output_size, bos=info["bos"],
                   eos=info["eos"], attention_size=m.attention)


def seq2seq_model(cfg: Config, task: Task, dtype, source: str = "<config>") -> SequenceModel:
    """:func:`build_seq2seq` as a whole-sequence model that ``unroll`` applies and ``bptt`` trains.

    Its ``apply(params, (src [B, S], tgt [B, L]), *, seq_lengths=src_lengths) -> ((), logits [B, L, V])`` gives
    the teacher-forced logits (zero past each target's ``EOS``); ``init(key, input_size)`` ignores
    ``input_size`` (the vocabularies come from the task). ``resets`` and ``truncate`` do not apply (a
    ``ValueError`` says so).
    """
    model = build_seq2seq(cfg, task, dtype, source)
    eos = task.info["eos"]

    def init(key, input_size=None):
        del input_size
        return model.init(key)

    def initial_carry(params, batch_shape):
        del params, batch_shape
        return ()

    def apply(params, xs, *, seq_lengths=None, resets=None, unroll: int = 1, reverse_mode_only: bool = False,
              truncate: int | None = None):
        del unroll, reverse_mode_only
        if resets is not None or truncate is not None:
            raise ValueError("an encoder-decoder reads whole (source, target) pairs: resets and truncation do not "
                             "apply")
        src, tgt = xs
        tgt_lengths = (jnp.argmax(jnp.asarray(tgt) == eos, axis=-1) + 1).astype(jnp.int32)
        return (), model.logits(params, src, tgt, seq_lengths, tgt_lengths)

    def step(params, carry, x):
        raise ValueError("an encoder-decoder reads the whole source before it emits anything: it has no per-step "
                         "step, so only estimators that differentiate the whole unroll apply (bptt)")

    hidden = cfg.model.hidden
    return SequenceModel(init, initial_carry, apply, step, hidden, task.output_size)


# ----------------------------------------------------------------------------------------------------------
# Inspection.


def decode_batch(model: Seq2Seq, params, src, src_lengths, *, max_len: int, beam: int = 0):
    """Greedy decoding (with attention weights) and, with ``beam > 0``, beam search of one batch.

    Returns:
      ``(greedy, best)``: :class:`~jbptt.seq2seq.Decoded` of greedy decoding and of the chosen decoder (the same
      object without a beam), as numpy.
    """
    greedy = jax.jit(lambda p, s, n: model.decode_greedy(p, s, n, max_len=max_len))(params, src, src_lengths)
    greedy = jax.device_get(greedy)
    if beam <= 0:
        return greedy, greedy
    best = jax.jit(lambda p, s, n: model.decode_beam(p, s, n, max_len=max_len, beam_width=beam))(
        params, src, src_lengths)
    return greedy, jax.device_get(best)


def decode_rows(cfg: Config, exp, params, n: int, *, split: str = "test", beam: int = 0, seed: int = 0,
                dtype=None) -> tuple[list[dict], dict]:
    """Source, reference and hypothesis for ``n`` items of ``split`` of a translation run.

    Args:
      cfg / exp: the run's config and its built model (``exp.task``); params: its parameters.
      n: items (the whole split, in order, when ``n`` reaches its size); beam: ``0`` greedy, else the beam width.
      dtype: the parameters' dtype (default: that of ``params``).

    Returns:
      ``(rows, extra)``: ``rows[i]`` has ``source``, ``reference``, ``hypothesis`` (strings), ``match`` (bool)
      and ``length`` (reference characters); ``extra`` has ``kind: "translation"``, the greedy ``attention``
      ``[n, max_len, S]``, the source / greedy-output ``lengths`` and the first item's characters for the plot.
    """
    task = exp.task
    dtype = dtype or jax.tree.leaves(params)[0].dtype
    model = build_seq2seq(cfg, task, dtype)
    batch = task.sample(jax.random.key(seed), n, split)
    src = batch.inputs[0]
    greedy, best = decode_batch(model, params, src, batch.seq_lengths, max_len=task.info["max_tgt_len"], beam=beam)
    sv, tv, eos = task.info["src_vocab"], task.info["tgt_vocab"], task.info["eos"]
    rows = []
    for s, ref, hyp in zip(np.asarray(src), np.asarray(batch.targets), np.asarray(best.tokens), strict=True):
        r, h = tv.decode(ref, stop=eos), tv.decode(hyp, stop=eos)
        rows.append({"source": sv.decode(s), "reference": r, "hypothesis": h, "match": r == h, "length": len(r)})
    extra = {"kind": "translation", "attention": greedy.attention, "src_lengths": np.asarray(batch.seq_lengths),
             "out_lengths": np.asarray(greedy.lengths), "greedy": [tv.decode(t, stop=eos) for t in greedy.tokens],
             "beam": beam}
    return rows, extra


def accuracy_by_length(rows: list[dict], edges=LENGTH_BUCKETS) -> list[dict]:
    """Exact match of ``rows`` (:func:`decode_rows`) by reference length: one dict per non-empty bucket
    ``[lo, hi)`` with ``lo``, ``hi``, ``items`` and ``exact_match``."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        hits = [r["match"] for r in rows if lo <= r["length"] < hi]
        if hits:
            out.append({"lo": lo, "hi": hi, "items": len(hits), "exact_match": float(np.mean(hits))})
    return out


def format_rows(rows: list[dict], *, max_rows: int = 50) -> str:
    """A plain-text table of :func:`decode_rows`' rows (the first ``max_rows``), then the exact match over all of
    them and by reference length."""
    shown = rows[:max_rows]
    ws = max([len("source")] + [len(r["source"]) for r in shown])
    wr = max([len("reference")] + [len(r["reference"]) for r in shown])
    lines = [f"{'#':>3}  {'source':<{ws}}  {'reference':<{wr}}  hypothesis"]
    lines += [f"{i:>3}  {r['source']:<{ws}}  {r['reference']:<{wr}}  {r['hypothesis']}"
              + ("" if r["match"] else "   <- differs") for i, r in enumerate(shown)]
    if len(rows) > len(shown):
        lines.append(f"... ({len(rows) - len(shown)} more items)")
    lines.append(f"exact match over these {len(rows)} items: {np.mean([r['match'] for r in rows]):.2%}")
    by = accuracy_by_length(rows)
    if len(by) > 1:
        lines.append("by reference length: " + ", ".join(
            f"[{b['lo']}, {b['hi']}) {b['exact_match']:.0%} of {b['items']}" for b in by))
    return "\n".join(lines)


def plot_attention(rows: list[dict], extra: dict, out: str, index: int = 0) -> str:
    """The attention map of item ``index``: the greedy output's characters (rows) against the source characters
    (columns), each cell the attention weight of that output step on that source step.

    Returns:
      The written path. Raises ``ValueError`` for a model without attention.
    """
    if extra["attention"] is None:
        raise ValueError("this model has no attention (model.attention: null); there is no attention map to draw")
    plt = pyplot()
    n_src, n_out = int(extra["src_lengths"][index]), int(extra["out_lengths"][index])
    att = np.asarray(extra["attention"][index, :n_out, :n_src], np.float32)
    src = list(rows[index]["source"])
    out_chars = list(extra["greedy"][index]) + ["<eos>"]
    out_chars = out_chars[:n_out]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.14 * n_src + 1.5), max(3.0, 0.14 * n_out + 1.0)))
    ax.imshow(att, cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(n_src), ["␣" if c == " " else c for c in src], fontsize=6)
    ax.set_yticks(range(len(out_chars)), ["␣" if c == " " else c for c in out_chars], fontsize=6)
    ax.set_xlabel("source (" + rows[index]["source"] + ")")
    ax.set_ylabel("output")
    ax.set_title(f"attention: {rows[index]['hypothesis']}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out)
