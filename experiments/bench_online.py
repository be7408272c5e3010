"""Per-update time and peak memory of every online estimator, beside a naive exact RTRL written plainly here.

Usage::

    python experiments/bench_online.py --case target [--json OUT.json]   # exact RTRL, Elman n=256 + readout 256
    python experiments/bench_online.py --case sparse                      # SnAp-2 vs exact RTRL, sparse Elman
    python experiments/bench_online.py --case sweep                       # every estimator against n and T
    python experiments/bench_online.py --quick                            # tiny sizes (the test runs this)

For each point the script measures, in one run (so every gain is a ratio of two numbers taken side by side):

- ``time_s``: the median wall time of ``repeats`` calls of the compiled ``update`` (one warm-up call after the
  compile is not counted, unless it took over 10 s); ``cpu_s``: the median process CPU time of the same calls
  (all threads; on a machine shared with other processes it is the steadier measure of the work done);
- ``temp_bytes``: XLA's temp buffers of the compiled update
  (``jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes``) and ``state_bytes``, the bytes of
  the estimator state passed in (the influence or its approximation lives there); ``peak_bytes`` is their sum.

The naive reference (:func:`naive_rtrl`) is exact RTRL as a textbook writes it: the flat vector of *all*
parameters (readout included), ``jax.jacfwd`` of the step with respect to it and the carry at every step, the full
influence ``J [n, P]`` advanced as ``J <- (ds'/ds) J + ds'/dtheta``, a ``lax.scan`` over ``T`` and ``vmap`` over the
batch. ``jacfwd`` pushes one tangent per parameter through the step, so its tangent basis alone is ``P x P``: where
that exceeds ``--naive-max-bytes`` the naive point is reported as skipped (with the size it would need) instead of
exhausting the machine's memory. The target case (n=256, readout 256: P = 132,608, a 66 GiB basis in float32) is
then measured again at n=64 (readout 64), where the naive RTRL fits, so that its gain over the naive one is still
measured.

``rtrl_nosplit`` is ``rtrl(split=False)`` (the influence over every parameter, readout included: the behaviour
before the state/output parameter split). Where the installed ``rtrl`` has no ``split`` option the script says so and
``rtrl`` itself *is* that behaviour.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import jbptt.estimators  # noqa: F401  (importing it registers every estimator)
from jbptt import losses
from jbptt.batch import Batch
from jbptt.cells import elman, sparse_elman, with_readout
from jbptt.estimator import make_estimator

LONG_CALL_S = 10.0
"""Seconds above which the warm-up call is kept as the first timed repeat."""

ESTIMATORS = ("bptt", "rtrl", "rtrl_nosplit", "snap1", "snap2", "uoro", "kfrtrl", "eprop", "rflo")
"""Labels measured by the sweep; ``rtrl_nosplit`` is ``rtrl(split=False)``."""


# ----------------------------------------------------------------------------------------------------------------
# The naive reference.


def naive_rtrl(cell, loss_fn):
    """Exact RTRL written plainly: ``jacfwd`` of the step over the full flat parameter vector, influence ``[n, P]``.

    Args:
      cell: any :class:`~jbptt.cells.Cell` (its carry is raveled to ``[n]``, its params to ``[P]``, all of them).
      loss_fn: per-step loss ``loss_fn(y [O], target [O]) -> scalar``.

    Returns:
      ``grad(params, inputs [B, T, I], targets [B, T, O]) -> (loss, grads)``: the mean per-step loss over ``B * T``
      steps and its exact gradient shaped like ``params``. Safe under ``jit``; memory ``O(B n P + P^2)`` (the
      ``jacfwd`` basis), time ``O(T B P (P + n^2))``.
    """

    def grad(params, inputs, targets):
        theta, unravel = ravel_pytree(params)
        s0, unravel_carry = ravel_pytree(cell.initial_carry(params, ()))

        def step(th, s, x):
            carry, y = cell.step(unravel(th), unravel_carry(s), x)
            return ravel_pytree(carry)[0].astype(s.dtype), y

        def carry0(th):
            return ravel_pytree(cell.initial_carry(unravel(th), ()))[0]

        def one_example(xs, ts):
            def body(acc, inp):
                s, J, g, total = acc
                x, target = inp
                s_new, y = step(theta, s, x)
                (ds_dth, ds_ds), (dy_dth, dy_ds) = jax.jacfwd(step, argnums=(0, 1))(theta, s, x)
                loss, dl_dy = jax.value_and_grad(loss_fn)(y, target)
                g = g + dl_dy @ (dy_dth + dy_ds @ J)          # [P]: through the output now and the carry before
                J = ds_ds @ J + ds_dth                         # [n, P]
                return (s_new, J, g, total + loss.astype(total.dtype)), None

            J0 = jax.jacfwd(carry0)(theta)                    # [n, P], zero unless the initial carry is learned
            acc0 = (s0, J0, jnp.zeros_like(theta), jnp.zeros((), theta.dtype))
            (_, _, g, total), _ = jax.lax.scan(body, acc0, (xs, ts))
            return total, g

        totals, gs = jax.vmap(one_example)(inputs, targets)
        count = inputs.shape[0] * inputs.shape[1]
        return jnp.sum(totals) / count, unravel(jnp.sum(gs, axis=0) / count)

    return grad


def naive_basis_bytes(cell, params) -> int:
    """Bytes of the ``jacfwd`` tangent basis of :func:`naive_rtrl`'s step: ``(P + n)^2 * itemsize``."""
    theta, _ = ravel_pytree(params)
    n = ravel_pytree(cell.initial_carry(params, ()))[0].shape[0]
    return int((theta.shape[0] + n) ** 2 * theta.dtype.itemsize)


