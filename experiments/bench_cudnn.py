"""GPU: the cuDNN LSTM (``jax.experimental.rnn``) against jbptt's LSTM training step.

One training step = forward over ``[B, T, I]``, a mean-squared-error loss on the ``[B, T, H]`` outputs, the
backward pass and an Adam update, at the issue's shape (T=128, B=32, I=64, H=256) and, unless ``--quick``, a wider
batch (B=256) where a GPU has more to do per step. Implementations alternate within every repetition; each is
warmed up and reported by its median. Before timing, the outputs of jbptt's LSTM on the cuDNN weights are compared
with cuDNN's own (same gate order ``[i, f, g, o]``).

Exits cleanly with a message (and, with ``--json``, a JSON saying so) on a machine without a GPU. Takes well under
three minutes on one GPU::

    python experiments/bench_cudnn.py --json results/cudnn.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.bench_throughput import step_flops, write_json  # noqa: E402
from jbptt import cells, fused, losses, unroll  # noqa: E402

IMPLS = ("cudnn", "fast", "vjp", "plain", "flax")


def gpu_devices():
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


def data(T, B, I, H):
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((B, T, I), np.float32)),
            jnp.asarray(rng.standard_normal((B, T, H), np.float32)))


def adam_step(loss_fn, opt):
    @jax.jit
    def step(params, opt_state, xs, ys):
        loss, grads = jax.value_and_grad(loss_fn)(params, xs, ys)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def cudnn_weights(T, B, I, H):
    from jax.experimental import rnn

    return rnn.init_lstm_weight(jax.random.key(0), I, H, 1, False)


def cudnn_forward(weights, xs, I, H):
    from jax.experimental import rnn

    B = xs.shape[0]
    h0 = jnp.zeros((1, B, H), xs.dtype)
    lengths = jnp.full((B,), xs.shape[1], jnp.int32)
    ys, _, _ = rnn.lstm(xs, h0, h0, weights, lengths, I, H, 1, 0.0, False)
    return ys


def jbptt_params_from_cudnn(weights, I, H):
    """jbptt LSTM params equal to cuDNN's flat weights (both use gate order [i, f, g, o])."""
    from jax.experimental import rnn

    w_ih, w_hh, b_ih, b_hh = rnn.unpack_lstm_weights(weights, I, H, 1, False)
    return {"w_x": w_ih[0].T, "w_h": w_hh[0].T, "b": b_ih[0] + b_hh[0]}


def make_runs(T, B, I, H, impls):
    xs, ys = data(T, B, I, H)
    opt = optax.adam(1e-3)
    runs = {}
    if "cudnn" in impls:
        w = cudnn_weights(T, B, I, H)
        step = adam_step(lambda p, x, y: jnp.mean(losses.mse(cudnn_forward(p, x, I, H), y)), opt)
        runs["cudnn"] = (step, [w, opt.init(w)])
    for impl, method in (("fast", "jvp"), ("vjp", "vjp"), ("plain", None)):
        if impl in impls:
            cell = cells.lstm(H) if method is None else fused.lstm(H, method=method)
            p = cell.init(jax.random.key(0), I)
            step = adam_step(lambda p, x, y, cell=cell: jnp.mean(losses.mse(unroll.unroll(cell, p, x)[1], y)), opt)
            runs[impl] = (step, [p, opt.init(p)])
    if "flax" in impls:
        import flax.linen as nn

        model = nn.RNN(nn.LSTMCell(H))
        p = model.init(jax.random.key(0), xs)
        step = adam_step(lambda p, x, y: jnp.mean(losses.mse(model.apply(p, x), y)), opt)
        runs["flax"] = (step, [p, opt.init(p)])
    return runs, xs, ys


def check_outputs(T, B, I, H) -> float:
    """Max |cuDNN - jbptt| over the outputs on the same weights and inputs."""
    xs, _ = data(T, B, I, H)
    w = cudnn_weights(T, B, I, H)
    ref = jax.jit(lambda w, x: cudnn_forward(w, x, I, H))(w, xs)
    ours = jax.jit(lambda p, x: unroll.unroll(cells.lstm(H), p, x)[1])(jbptt_params_from_cudnn(w, I, H), xs)
    return float(jnp.max(jnp.abs(ref - ours)))


def bench(T, B, I, H, impls, reps, warmup):
    runs, xs, ys = make_runs(T, B, I, H, impls)
    for step, state in runs.values():
        for _ in range(warmup):
            state[0], state[1], loss = step(state[0], state[1], xs, ys)
            jax.block_until_ready(loss)
    times = {k: [] for k in runs}
    names = list(runs)
    for r in range(reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            step, state = runs[name]
            t0 = time.perf_counter()
            state[0], state[1], loss = step(state[0], state[1], xs, ys)
            jax.block_until_ready(loss)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = step_flops("lstm", T, B, I, H)
    return {"T": T, "B": B, "I": I, "H": H, "median_ms": {k: 1e3 * v for k, v in med.items()},
            "gflops_per_s": {k: flops / v / 1e9 for k, v in med.items()},
            "speedup_of_fast": {k: med[k] / med["fast"] for k in med} if "fast" in med else {}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="only the issue's shape")
    args = ap.parse_args(argv)
    impls = [s for s in args.impls.split(",") if s]
    if any(s not in IMPLS for s in impls):
        ap.error(f"--impls must be a comma list from {IMPLS}")
    gpus = gpu_devices()
    if not gpus:
        msg = "bench_cudnn: no GPU visible to JAX; nothing to time (cuDNN needs a CUDA GPU)."
        print(msg)
        if args.json:
            write_json(args.json, {"skipped": msg, "jax": jax.__version__})
        return None
    print(f"jax {jax.__version__} on {gpus[0].device_kind}", flush=True)
    T, I, H = 128, 64, 256
    try:
        err = check_outputs(T, 32, I, H)
        print(f"max |cuDNN - jbptt| on the outputs, same weights: {err:.2e}", flush=True)
    except Exception as e:  # noqa: BLE001 - the timing below is still worth having
        err = f"output check failed: {type(e).__name__}: {e}"
        print(err, flush=True)
    rows = [bench(T, B, I, H, impls, args.reps, args.warmup) for B in ((32,) if args.quick else (32, 256))]
    names = list(rows[0]["median_ms"])
    print(f"{'T':>4} {'B':>4} {'H':>4} " + " ".join(f"{n + ' ms':>10}" for n in names)
          + "  " + " ".join(f"{'x' + n:>8}" for n in names if n != "fast"))
    for row in rows:
        line = f"{row['T']:>4} {row['B']:>4} {row['H']:>4} "
        line += " ".join(f"{row['median_ms'][n]:>10.3f}" for n in names)
        line += "  " + " ".join(f"{row['speedup_of_fast'].get(n, float('nan')):>8.2f}" for n in names if n != "fast")
        print(line)
    print("x<impl> = time(impl) / time(fast): > 1 means jbptt's fast path is faster.")
    result = {"device": gpus[0].device_kind, "jax": jax.__version__, "max_abs_output_diff": err, "rows": rows}
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
