"""Inspecting a trained recognition run: reference vs hypothesis for test items, and the picture of one utterance.

``jbptt decode RUN [--n 10] [--split test] [--beam K] [--plot FILE]`` calls :func:`run_cli`. It applies to runs
whose task is trained with the CTC loss (``speech_digits``): the model's per-frame logits are decoded greedily
(or with a prefix beam search of width ``K``, :func:`jbptt.ctc.beam_search`) and compared with the reference
labels by edit distance. ``--plot`` draws a test utterance's log-mel spectrogram with the CTC posteriors under it
and the decoded string (:func:`plot_utterance`).

For a translation run (task loss ``seq2seq``, :mod:`jbptt.experiment.translation`) it prints source, reference and
hypothesis per item (greedy decoding, or beam search of width ``K``), the exact match over the items and by
reference length; ``--plot`` draws the first item's attention map.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jbptt import checkpoint as ckpt
from jbptt import ctc
from jbptt.experiment import translation
from jbptt.experiment.build import precision
from jbptt.experiment.config import ConfigError, load_config
from jbptt.experiment.plots import pyplot, save_figure
from jbptt.experiment.runner import load_run
from jbptt.unroll import unroll


def _labels(row, vocab, blank) -> str:
    return " ".join(vocab[int(i)] for i in row if int(i) != blank and 0 <= int(i) < len(vocab))


def decode_batch(model, params, batch, *, beam: int = 0):
    """Decodes one batch of a CTC run.

    Args:
      model: the run's experiment (``task``, ``cell``); params: its parameters.
      batch: a :class:`~jbptt.batch.Batch` with inputs ``[B, T, F]``, ``seq_lengths: [B]`` and targets ``[B, L]``
        right-padded with the blank.
      beam: ``0`` for greedy decoding, else the prefix beam search's width.

    Returns:
      ``(logits [B, T, C], hypotheses)``: numpy logits and a list of ``B`` lists of label ids.
    """
    _, logits = jax.jit(lambda p, x, n: unroll(model.cell, p, x, seq_lengths=n))(params, batch.inputs,
                                                                                  batch.seq_lengths)
    blank = model.task.info.get("blank", ctc.BLANK)
    if beam > 0:
        hyps = [list(h) for h in ctc.beam_search(logits, batch.seq_lengths, beam_width=beam, blank_id=blank)[0]]
    else:
        dec = ctc.greedy_decode(logits, batch.seq_lengths, blank_id=blank)
        hyps = ctc.to_lists(dec.tokens, dec.lengths)
    return np.asarray(logits), hyps


def decode_rows(run_dir: str, n: int = 10, *, split: str = "test", beam: int = 0, checkpoint: str = "best",
                seed: int = 0) -> tuple[list[dict], dict]:
    """Reference vs hypothesis for ``n`` items of ``split`` of a CTC run.

    Returns:
      ``(rows, extra)``: ``rows[i]`` has ``reference``, ``hypothesis`` (strings of vocabulary symbols) and
      ``edits`` (edit distance in labels); ``extra`` holds the batch, logits and vocabulary (for plots).

    Raises:
      ConfigError: for a run whose task is not trained with the CTC loss.
      CheckpointError: for a missing or corrupt run folder.
    """
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise ckpt.CheckpointError(f"{run_dir} is not a run folder (no config.yaml)")
    with precision(load_config(path).model.dtype):
        cfg, exp, state = load_run(run_dir, checkpoint)
        params = state if checkpoint == "best" else state.params
        if exp.task.loss == "seq2seq":
            return translation.decode_rows(cfg, exp, params, n, split=split, beam=beam, seed=seed)
        if exp.task.loss != "ctc":
            raise ConfigError("task.name", f"decode applies to runs trained with the CTC loss (speech_digits) or "
                              f"the seq2seq loss (translate); this run's task {cfg.task.name!r} uses "
                              f"{exp.task.loss!r} (for character models use `jbptt sample`)", path)
        batch = exp.task.sample(jax.random.key(seed), n, split)
        logits, hyps = decode_batch(exp, params, batch, beam=beam)
    vocab, blank = exp.task.info["vocab"], exp.task.info.get("blank", ctc.BLANK)
    rows = []
    for ref_row, hyp in zip(np.asarray(batch.targets), hyps, strict=True):
        ref = [int(i) for i in ref_row if int(i) != blank]
        rows.append({"reference": _labels(ref, vocab, blank), "hypothesis": _labels(hyp, vocab, blank),
                     "edits": ctc.edit_distance(ref, hyp), "labels": len(ref)})
    return rows, {"batch": jax.device_get(batch), "logits": logits, "vocab": vocab, "blank": blank,
                  "stack": int(exp.task.info.get("stack", 1)), "hop_s": 0.01}


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of :func:`decode_rows`' rows with the label error rate over them."""
    w = max([len("reference")] + [len(r["reference"]) for r in rows])
    lines = [f"{'#':>3}  {'reference':<{w}}  {'hypothesis':<{w}}  edits"]
    lines += [f"{i:>3}  {r['reference']:<{w}}  {r['hypothesis']:<{w}}  {r['edits']}" for i, r in enumerate(rows)]
    labels = sum(r["labels"] for r in rows)
    lines.append(f"label error rate over these {len(rows)} items: {sum(r['edits'] for r in rows) / max(labels, 1):.2%}")
    return "\n".join(lines)


