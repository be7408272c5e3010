"""Memory/time trade-off of the remat schedules for BPTT (issue 6).

For an Elman tanh cell and an LSTM (B=64, H=256, input size 2, one linear output: the shapes of the adding
problem) and T in {256, 1024, 4096, 16384}, each policy of :mod:`jbptt.remat` is compiled as one jitted
``value_and_grad`` of the BPTT loss, unrolled reverse-mode-only as the BPTT estimator does, and measured for the
following. Cells ``tanh`` / ``lstm`` are the fused cells of :mod:`jbptt.fused`: they run their reverse-mode-only
fused layer on the segments of ``sqrt`` / ``every_k`` / ``nested`` (the Elman layer stores one carry per step) and,
as policy ``fused``, over the whole sequence without remat; ``tanh_scan`` / ``lstm_scan`` are the plain cells,
whose step is scanned everywhere. The baseline ``none`` is the plain scan of the plain cell (JAX's own residuals)

* XLA temp memory, ``compiled.memory_analysis().temp_size_in_bytes`` (deterministic), vs the plain scan's;
* cell evaluations per gradient, counted at run time by a ``jax.debug.callback`` in the step (its argument
  depends on the carry), on the CPU backend with a small proxy cell (B=1, H=4, same T: a schedule depends on T
  only), next to the schedule's prediction;
* median step time over interleaved repeats, relative to the plain scan's median in the same run.

Then a few training steps at the largest T with the fastest policy that fits ``--budget-mib``, which the plain
scan exceeds. Writes ``bench_memory.json``, ``bench_memory.md`` and ``bench_memory.png`` (the memory-time
frontier) to ``--out``, atomically.

    PYTHONPATH=. python experiments/bench_memory.py                      # full run (GPU recommended)
    PYTHONPATH=. python experiments/bench_memory.py --T 256 --repeats 3  # quick
    PYTHONPATH=. python experiments/bench_memory.py --cells tanh --T 1024 \
        --policies per_step sqrt sqrt_nl nested3 nested3_nl --repeats 15     # the issue's target point (CPU)
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jbptt import cells, fused, losses, remat
from jbptt.batch import Batch
from jbptt.checkpoint import atomic_write
from jbptt.estimators.bptt import loss_and_outputs

B, H, I, O = 64, 256, 2, 1
_SCANS: dict = {}  # (cell, T, policy) -> scan, for the training run


CELLS = {
    # Elman tanh; the segmented schedules (every_k / sqrt / nested) run its carry-only layer on their segments.
    "tanh": lambda hidden: fused.elman(hidden),
    # the same cell scanned step by step everywhere (the schedules' generic path)
    "tanh_scan": lambda hidden: cells.elman(hidden),
    # LSTM; the segments run its reverse-mode-only fused layer (hand-written VJP)
    "lstm": lambda hidden: fused.lstm(hidden),
    "lstm_scan": lambda hidden: cells.lstm(hidden),
}
PLAIN = "none"  # the baseline policy: the plain cell's plain scan


def make_cell(name: str, hidden: int, policy: str | None = None):
    """The cell ``name`` with its readout; for the baseline policy :data:`PLAIN` without its fused path."""
    cell = cells.with_readout(CELLS[name](hidden), O)
    return cells.plain(cell) if policy == PLAIN else cell


def policies(T: int, alpha: float, plan_max_T: int, plan_units, only=None) -> dict:
    """name -> (scan, predicted evaluations); ``only``: names to keep (``none`` is always kept)."""
    nl = "nonlinearities"  # inner steps keep their carry + tanh/sigmoid outputs (remat.save_nonlinearity_outputs)
    makers = {
        PLAIN: lambda: (None, T),
        "fused": lambda: (None, T),  # the fused path over the whole sequence (plain cells: the plain scan again)
        "per_step": lambda: (remat.per_step(), remat.evaluations("per_step", T)),
        "per_step_nl": lambda: (remat.per_step(nl), remat.evaluations("per_step", T)),
        "sqrt": lambda: (remat.sqrt(), remat.evaluations("sqrt", T)),
        "sqrt_nl": lambda: (remat.sqrt(nl), remat.evaluations("sqrt", T, checkpoint_policy=nl)),
        "nested3": lambda: (remat.nested(3), remat.evaluations("nested", T, levels=3)),
        "nested3_nl": lambda: (remat.nested(3, policy=nl),
                              remat.evaluations("nested", T, levels=3, checkpoint_policy=nl)),
        "binomial10": lambda: (remat.binomial(10), remat.evaluations("binomial", T, slots=10)),
        "binomial32": lambda: (remat.binomial(32), remat.evaluations("binomial", T, slots=32)),
    }
    out = {n: f() for n, f in makers.items() if only is None or n == PLAIN or n in only}
    if T <= plan_max_T:
        for u in plan_units:
            if only is None or f"plan{u}" in only:
                pl = remat.plan(T, u, alpha=alpha)
                out[f"plan{u}"] = (pl.scan, pl.evaluations)
    return out


def batch_for(T: int, b: int, key) -> Batch:
    k1, k2 = jax.random.split(key)
    return Batch(jax.random.normal(k1, (b, T, I)), jax.random.normal(k2, (b, T, O)))


def grad_fn(cell, batch, scan):
    """The jitted BPTT ``value_and_grad``, unrolled reverse-mode-only as :func:`jbptt.estimators.bptt.bptt` does."""
    return jax.jit(jax.value_and_grad(
        lambda p: loss_and_outputs(cell, losses.mse, p, batch, scan=scan, reverse_mode_only=True)[0]))


def count_evaluations(cell_name: str, T: int, policy: str, scan) -> int:
    """Runs one gradient of a proxy cell on the CPU backend and counts its evaluations by callback
    (:func:`jbptt.remat.counting_cell`: per step when scanned, per segment length when its fused layer runs)."""
    counter = [0]
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        counting = remat.counting_cell(make_cell(cell_name, 4, policy), counter)
        params = counting.init(jax.random.key(0), I)
        batch = batch_for(T, 1, jax.random.key(1))
        jax.block_until_ready(grad_fn(counting, batch, scan)(params))
        jax.effects_barrier()
    return counter[0]


def bench_one(cell_name: str, T: int, args) -> list[dict]:
    cell = make_cell(cell_name, H)
    params = cell.init(jax.random.key(0), I)
    batch = batch_for(T, B, jax.random.key(1))
    carry = cell.initial_carry(params, (B,))
    carry_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(carry))
    alpha = remat.residual_bytes(cell.step, params, carry, jnp.ones((B, I))) / carry_bytes
    t0 = time.perf_counter()
    pols = {n: v for n, v in policies(T, alpha, args.plan_max_T, args.plan_units, args.policies).items()
            if n != "fused" or cell.fused is not None}  # a plain cell's "fused" run is its plain scan again
    plan_s = time.perf_counter() - t0
    compiled, rows = {}, []
    for name, (scan, predicted) in pols.items():
        _SCANS[(cell_name, T, name)] = scan
        f = grad_fn(make_cell(cell_name, H, name), batch, scan)
        c = f.lower(params).compile()
        temp = c.memory_analysis().temp_size_in_bytes
        compiled[name] = c
        counted = count_evaluations(cell_name, T, name, scan) if args.count else None
        rows.append({"cell": cell_name, "T": T, "policy": name, "temp_bytes": int(temp),
                     "predicted_evals": int(predicted), "counted_evals": counted, "alpha": alpha,
                     "carry_bytes": carry_bytes})
    times = {name: [] for name in compiled}
    for c in compiled.values():  # warm up
        jax.block_until_ready(c(params))
    for _ in range(args.repeats):  # interleaved
        for name, c in compiled.items():
            t = time.perf_counter()
            jax.block_until_ready(c(params))
            times[name].append(time.perf_counter() - t)
    base_mem = rows[0]["temp_bytes"]
    base_t = statistics.median(times[PLAIN])
    for r in rows:
        med = statistics.median(times[r["policy"]])
        r.update(median_s=med, time_ratio=med / base_t, mem_fraction=r["temp_bytes"] / base_mem,
                 mem_saved=1 - r["temp_bytes"] / base_mem, evals_per_step=r["predicted_evals"] / T)
        print(f"{cell_name:9s} T={T:6d} {r['policy']:11s} temp={r['temp_bytes'] / 2**20:9.2f} MiB "
              f"saved={100 * r['mem_saved']:6.2f}%  time x{r['time_ratio']:.3f}  "
              f"evals/T={r['evals_per_step']:.3f}  counted={r['counted_evals']} "
              f"predicted={r['predicted_evals']}", flush=True)
    if any(r["policy"].startswith("plan") for r in rows):
        print(f"  (planning {plan_s:.1f} s for all budgets, alpha={alpha:.2f})")
    return rows


def train_under_budget(cell_name: str, T: int, rows: list[dict], budget: int, steps: int) -> dict:
    """A few Adam steps at ``T`` with the fastest policy whose temp memory fits ``budget`` bytes."""
    fitting = [r for r in rows if r["cell"] == cell_name and r["T"] == T and r["temp_bytes"] <= budget]
    plain = next(r for r in rows if r["cell"] == cell_name and r["T"] == T and r["policy"] == PLAIN)
    if not fitting:
        return {"cell": cell_name, "T": T, "policy": None, "note": "no policy fits the budget"}
    best = min(fitting, key=lambda r: r["median_s"])
    cell = make_cell(cell_name, H, best["policy"])
    params = cell.init(jax.random.key(0), I)
    batch = batch_for(T, B, jax.random.key(1))
    scan = _SCANS[(cell_name, T, best["policy"])]
    opt = optax.adam(1e-3)

    @jax.jit
    def train_step(params, state):
        loss_fn = lambda p: loss_and_outputs(cell, losses.mse, p, batch, scan=scan, reverse_mode_only=True)[0]
        loss, g = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, loss

    state = opt.init(params)
    temp = train_step.lower(params, state).compile().memory_analysis().temp_size_in_bytes
    loss_values = []
    for _ in range(steps):
        params, state, loss = train_step(params, state)
        loss_values.append(float(loss))
    return {"cell": cell_name, "T": T, "policy": best["policy"], "budget_bytes": budget,
            "plain_temp_bytes": plain["temp_bytes"], "train_step_temp_bytes": int(temp),
            "losses": loss_values, "finite": bool(np.all(np.isfinite(loss_values)))}


def markdown(rows, trains, meta) -> str:
    lines = [f"device: {meta['device']}; B={B}, H={H}, I={I}, O={O}, float32; time = median of "
             f"{meta['repeats']} interleaved repeats relative to the plain scan in the same run; evaluations "
             "counted on the CPU "
             "backend with a proxy cell of the same T.", "",
             "| cell | T | policy | temp MiB | memory saved | time ratio | evals / T | counted = predicted |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        ok = "n/a" if r["counted_evals"] is None else ("yes" if r["counted_evals"] == r["predicted_evals"]
                                                         else f"NO ({r['counted_evals']})")
        lines.append(f"| {r['cell']} | {r['T']} | {r['policy']} | {r['temp_bytes'] / 2**20:.2f} | "
                     f"{100 * r['mem_saved']:.2f}% | {r['time_ratio']:.3f} | {r['evals_per_step']:.3f} | "
                     f"{ok} |")
    lines += ["", "Training at the largest T under the memory budget:", ""]
    for t in trains:
        lines.append(f"- {t['cell']} T={t['T']}: " + (
            t.get("note", "") if t.get("policy") is None else
            f"budget {t['budget_bytes'] / 2**20:.0f} MiB, plain scan needs "
            f"{t['plain_temp_bytes'] / 2**20:.0f} MiB; "
            f"`{t['policy']}` train step temp {t['train_step_temp_bytes'] / 2**20:.1f} MiB, losses "
            f"{', '.join(f'{v:.4f}' for v in t['losses'])}"))
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cell_names = sorted({r["cell"] for r in rows})
    fig, axes = plt.subplots(1, len(cell_names), figsize=(6 * len(cell_names), 4.5), squeeze=False)
    for ax, cname in zip(axes[0], cell_names, strict=True):
        for T in sorted({r["T"] for r in rows}):
            rs = [r for r in rows if r["cell"] == cname and r["T"] == T]
            ax.scatter([r["time_ratio"] for r in rs], [r["mem_fraction"] for r in rs], label=f"T={T}", s=18)
            for r in rs:
                ax.annotate(r["policy"], (r["time_ratio"], r["mem_fraction"]), fontsize=6)
        ax.axhline(0.03, color="gray", lw=0.5, ls="--")
        ax.axvline(1.33, color="gray", lw=0.5, ls="--")
        ax.set_yscale("log")
        ax.set_xlabel("step time / plain scan")
        ax.set_ylabel("temp memory / plain scan")
        ax.set_title(f"{cname}, B={B}, H={H}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    ap.add_argument("--cells", nargs="+", default=["tanh", "lstm"], choices=sorted(CELLS))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--plan-max-T", type=int, default=1024, help="plan only up to this T (O(T^2) planning)")
    ap.add_argument("--plan-units", type=int, nargs="+", default=[32, 64, 96])
    ap.add_argument("--budget-mib", type=float, default=512.0, help="memory budget of the large-T training")
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--policies", nargs="+", default=None,
                    help="only these policies (e.g. sqrt fused nested3 plan64); default: all; none is always run")
    ap.add_argument("--no-count", dest="count", action="store_false")
    ap.add_argument("--out", default="experiments/results")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    partial = os.path.join(args.out, "bench_memory.partial.json")
    for cname in args.cells:
        for T in args.T:
            rows += bench_one(cname, T, args)
            atomic_write(partial, json.dumps({"rows": rows}, indent=1))
    budget = int(args.budget_mib * 2**20)
    trains = [train_under_budget(c, max(args.T), rows, budget, args.train_steps) for c in args.cells]
    for t in trains:
        print("train:", t, flush=True)
    meta = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "repeats": args.repeats, "jax": jax.__version__, "B": B, "H": H, "I": I, "O": O}
    atomic_write(os.path.join(args.out, "bench_memory.json"),
                 json.dumps({"meta": meta, "rows": rows, "train": trains}, indent=1))
    atomic_write(os.path.join(args.out, "bench_memory.md"), markdown(rows, trains, meta))
    plot(rows, os.path.join(args.out, "bench_memory.png"))
    os.remove(partial)
    target = [r for r in rows if r["cell"] == "tanh" and r["T"] == 1024 and r["mem_saved"] >= 0.97]
    if target:
        best = min(target, key=lambda r: r["time_ratio"])
        print(f"target check (tanh, T=1024): best policy saving >= 97%: {best['policy']} saves "
              f"{100 * best['mem_saved']:.2f}% at x{best['time_ratio']:.3f} time "
              f"({'meets' if best['time_ratio'] <= 1.33 else 'misses'} <= 1.33x)")
    if not math.isfinite(sum(r["time_ratio"] for r in rows)):
        raise SystemExit("non-finite timings")


if __name__ == "__main__":
    main()