# ----------------------------------------------------------------------------------------------------------------
# Measuring.


def split_supported() -> bool:
    """Whether the installed ``rtrl`` accepts ``split=`` (the state/output parameter split)."""
    try:
        make_estimator("rtrl", elman(2), losses.mse, split=False)
    except TypeError:
        return False
    return True


def estimator_spec(label: str, split_ok: bool):
    """``(registered name, options)`` of a label of :data:`ESTIMATORS` (``None`` if it cannot be built here)."""
    if label == "rtrl_nosplit":
        return ("rtrl", {"split": False}) if split_ok else None
    if label == "rflo":
        return "rflo", {"feedback": "random"}
    return label, {}


def tree_bytes(tree) -> int:
    """Bytes of the array leaves of ``tree`` (PRNG keys count their key data)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        total += int(np.prod(np.shape(leaf))) * np.dtype(leaf.dtype).itemsize
    return total


def _timed(compiled, args, repeats: int) -> tuple[float, list[float], float]:
    """One warm-up call, then ``repeats`` timed calls (each of enough calls to last >= ~20 ms). A warm-up call
    longer than :data:`LONG_CALL_S` counts as the first repeat (exact RTRL at n=256 takes minutes a call).

    Returns:
      ``(median wall seconds, every repeat's wall seconds, median process CPU seconds)`` per call. The CPU time (all
      threads of this process) is less sensitive than the wall time to other processes sharing the machine.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(compiled(*args))
    first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
    calls = int(min(100, max(1, math.ceil(0.02 / max(first, 1e-6)))))
    times, cpu = [], []
    if first > LONG_CALL_S:  # nothing is compiled in it (``compiled`` is): it counts as the first repeat
        times, cpu = [first], [first_cpu]
    for _ in range(repeats - len(times)):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(calls):
            out = compiled(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls)
        cpu.append((time.process_time() - c0) / calls)
    return statistics.median(times), times, statistics.median(cpu)


def _compile(fn, args) -> tuple[object, int | None, float]:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    temp = int(mem.temp_size_in_bytes) if mem is not None else None
    return compiled, temp, time.perf_counter() - t0


def _problem(cell, *, B: int, T: int, input_size: int, dtype, seed: int):
    params = cell.init(jax.random.key(seed), input_size)
    kx, ky = jax.random.split(jax.random.key(seed + 1))
    batch = Batch(jax.random.normal(kx, (B, T, input_size), dtype),
                  jax.random.normal(ky, (B, T, cell.output_size), dtype))
    return params, batch


