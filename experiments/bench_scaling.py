"""Data-parallel scaling: training steps per second on 1, 2, 4, 8 devices, strong and weak scaling.

    python experiments/bench_scaling.py --json OUT.json                     # every device count that exists
    python experiments/bench_scaling.py --devices 8 --json OUT.json         # on CPU: force 8 host devices
    python experiments/bench_scaling.py --modes sharded --hidden 512 --T 128 --batch 256 --per-device-batch 64

* strong scaling: a fixed global batch (``--batch``) split over n devices; ideal speed-up ``n``.
* weak scaling: a fixed batch per device (``--per-device-batch``), global batch ``n * b``; ideal steps/s constant,
  so the reported efficiency ``steps/s(n) / steps/s(1)`` is ideally 1.
* mode ``none`` (plain ``jit`` on one device) runs at n = 1 as the baseline of the wrappers' overhead.

Each configuration is compiled and warmed up, then ``--steps`` steps are timed ``--repeats`` times (blocking on
the result); the median is reported, with ratios to the 1-device run of the same mode measured in the same run.
On CPU the forced host devices share the machine's cores, so this is a correctness smoke test there and no
speed-up is expected; on a multi-GPU machine it is the real measurement. With a single GPU only n = 1 runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=None,
                        help="largest device count to use (on CPU this many host devices are created; default: "
                             "8 on CPU, every device otherwise)")
    parser.add_argument("--counts", default="1,2,4,8", help="device counts to try (those <= --devices)")
    parser.add_argument("--modes", default="none,pmap,sharded", help="'none' runs at n = 1 only (baseline)")
    parser.add_argument("--scaling", default="strong,weak")
    parser.add_argument("--estimator", default="bptt")
    parser.add_argument("--cell", default="lstm", choices=["lstm", "gru", "elman"])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--T", type=int, default=32)
    parser.add_argument("--input-size", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64, help="global batch for strong scaling")
    parser.add_argument("--per-device-batch", type=int, default=16, help="batch per device for weak scaling")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the results here (atomically)")
    return parser.parse_args(argv)


def setup_devices(args):
    """Forces ``--devices`` CPU devices when JAX will run on the CPU; must run before JAX starts."""
    import jax

    platforms = os.environ.get("JAX_PLATFORMS", "")
    if args.devices is not None or platforms in ("", "cpu"):
        jax.config.update("jax_num_cpu_devices", args.devices or 8)
    return jax


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    jax = setup_devices(args)
    import numpy as np
    import optax

    import jbptt
    from jbptt import cells, fused, losses, parallel
    from jbptt.checkpoint import atomic_write

    devices = jax.devices()
    limit = min(len(devices), args.devices or len(devices))
    counts = [n for n in (int(c) for c in args.counts.split(",")) if n <= limit]
    modes = args.modes.split(",")
    scalings = args.scaling.split(",")
    cell = cells.with_readout(fused.cell(args.cell, args.hidden), 1)  # with its fused path, as the runner builds it
    params = cell.init(jax.random.key(0), args.input_size)
    estimator = jbptt.make_estimator(args.estimator, cell, losses.mse)
    optimizer = optax.adam(1e-3)

    def batch_of(B, seed=0):
        rng = np.random.default_rng(seed)
        return jbptt.Batch(rng.normal(size=(B, args.T, args.input_size)).astype(np.float32),
                           rng.normal(size=(B, args.T, 1)).astype(np.float32))

    def measure(mode, n, B):
        carry, batch = cell.initial_carry(params, (B,)), batch_of(B)
        dp = parallel.data_parallel(estimator, optimizer, params, carry, mode=mode, devices=n, inputs=batch.inputs,
                                    donate=True)
        state = dp.init(params, carry, key=jax.random.key(0), inputs=batch.inputs)
        t0 = time.perf_counter()
        state, m = dp.step(state, batch)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        state, m = dp.step(state, batch)  # warm-up
        jax.block_until_ready(m)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state, m = dp.step(state, batch)
            jax.block_until_ready((state, m))
            times.append(time.perf_counter() - t0)
        sps = args.steps / statistics.median(times)
        loss = float(m["loss"])
        return {"mode": mode, "devices": n, "batch": B, "steps_per_s": sps, "examples_per_s": sps * B,
                "first_step_s": compile_s, "loss": loss, "finite": bool(np.isfinite(loss))}

    rows = []
    for scaling in scalings:
        for mode in modes:
            for n in counts:
                if mode == "none" and n != 1:  # the plain single-device jit step: a baseline for n = 1
                    continue
                B = args.batch if scaling == "strong" else args.per_device_batch * n
                if B % n:
                    print(f"skip {scaling} {mode} n={n}: batch {B} does not divide by {n}", file=sys.stderr)
                    continue
                r = measure(mode, n, B)
                r["scaling"] = scaling
                rows.append(r)
                print(f"{scaling:6s} {mode:8s} n={n} B={B:5d}  {r['steps_per_s']:9.2f} steps/s", file=sys.stderr)
    for r in rows:
        base = next(b for b in rows if b["scaling"] == r["scaling"] and b["mode"] == r["mode"]
                    and b["devices"] == counts[0])
        r["ratio_vs_1"] = r["steps_per_s"] / base["steps_per_s"]  # strong: speed-up; weak: efficiency
        none = [b for b in rows if b["scaling"] == r["scaling"] and b["mode"] == "none"]
        if none:  # against the plain single-device step (the overhead of the wrapper at n = 1)
            r["ratio_vs_none"] = r["steps_per_s"] / none[0]["steps_per_s"]

    print(table(rows, counts))
    result = {"benchmark": "bench_scaling", "platform": devices[0].platform, "device_kind": devices[0].device_kind,
              "available_devices": len(devices), "counts": counts, "jax": jax.__version__,
              "host": platform.platform(), "cpu_count": os.cpu_count(), "args": vars(args), "rows": rows,
              "note": ("forced CPU host devices share the machine's cores: no speed-up is expected, this is a "
                       "smoke test") if devices[0].platform == "cpu" else ""}
    if args.json:
        atomic_write(args.json, json.dumps(result, indent=2))
    return result


def table(rows, counts) -> str:
    """A markdown table: steps/s and the ratio to one device, per scaling and mode."""
    lines = ["| scaling | mode | " + " | ".join(f"n={n}" for n in counts) + " |",
             "| --- | --- | " + " | ".join("---" for _ in counts) + " |"]
    for scaling in dict.fromkeys(r["scaling"] for r in rows):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            cells = []
            for n in counts:
                r = next((r for r in rows if (r["scaling"], r["mode"], r["devices"]) == (scaling, mode, n)), None)
                cells.append("-" if r is None else f"{r['steps_per_s']:.1f} steps/s (x{r['ratio_vs_1']:.2f})")
            lines.append(f"| {scaling} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
