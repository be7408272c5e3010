"""Training-step throughput of jbptt's LSTM / GRU against flax.linen.RNN and (if installed) torch nn.LSTM / nn.GRU.

One training step = forward over ``[B, T, I]``, a mean-squared-error loss on the ``[B, T, H]`` outputs, the
backward pass and an Adam update. Implementations are alternated within every repetition (so load changes on a
shared machine hit all of them alike); each is warmed up first and reported by its median over ``--reps`` timed
steps. Also reported: the matrix-product FLOPs of the step (forward + backward = 3x the forward products) and the
achieved GFLOP/s next to the rate XLA reaches on one large matrix product on this machine.

Implementations (``--impls``):
  fast    jbptt's fused cell (``jbptt.fused.lstm`` / ``gru``, method "auto") through the BPTT estimator: the
          estimator's reverse-mode-only unroll runs the hand-written VJP layer for the LSTM, the custom-JVP layer
          for the GRU
  vjp     jbptt with the hand-written custom-VJP layer (``method="vjp"``)
  hoist   jbptt with only the input projection hoisted (``method="hoist"``)
  plain   jbptt scanning the plain per-step cell (``jbptt.cells.lstm`` / ``gru``)
  flax    ``flax.linen.RNN`` with ``nn.LSTMCell`` / ``nn.GRUCell``
  torch   ``torch.nn.LSTM`` / ``torch.nn.GRU`` (skipped when torch is not importable)
The ``plain`` implementation may carry a scan unroll factor, e.g. ``plain:4`` (default 1).

Examples::

    python experiments/bench_throughput.py --quick                      # the issue's shape only, LSTM and GRU
    python experiments/bench_throughput.py --json results/throughput.json   # + grid H x T
    python experiments/bench_throughput.py --cells lstm --H 256 --T 128 --impls fast,plain,flax --reps 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jbptt  # noqa: E402
from jbptt import cells, fused, losses  # noqa: E402
from jbptt.checkpoint import atomic_write  # noqa: E402

FUSED = {"fast": "auto", "vjp": "vjp", "hoist": "hoist", "plain": None}
ALL_IMPLS = ("fast", "vjp", "hoist", "plain", "flax", "torch")


def step_flops(kind: str, T: int, B: int, I: int, H: int) -> float:
    """Matrix-product FLOPs of one training step: forward ``2 T B (I + H) G H`` (``G`` gates), times 3."""
    gates = 4 if kind == "lstm" else 3
    return 3.0 * 2.0 * T * B * (I + H) * gates * H


def matmul_rate(n: int = 2048, reps: int = 10, clock=time.perf_counter) -> float:
    """Median GFLOP/s of one ``[n, n] x [n, n]`` float32 product under ``jit`` (by ``clock``)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = clock()
        f(a, b).block_until_ready()
        times.append(clock() - t0)
    return 2.0 * n**3 / statistics.median(times) / 1e9


def data(T: int, B: int, I: int, H: int):
    rng = np.random.default_rng(0)
    return rng.standard_normal((B, T, I), np.float32), rng.standard_normal((B, T, H), np.float32)


def make_jbptt(kind: str, impl: str, T: int, B: int, I: int, H: int):
    """A ``run()`` that performs one jbptt training step (bptt estimator + make_train_step + Adam)."""
    name, _, unroll = impl.partition(":")
    cell = getattr(cells, kind)(H) if FUSED[name] is None else getattr(fused, kind)(H, method=FUSED[name])
    params = cell.init(jax.random.key(0), I)
    est = jbptt.make_estimator("bptt", cell, losses.mse, unroll_steps=int(unroll or 1))
    opt = optax.adam(1e-3)
    state = jbptt.train.init_train_state(est, opt, params, cell.initial_carry(params, (B,)))
    step = jax.jit(jbptt.train.make_train_step(est, opt))
    xs, ys = data(T, B, I, H)
    batch = jbptt.Batch(jnp.asarray(xs), jnp.asarray(ys))
    box = [state]

    def run():
        box[0], metrics = step(box[0], batch)
        jax.block_until_ready(metrics["loss"])

    return run


def make_flax(kind: str, T: int, B: int, I: int, H: int):
    """One training step of ``flax.linen.RNN`` with the matching Flax cell."""
    import flax.linen as nn

    cell = nn.LSTMCell(H) if kind == "lstm" else nn.GRUCell(H)
    model = nn.RNN(cell)
    xs, ys = data(T, B, I, H)
    xs, ys = jnp.asarray(xs), jnp.asarray(ys)
    params = model.init(jax.random.key(0), xs)
    opt = optax.adam(1e-3)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(losses.mse(model.apply(p, xs), ys)))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    box = [params, opt.init(params)]

    def run():
        box[0], box[1], loss = step(box[0], box[1])
        jax.block_until_ready(loss)

    return run