def _record(timing, temp, state, compile_s, T):
    time_s, times, cpu_s = timing
    return {"time_s": time_s, "time_per_step_s": time_s / T, "times_s": times, "cpu_s": cpu_s, "temp_bytes": temp,
            "state_bytes": state, "peak_bytes": None if temp is None else temp + state, "compile_s": compile_s}


def measure_estimator(cell, name: str, options: dict, *, B: int, T: int, input_size: int, dtype, repeats: int,
                      seed: int = 0) -> dict:
    """Time and memory of one compiled ``update`` of ``make_estimator(name, cell, mse, **options)``.

    Returns:
      ``{"time_s", "time_per_step_s", "times_s", "cpu_s", "temp_bytes", "state_bytes", "peak_bytes",
      "compile_s"}`` or
      ``{"skipped": reason}`` where the estimator refuses the cell or the size (its ``init`` raises ValueError).
    """
    est = make_estimator(name, cell, losses.mse, **options)
    params, batch = _problem(cell, B=B, T=T, input_size=input_size, dtype=dtype, seed=seed)
    try:
        state = est.init(params, cell.initial_carry(params, (B,)), key=jax.random.key(seed + 2), inputs=batch.inputs)
    except ValueError as e:
        return {"skipped": str(e)}
    args = (params, state, batch)
    compiled, temp, compile_s = _compile(est.update, args)
    return _record(_timed(compiled, args, repeats), temp, tree_bytes(state), compile_s, T)


def measure_naive(cell, *, B: int, T: int, input_size: int, dtype, repeats: int, seed: int = 0,
                  max_bytes: int | None = 2 << 30) -> dict:
    """Time and memory of the compiled :func:`naive_rtrl` gradient (``state_bytes``: its influence ``B n P``), or
    ``{"skipped": reason, "basis_bytes": ...}`` where the ``jacfwd`` basis exceeds ``max_bytes``."""
    params, batch = _problem(cell, B=B, T=T, input_size=input_size, dtype=dtype, seed=seed)
    basis = naive_basis_bytes(cell, params)
    if max_bytes is not None and basis > max_bytes:
        return {"skipped": f"jacfwd basis (P+n)^2 needs {basis / 2**30:.1f} GiB > --naive-max-bytes "
                           f"{max_bytes / 2**30:.1f} GiB", "basis_bytes": basis}
    theta = ravel_pytree(params)[0]
    n = ravel_pytree(cell.initial_carry(params, ()))[0].shape[0]
    args = (params, batch.inputs, batch.targets)
    compiled, temp, compile_s = _compile(naive_rtrl(cell, losses.mse), args)
    out = _record(_timed(compiled, args, repeats), temp, B * n * theta.shape[0] * theta.dtype.itemsize, compile_s, T)
    out["basis_bytes"] = basis
    return out


# ----------------------------------------------------------------------------------------------------------------
# Cases.


@dataclass
class Sizes:
    """The sizes of every case (``quick()`` shrinks them for the test)."""

    target_n: int = 256
    target_out: int = 256
    target_T: int = 50
    target_repeats: int = 3
    target_small_n: int = 64
    sparse_n: int = 128
    sparse_density: float = 0.1
    sparse_T: int = 50
    sparse_repeats: int = 3
    sweep_n: list = field(default_factory=lambda: [16, 32, 64, 128])
    sweep_T: list = field(default_factory=lambda: [16, 64, 256])
    sweep_fixed_n: int = 32
    sweep_fixed_T: int = 16
    sweep_B: int = 2
    sweep_repeats: int = 5
    input_size: int = 4

    @classmethod
    def quick(cls) -> Sizes:
        return cls(target_n=6, target_out=5, target_T=4, target_repeats=1, target_small_n=4, sparse_n=12,
                   sparse_density=0.2, sparse_T=4, sparse_repeats=1, sweep_n=[3], sweep_T=[2], sweep_fixed_n=4,
                   sweep_fixed_T=3, sweep_B=2, sweep_repeats=1, input_size=2)


def _ratio(a: dict, b: dict, key: str):
    """``a[key] / b[key]`` (``None`` where either is missing or skipped)."""
    x, y = a.get(key), b.get(key)
    return None if x is None or y is None or y == 0 else x / y