def plot_utterance(extra: dict, out: str, index: int = 0, *, hypothesis: str = "", reference: str = "") -> str:
    """The log-mel features of utterance ``index`` with its CTC posteriors under it and the decoded string.

    Args:
      extra: the ``extra`` of :func:`decode_rows`; out: the figure's path (its extension names the format).

    Returns:
      The written path.
    """
    plt = pyplot()
    b = extra["batch"]
    n, stack, hop = int(np.asarray(b.seq_lengths)[index]), extra["stack"], extra["hop_s"]
    feats = np.asarray(b.inputs)[index, :n].astype(np.float32)
    feats = feats.reshape(n * stack, -1)  # model steps of ``stack`` concatenated frames back to frames
    post = jax.nn.softmax(jnp.asarray(extra["logits"][index, :n], jnp.float32), axis=-1)
    steps = (np.arange(n) + 0.5) * stack * hop  # the middle of each model step, in seconds
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True, height_ratios=[3, 2])
    top.imshow(feats.T, origin="lower", aspect="auto", interpolation="nearest", cmap="magma",
               extent=(0.0, n * stack * hop, -0.5, feats.shape[1] - 0.5))
    top.set_ylabel("log-mel band")
    top.set_title(f"reference: {reference or '-'}    decoded: {hypothesis or '-'}")
    vocab = extra["vocab"]
    for c in range(post.shape[1]):
        style = dict(color="0.6", linestyle=":", label="blank") if c == extra["blank"] else dict(label=vocab[c])
        bottom.plot(steps, np.asarray(post[:, c]), **style)
    bottom.set_ylabel("CTC posterior")
    bottom.set_xlabel("time (s)")
    bottom.legend(ncol=6, fontsize=7, loc="upper right")
    fig.tight_layout()
    return save_figure(fig, out)


def run_cli(args) -> int:
    """``jbptt decode``: prints the table (and writes ``--plot``). Returns the exit code: 0, 1 for a bad run
    folder or checkpoint, 2 for a run this does not apply to or bad arguments."""
    if args.n < 1 or args.beam < 0:
        print("jbptt: --n must be >= 1 and --beam >= 0", flush=True)
        return 2
    try:
        rows, extra = decode_rows(args.run_dir, args.n, split=args.split, beam=args.beam,
                                  checkpoint=args.checkpoint, seed=args.seed)
    except ConfigError as e:
        print(f"jbptt: {e}")
        return 2
    except ckpt.CheckpointError as e:
        print(f"jbptt: checkpoint error: {e}")
        return 1
    if extra.get("kind") == "translation":
        print(translation.format_rows(rows))
        if args.plot:
            try:
                print(f"wrote {translation.plot_attention(rows, extra, args.plot, 0)}")
            except ValueError as e:
                print(f"jbptt: {e}")
                return 2
        return 0
    print(format_rows(rows))
    if args.plot:
        path = plot_utterance(extra, args.plot, 0, hypothesis=rows[0]["hypothesis"], reference=rows[0]["reference"])
        print(f"wrote {path}")
    return 0
