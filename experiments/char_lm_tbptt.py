"""Character-level language model over the corpus as one stream, trained with stateful TBPTT(k1, k2).

Reads ``configs/char_lm_tbptt.yaml``; feeds the training split as ``batch_size`` parallel streams in chunks of
``k1`` characters through :func:`~jbptt.train.train_stream` (one compiled step for every chunk, one
optimizer step
per chunk), evaluates bits per character statefully over the whole validation split, and writes
``char_lm_tbptt.json`` (curve, final val bits/char, training characters per second) to ``out``.

Usage::

    python experiments/char_lm_tbptt.py [--config configs/char_lm_tbptt.yaml] [--out DIR] [--chunks N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from jbptt import cells, fused, losses
from jbptt.batch import pad_chunk
from jbptt.checkpoint import atomic_write
from jbptt.estimators.tbptt import tbptt
from jbptt.experiment.rundir import machine_info
from jbptt.tasks.text import VOCAB, text_stream
from jbptt.train import init_train_state, make_train_step, train_stream
from jbptt.unroll import unroll

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "char_lm_tbptt.yaml")


def make_stream_evaluator(cell, batch_size: int, k1: int, split: str = "val"):
    """``evaluate(params) -> bits/char`` over the whole ``split`` read as ``batch_size`` streams, carry kept."""
    chunks = [pad_chunk(b, k1) for b in text_stream(batch_size, k1, split)]

    @jax.jit
    def chunk_loss(params, carry, batch):
        carry, ys = unroll(cell, params, batch.inputs, carry, seq_lengths=batch.seq_lengths)
        w = batch.weights(ys.dtype)
        return carry, jnp.sum(w * losses.cross_entropy(ys, batch.targets)), jnp.sum(w)

    def evaluate(params):
        carry = cell.initial_carry(params, (batch_size,))
        nats, count = 0.0, 0.0
        for b in chunks:
            carry, s, n = chunk_loss(params, carry, b)
            nats, count = nats + float(s), count + float(n)
        return nats / count / math.log(2.0)

    return evaluate


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--out")
    p.add_argument("--chunks", type=int, help="training chunks (overrides training.chunks)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    with open(args.config) as f:
        cfg = yaml.safe_load(f)
    m, tb, o, t = cfg["model"], cfg["tbptt"], cfg["optimizer"], cfg["training"]
    n_chunks = args.chunks or t["chunks"]
    out = args.out or cfg["out"]
    k1, k2, B = int(tb["k1"]), int(tb.get("k2", tb["k1"])), int(t["batch_size"])

    cell = cells.with_readout(fused.cell(m["cell"], m["hidden"]), len(VOCAB))
    params = cell.init(jax.random.key(cfg.get("seed", 0)), len(VOCAB))
    estimator = tbptt(cell, losses.cross_entropy, k1=k1, k2=k2, stateful=True)
    optimizer = optax.chain(optax.clip_by_global_norm(o.get("clip_norm", 1.0)), optax.adam(o["lr"]))
    stream = itertools.islice(text_stream(B, k1, "train", repeat=True), n_chunks)
    first = next(stream)
    state = init_train_state(estimator, optimizer, params, cell.initial_carry(params, (B,)),
                             key=jax.random.key(cfg.get("seed", 0)), inputs=first.inputs)  # the k2 > k1 window
    train_step = jax.jit(make_train_step(estimator, optimizer))
    evaluate = make_stream_evaluator(cell, int(cfg["eval"]["batch_size"]), k1)

    curve, timing = [], {"train_s": 0.0, "chars": 0}
    state, _ = train_stream(train_step, state, [first], k1)  # compiles
    jax.block_until_ready(state.params)
    bpc0 = evaluate(state.params)
    curve.append({"chunk": 1, "val_bpc": bpc0})
    done, window_loss = 1, []
    while done < n_chunks:
        block = list(itertools.islice(stream, min(t["eval_every"], n_chunks - done)))
        if not block:
            break
        t0 = time.perf_counter()
        state, n = train_stream(train_step, state, block, k1,
                                on_metrics=lambda i, mt: window_loss.append(mt["loss"]))
        jax.block_until_ready(state.params)
        timing["train_s"] += time.perf_counter() - t0
        timing["chars"] += n * B * k1
        done += n
        train_bpc = float(np.mean([float(x) for x in window_loss])) / math.log(2.0)
        window_loss.clear()
        curve.append({"chunk": done, "train_bpc": train_bpc, "val_bpc": evaluate(state.params)})
        if not args.quiet:
            print(f"chunk {done}/{n_chunks}: train {train_bpc:.3f} bpc, val {curve[-1]['val_bpc']:.3f} bpc, "
                  f"{timing['chars'] / max(timing['train_s'], 1e-9):.0f} chars/s", file=sys.stderr, flush=True)
    result = {"config": cfg, "chunks": done, "characters_trained": done * B * k1,
              "final_val_bpc": curve[-1]["val_bpc"],
              "train_chars_per_s": timing["chars"] / max(timing["train_s"], 1e-9), "curve": curve,
              "machine": machine_info()}
    os.makedirs(out, exist_ok=True)
    atomic_write(os.path.join(out, "char_lm_tbptt.json"), json.dumps(result, indent=2))
    if not args.quiet:
        print(json.dumps({k: result[k] for k in ("chunks", "final_val_bpc", "train_chars_per_s")}))
    return result


if __name__ == "__main__":
    main()