def _target_at(n: int, out: int, sz: Sizes, dtype, split_ok: bool, naive_max: int | None, log, tag: str) -> dict:
    cell = with_readout(elman(n, dtype=dtype), out)
    kw = dict(B=1, T=sz.target_T, input_size=sz.input_size, dtype=dtype, repeats=sz.target_repeats)
    res = {"n": n, "output_size": out, "T": sz.target_T, "B": 1, "points": {}}
    pts = res["points"]
    for label in ("rtrl", "rtrl_nosplit"):
        spec = estimator_spec(label, split_ok)
        pts[label] = {"skipped": "rtrl has no split= option yet: rtrl is the unsplit (before) behaviour"} \
            if spec is None else measure_estimator(cell, *spec, **kw)
        log(f"  {tag} {label}: {_fmt(pts[label])}")
    pts["naive"] = measure_naive(cell, max_bytes=naive_max, **kw)
    log(f"  {tag} naive: {_fmt(pts['naive'])}")
    before = pts["rtrl"] if "skipped" in pts["rtrl_nosplit"] else pts["rtrl_nosplit"]
    res["ratios"] = {
        "time_nosplit_over_rtrl": _ratio(before, pts["rtrl"], "time_s"),
        "cpu_time_nosplit_over_rtrl": _ratio(before, pts["rtrl"], "cpu_s"),
        "peak_memory_nosplit_over_rtrl": _ratio(before, pts["rtrl"], "peak_bytes"),
        "temp_memory_nosplit_over_rtrl": _ratio(before, pts["rtrl"], "temp_bytes"),
        "time_naive_over_rtrl": _ratio(pts["naive"], pts["rtrl"], "time_s"),
        "cpu_time_naive_over_rtrl": _ratio(pts["naive"], pts["rtrl"], "cpu_s"),
        "peak_memory_naive_over_rtrl": _ratio(pts["naive"], pts["rtrl"], "peak_bytes"),
    }
    res["targets"] = {"time_nosplit_over_rtrl": 1.4, "peak_memory_nosplit_over_rtrl": 1.4,
                      "time_naive_over_rtrl": 5.0}
    return res


def case_target(sz: Sizes, dtype, split_ok: bool, naive_max: int | None, log=print) -> dict:
    """Exact RTRL on ``with_readout(elman(n), O)``, B=1: rtrl (split), rtrl(split=False) and the naive one.

    Where the naive RTRL does not fit at ``n`` (its ``jacfwd`` basis is ``(P + n)^2``), the three are measured
    again at ``target_small_n`` (readout of the same width) and that result is kept under ``"small"``, so the gain
    over the naive RTRL is still a ratio measured in this run."""
    res = _target_at(sz.target_n, sz.target_out, sz, dtype, split_ok, naive_max, log, "target")
    if "skipped" in res["points"]["naive"] and sz.target_small_n:
        res["small"] = _target_at(sz.target_small_n, sz.target_small_n, sz, dtype, split_ok, naive_max, log,
                                  f"target(n={sz.target_small_n})")
    return res


def case_sparse(sz: Sizes, dtype, naive_max: int | None, log=print) -> dict:
    """SnAp-2 against exact RTRL (and SnAp-1, BPTT) on ``with_readout(sparse_elman(n, density), 1)``, B=1."""
    cell = with_readout(sparse_elman(sz.sparse_n, density=sz.sparse_density, dtype=dtype), 1)
    kw = dict(B=1, T=sz.sparse_T, input_size=sz.input_size, dtype=dtype, repeats=sz.sparse_repeats)
    res = {"n": sz.sparse_n, "density": sz.sparse_density, "T": sz.sparse_T, "B": 1, "points": {}}
    pts = res["points"]
    for label in ("snap2", "rtrl", "snap1", "bptt"):
        pts[label] = measure_estimator(cell, *estimator_spec(label, False), **kw)
        log(f"  sparse {label}: {_fmt(pts[label])}")
    pts["naive"] = measure_naive(cell, max_bytes=naive_max, **kw)
    log(f"  sparse naive: {_fmt(pts['naive'])}")
    res["ratios"] = {
        "time_rtrl_over_snap2": _ratio(pts["rtrl"], pts["snap2"], "time_s"),
        "cpu_time_rtrl_over_snap2": _ratio(pts["rtrl"], pts["snap2"], "cpu_s"),
        "peak_memory_rtrl_over_snap2": _ratio(pts["rtrl"], pts["snap2"], "peak_bytes"),
        "temp_memory_rtrl_over_snap2": _ratio(pts["rtrl"], pts["snap2"], "temp_bytes"),
        "state_memory_rtrl_over_snap2": _ratio(pts["rtrl"], pts["snap2"], "state_bytes"),
        "time_naive_over_rtrl": _ratio(pts["naive"], pts["rtrl"], "time_s"),
    }
    res["targets"] = {"time_rtrl_over_snap2": 5.0, "peak_memory_rtrl_over_snap2": 5.0}
    return res


