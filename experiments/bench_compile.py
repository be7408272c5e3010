"""Compile time of a BPTT gradient against sequence length: it must not grow with T (no Python loop over time).

Usage: python experiments/bench_compile.py [--json OUT.json] [--repeats 3]
Prints, for T in {100, 10000}, the median lowering+compilation time of the jitted BPTT update of an LSTM
(B=16, I=8, H=64) and the ratio T=10000 / T=100.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

import jbptt
from jbptt import cells, losses


def compile_once(T: int) -> float:
    """Seconds to lower and compile the jitted BPTT update of an LSTM for sequences of length T."""
    cell = cells.with_readout(cells.lstm(64), 1)
    params = cell.init(jax.random.key(0), 8)
    est = jbptt.estimators.bptt.bptt(cell, losses.mse)
    batch = jbptt.Batch(jnp.zeros((16, T, 8)), jnp.zeros((16, T, 1)))
    # a fresh function object each time so nothing is served from the compilation cache
    update = jax.jit(lambda p, s, b: est.update(p, s, b))
    t0 = time.perf_counter()
    update.lower(params, est.init(params, None), batch).compile()
    return time.perf_counter() - t0


def compile_seconds(lengths, repeats: int) -> dict:
    """Median compile time per T, with the lengths interleaved in every repeat (the machine is noisy)."""
    times = {T: [] for T in lengths}
    for _ in range(repeats):
        for T in lengths:
            times[T].append(compile_once(T))
    return {T: statistics.median(ts) for T, ts in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results as JSON to this path")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = compile_seconds((100, 10_000), args.repeats)
    for T, s in results.items():
        print(f"T={T:>6}: compile {s:.3f} s (median of {args.repeats})")
    ratio = results[10_000] / results[100]
    print(f"ratio T=10000 / T=100: {ratio:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"compile_seconds": {str(k): v for k, v in results.items()}, "ratio": ratio}, f, indent=2)


if __name__ == "__main__":
    main()
