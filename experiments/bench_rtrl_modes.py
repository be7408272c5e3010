"""Exact RTRL: forward-mode jvp over parameter directions vs Jacobian products (the default), against BPTT.

Usage: python experiments/bench_rtrl_modes.py [--json OUT.json] [--repeats 5] [--sizes 16 32 64]
Prints, for a dense Elman cell with a readout (B=4, T=16, I=4, float32), the median wall time per update and the
XLA temp memory of rtrl(mode="jacobian"), rtrl(mode="jvp") and bptt, and the ratios jvp / jacobian, measured in
one run (interleaved per size).
"""

import argparse
import json

import jax.numpy as jnp

from jbptt.cells import elman, with_readout
from jbptt.experiment.compare import EstimatorSpec, measure_point

SPECS = [EstimatorSpec("rtrl", "jacobian", {"mode": "jacobian"}), EstimatorSpec("rtrl", "jvp", {"mode": "jvp"}),
         EstimatorSpec("bptt", "bptt")]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64])
    args = p.parse_args()
    results = {}
    for n in args.sizes:
        cell = with_readout(elman(n, dtype=jnp.float32), 2)
        row = {s.label: measure_point(cell, s, B=4, T=16, input_size=4, dtype=jnp.float32, repeats=args.repeats)
               for s in SPECS}
        row["time_ratio_jvp_over_jacobian"] = row["jvp"]["time_s"] / row["jacobian"]["time_s"]
        row["memory_ratio_jvp_over_jacobian"] = row["jvp"]["temp_bytes"] / row["jacobian"]["temp_bytes"]
        row["time_ratio_jacobian_over_bptt"] = row["jacobian"]["time_s"] / row["bptt"]["time_s"]
        results[n] = row
        print(f"n={n}: jacobian {row['jacobian']['time_s'] * 1e3:.2f} ms {row['jacobian']['temp_bytes']:,} B | "
              f"jvp {row['jvp']['time_s'] * 1e3:.2f} ms {row['jvp']['temp_bytes']:,} B | "
              f"bptt {row['bptt']['time_s'] * 1e3:.2f} ms | jvp/jacobian: time "
              f"x{row['time_ratio_jvp_over_jacobian']:.1f}, memory x{row['memory_ratio_jvp_over_jacobian']:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