def case_sweep(sz: Sizes, dtype, split_ok: bool, naive_max: int | None, log=print, labels=ESTIMATORS) -> dict:
    """The estimators ``labels`` (of :data:`ESTIMATORS`) and the naive RTRL against ``n`` (T fixed) and ``T`` (n
    fixed), on ``with_readout(elman(n), 2)``; each point's ratios are to the naive RTRL measured at the same point."""
    out = {}
    for vary, values in (("n", sz.sweep_n), ("T", sz.sweep_T)):
        rows = []
        for v in values:
            n, T = (v, sz.sweep_fixed_T) if vary == "n" else (sz.sweep_fixed_n, v)
            cell = with_readout(elman(n, dtype=dtype), 2)
            kw = dict(B=sz.sweep_B, T=T, input_size=sz.input_size, dtype=dtype, repeats=sz.sweep_repeats)
            pts = {"naive": measure_naive(cell, max_bytes=naive_max, **kw)}
            for label in labels:
                spec = estimator_spec(label, split_ok)
                pts[label] = {"skipped": "rtrl has no split= option yet"} if spec is None else \
                    measure_estimator(cell, *spec, **kw)
            ratios = {label: {"time_naive_over": _ratio(pts["naive"], p, "time_s"),
                              "peak_memory_naive_over": _ratio(pts["naive"], p, "peak_bytes")}
                      for label, p in pts.items() if label != "naive"}
            rows.append({"value": v, "n": n, "T": T, "B": sz.sweep_B, "points": pts, "ratios": ratios})
            log(f"  sweep {vary}={v}: " + ", ".join(f"{k} {_fmt(p, short=True)}" for k, p in pts.items()))
        out[vary] = rows
    return out


# ----------------------------------------------------------------------------------------------------------------
# Output.


def _fmt(p: dict, short: bool = False) -> str:
    if "skipped" in p:
        return "skipped" if short else f"skipped ({p['skipped']})"
    t = f"{p['time_s'] * 1e3:.3g} ms"
    return t if short else f"{t}, temp {p['temp_bytes'] / 2**20:.3g} MiB + state {p['state_bytes'] / 2**20:.3g} MiB"


def _x(r) -> str:
    return "-" if r is None else f"{r:.2f}x"