def make_torch(kind: str, T: int, B: int, I: int, H: int):
    """One training step of ``torch.nn.LSTM`` / ``torch.nn.GRU`` (``batch_first``), or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    model = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(I, H, batch_first=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xs, ys = (torch.from_numpy(a) for a in data(T, B, I, H))

    def run():
        opt.zero_grad(set_to_none=True)
        out, _ = model(xs)
        loss = torch.mean(torch.mean((out - ys) ** 2, dim=-1))
        loss.backward()
        opt.step()

    return run


def bench_shape(kind: str, T: int, B: int, I: int, H: int, impls, reps: int, warmup: int) -> dict:
    """Times every implementation at one shape, alternating them within each repetition; returns medians."""
    runs = {}
    for impl in impls:
        if impl == "flax":
            runs[impl] = make_flax(kind, T, B, I, H)
        elif impl == "torch":
            run = make_torch(kind, T, B, I, H)
            if run is not None:
                runs[impl] = run
        else:
            runs[impl] = make_jbptt(kind, impl, T, B, I, H)
    for run in runs.values():  # compile + warm-up
        for _ in range(warmup):
            run()
    times = {impl: [] for impl in runs}
    cpu = {impl: [] for impl in runs}
    names = list(runs)
    for r in range(reps):
        for impl in names[r % len(names):] + names[: r % len(names)]:  # rotate the order every repetition
            t0, c0 = time.perf_counter(), time.process_time()
            runs[impl]()
            times[impl].append(time.perf_counter() - t0)
            cpu[impl].append(time.process_time() - c0)
    flops = step_flops(kind, T, B, I, H)
    med = {impl: statistics.median(ts) for impl, ts in times.items()}
    return {"cell": kind, "T": T, "B": B, "I": I, "H": H, "gflop": flops / 1e9,
            "median_ms": {k: 1e3 * v for k, v in med.items()},
            # CPU time of this process (all its threads): the work done, much less sensitive than wall-clock
            # time to other processes on a shared machine (but it counts spinning thread pools as work).
            "median_cpu_ms": {k: 1e3 * statistics.median(v) for k, v in cpu.items()},
            "gflops_per_s": {k: flops / v / 1e9 for k, v in med.items()},
            "speedup_of_fast": ({k: med[k] / med["fast"] for k in med} if "fast" in med else {}),
            "reps": reps}


def print_table(rows, rate: float):
    impls = []
    for row in rows:
        impls += [k for k in row["median_ms"] if k not in impls]
    head = f"{'cell':5} {'T':>4} {'H':>5} " + " ".join(f"{k + ' ms':>10}" for k in impls)
    head += "  " + " ".join(f"{'x' + k:>8}" for k in impls if k != "fast") + f"  {'fast GF/s':>9}"
    print(head)
    for row in rows:
        ms = row["median_ms"]
        line = f"{row['cell']:5} {row['T']:>4} {row['H']:>5} "
        line += " ".join(f"{ms[k]:>10.2f}" if k in ms else f"{'-':>10}" for k in impls)
        sp = row["speedup_of_fast"]
        line += "  " + " ".join(f"{sp[k]:>8.2f}" if k in sp else f"{'-':>8}" for k in impls if k != "fast")
        if "fast" in row["gflops_per_s"]:
            line += f"  {row['gflops_per_s']['fast']:>9.1f}"
        print(line, flush=True)
    print(f"x<impl> = time(impl) / time(fast): > 1 means jbptt's fast path is faster. "
          f"Large-matmul rate: {rate:.1f} GFLOP/s.")


def write_json(path: str, obj) -> None:
    """Writes ``obj`` as JSON atomically (:func:`jbptt.checkpoint.atomic_write`)."""
    atomic_write(path, json.dumps(obj, indent=1))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="lstm,gru", help="comma list of lstm, gru")
    ap.add_argument("--impls", default="fast,plain,flax,torch", help=f"comma list from {ALL_IMPLS}")
    ap.add_argument("--H", default="64,256,1024", help="grid hidden sizes")
    ap.add_argument("--T", default="32,128,512", help="grid sequence lengths")
    ap.add_argument("--B", type=int, default=32)
    ap.add_argument("--I", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions per implementation (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="only the issue's shape T=128, H=256")
    ap.add_argument("--json", default=None, help="write the results here (atomically)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="rank by the process's CPU time instead of wall-clock time (for a shared machine; run "
                         "single-threaded, e.g. taskset -c 0 with OMP_NUM_THREADS=1)")
    args = ap.parse_args(argv)
    impls = [s for s in args.impls.split(",") if s]
    bad = [s for s in impls if s.partition(":")[0] not in ALL_IMPLS or (":" in s and (
        s.partition(":")[0] in ("flax", "torch") or not s.partition(":")[2].isdigit()))]
    if bad:
        ap.error(f"unknown implementation(s) {bad}; choose from {ALL_IMPLS}")
    kinds = [s for s in args.cells.split(",") if s]
    if any(k not in ("lstm", "gru") for k in kinds):
        ap.error(f"--cells must name lstm and/or gru, got {kinds}")
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    return args, kinds, impls


def main(argv=None):
    args, kinds, impls = parse_args(argv)
    shapes = [(128, 256)] if args.quick else [(T, H) for H in map(int, args.H.split(",")) for T in
                                              map(int, args.T.split(","))]
    rate = matmul_rate(clock=time.process_time if args.cpu_time else time.perf_counter)
    print(f"jax {jax.__version__} on {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; "
          f"large-matmul rate {rate:.1f} GFLOP/s", flush=True)
    rows = []
    for kind in kinds:
        for T, H in shapes:
            row = bench_shape(kind, T, args.B, args.I, H, impls, args.reps, args.warmup)
            if args.cpu_time:  # report CPU time in the table and ratios
                row["wall_ms"], row["median_ms"] = row["median_ms"], row["median_cpu_ms"]
                ms = row["median_ms"]
                row["gflops_per_s"] = {k: row["gflop"] / v * 1e3 for k, v in ms.items()}
                row["speedup_of_fast"] = {k: ms[k] / ms["fast"] for k in ms} if "fast" in ms else {}
            rows.append(row)
            print(f"  {kind} T={T} H={H}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in row["median_ms"].items()),
                  flush=True)
    print_table(rows, rate)
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpu_count": os.cpu_count(), "jax": jax.__version__, "torch": torch_version},
              "matmul_gflops_per_s": rate, "rows": rows}
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