def table(report: dict) -> str:
    """Markdown tables of the measured points and ratios in ``report``."""
    lines = []
    target = report.get("target") or {}
    for case, res in [("target", target.get("points") and target), ("target (small: the naive RTRL fits)",
                                                                     target.get("small")),
                      ("sparse", report.get("sparse"))]:
        if not res:
            continue
        lines += [f"### {case}: " + ", ".join(f"{k}={res[k]}" for k in res if k not in ("points", "ratios",
                                                                                           "targets", "small")), "",
                  "| estimator | time / update (wall) | CPU time / update | temp memory | state memory | "
                  "peak (temp + state) |", "|---|---|---|---|---|---|"]
        for label, p in res["points"].items():
            if "skipped" in p:
                lines.append(f"| {label} | skipped: {p['skipped']} | | | | |")
            else:
                lines.append(f"| {label} | {p['time_s']:.4g} s | {p['cpu_s']:.4g} s | "
                             f"{p['temp_bytes'] / 2**20:.4g} MiB | {p['state_bytes'] / 2**20:.4g} MiB | "
                             f"{p['peak_bytes'] / 2**20:.4g} MiB |")
        lines += ["", "| ratio | measured | target |", "|---|---|---|"]
        for k, r in res["ratios"].items():
            tgt = res["targets"].get(k)
            lines.append(f"| {k} | {_x(r)} | {'' if tgt is None else f'>= {tgt}x'} |")
        lines.append("")
    if "sweep" in report:
        for vary, rows in report["sweep"].items():
            labels = [k for k in rows[0]["points"]]
            lines += [f"### sweep over {vary} (time / update, ms; in brackets: naive time / this time)", "",
                      f"| {vary} | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
            for row in rows:
                cells = []
                for lab in labels:
                    p = row["points"][lab]
                    r = row["ratios"].get(lab, {}).get("time_naive_over")
                    cells.append("-" if "skipped" in p else f"{p['time_s'] * 1e3:.3g}" + (
                        f" ({r:.1f}x)" if r is not None else ""))
                lines.append(f"| {row['value']} | " + " | ".join(cells) + " |")
            lines += ["", f"peak memory (temp + state, KiB) over {vary}:", "",
                      f"| {vary} | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
            for row in rows:
                cells = ["-" if "skipped" in row["points"][lab] else f"{row['points'][lab]['peak_bytes'] / 1024:.4g}"
                         for lab in labels]
                lines.append(f"| {row['value']} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def run(cases, *, quick: bool = False, dtype: str = "float32", naive_max_bytes: int | None = 2 << 30,
        estimators=ESTIMATORS, repeats: int | None = None, log=print) -> dict:
    """Runs the named ``cases`` (``target``, ``sparse``, ``sweep``; the sweep over ``estimators``) and returns the
    report dict.

    ``dtype="float64"`` scopes ``jax_enable_x64`` on for the run (and restores it)."""
    sz = Sizes.quick() if quick else Sizes()
    if repeats is not None:
        sz.target_repeats = sz.sparse_repeats = sz.sweep_repeats = repeats
    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", dtype == "float64" or x64)
    try:
        dt = jnp.float64 if dtype == "float64" else jnp.float32
        split_ok = split_supported()
        if not split_ok:
            log("note: rtrl has no split= option in this checkout; rtrl_nosplit is skipped and rtrl itself is the "
                "unsplit ('before') behaviour")
        report = {"commit": _commit(), "dtype": dtype, "quick": quick, "split_supported": split_ok,
                  "machine": {"platform": platform.platform(), "backend": jax.default_backend(),
                              "devices": [str(d) for d in jax.devices()], "jax": jax.__version__},
                  "sizes": vars(sz)}
        for case in cases:
            t0 = time.perf_counter()
            if case == "target":
                report["target"] = case_target(sz, dt, split_ok, naive_max_bytes, log)
            elif case == "sparse":
                report["sparse"] = case_sparse(sz, dt, naive_max_bytes, log)
            elif case == "sweep":
                report["sweep"] = case_sweep(sz, dt, split_ok, naive_max_bytes, log, tuple(estimators))
            else:
                raise ValueError(f"unknown case {case!r}; choose from target, sparse, sweep")
            log(f"{case}: {time.perf_counter() - t0:.1f} s")
    finally:
        jax.config.update("jax_enable_x64", x64)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", action="append", choices=("target", "sparse", "sweep"),
                   help="case to run (repeatable; default: all three)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds): for the test")
    p.add_argument("--json", help="write the report (every point, every ratio) to this file")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--repeats", type=int, help="timed repeats of every point (default: 3 target/sparse, 5 sweep)")
    p.add_argument("--estimators", default=",".join(ESTIMATORS),
                   help=f"comma-separated estimators of the sweep (default: {','.join(ESTIMATORS)})")
    p.add_argument("--naive-max-bytes", type=float, default=2.0,
                   help="GiB the naive RTRL's jacfwd basis may take (bigger points are skipped); default 2")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    cases = args.case or ["target", "sparse", "sweep"]
    labels = [s.strip() for s in args.estimators.split(",") if s.strip()]
    bad = [s for s in labels if s not in ESTIMATORS]
    if bad:
        p.error(f"--estimators: unknown {', '.join(bad)}; choose from {', '.join(ESTIMATORS)}")
    report = run(cases, quick=args.quick, dtype=args.dtype, naive_max_bytes=int(args.naive_max_bytes * 2**30),
                 estimators=labels, repeats=args.repeats)
    print(table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
