"""The estimator comparison: gradient agreement, cost scaling and learning curves of BPTT and its alternatives.

``jbptt compare CONFIG [key.path=value ...] [--out DIR] [--only agreement,scaling,training]`` (or
``python experiments/compare_bptt_rtrl.py CONFIG``) runs every chosen estimator on the same batches and writes to
the output folder:

- ``report.json`` (everything measured), ``report.md`` (tables);
- ``agreement.png`` (relative error and cosine to the reference), ``alignment_matrix.png`` (estimator-by-estimator
  cosine, as in Marschall, Cho & Savin 2020), ``alignment_training.png`` (cosine to the reference along each
  estimator's training);
- ``scaling_<series>.png`` (wall time per update and XLA temp memory against ``T`` or ``n`` on log-log axes, with
  fitted exponents);
- ``learning_curves.png`` (validation loss against iterations and against wall time).

A config (YAML, see ``configs/compare_small.yaml``)::

    task: {name: delayed_recall, options: {length: 20, lag: 3}}      # any jbptt.tasks task
    model: {cell: elman, hidden: 16, dtype: float64}                   # as in jbptt.experiment.config
    optimizer: {name: adam, lr: 0.01}
    estimators: [bptt, {name: rtrl, options: {stateful: true}},
                 {name: rflo, label: rflo_fa, options: {feedback: random, stateful: true}}]
    reference: bptt                                                    # the label the others are compared with
    agreement: {batch_size: 8, batches: 2}
    training: {steps: 100, batch_size: 16, online_chunk: 5, eval_every: 10, align_every: 25}
    scaling: {batch_size: 4, repeats: 3, series: [{cell: elman, vary: n, values: [4, 8, 16], T: 20,
                                                   estimators: [bptt, rtrl]}]}
    seed: 0
    out_dir: runs/compare_small

The harness talks only to the estimator protocol. Agreement is always measured on whole sequences from the initial
carry, with a fresh estimator state (``init(params, carry, key=, inputs=)``). The learning curves are runs of the
training loop of ``jbptt run`` (:func:`jbptt.experiment.runner.train`, one run folder per estimator under
``<out>/runs/<label>``): estimators configured ``stateful: true`` are trained with ``training.chunk:
online_chunk`` (an optimizer update every ``online_chunk`` steps, their state carried between the chunks of a
sequence and restarted at each new batch by a reset), the others once per sequence. Timings are medians of
``repeats`` calls of the compiled update; memory is
``compile().memory_analysis().temp_size_in_bytes``. Each section runs with ``jax_enable_x64`` scoped to its dtype
(``model.dtype``; ``scaling.dtype``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from jbptt import losses
from jbptt.batch import Batch
from jbptt.cells import CELLS, with_readout
from jbptt.checkpoint import atomic_write
from jbptt.diagnostics import cosine_similarity, relative_error
from jbptt.estimator import make_estimator
from jbptt.experiment import rundir, runner
from jbptt.experiment.build import build_model, precision, sequence_length
from jbptt.experiment.compare_report import markdown, plot_agreement, plot_scaling, plot_training
from jbptt.experiment.config import (
    Config,
    ConfigError,
    EstimatorConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    TaskConfig,
    TrainingConfig,
    apply_overrides,
    parse_section,
    validate,
)
from jbptt.experiment.rundir import machine_info
from jbptt.tasks import make_task

SECTIONS = ("agreement", "scaling", "training")


# ----------------------------------------------------------------------------------------------------------------
# Config.


@dataclass
class EstimatorSpec:
    """A registered estimator ``name`` with ``options``, shown as ``label`` (default: the name)."""

    name: str
    label: str | None = None
    options: dict = field(default_factory=dict)

    @property
    def stateful(self) -> bool:
        """Whether the estimator carries its state between updates (then it is trained in online chunks)."""
        return bool(self.options.get("stateful", False))


@dataclass
class AgreementConfig:
    """Gradient agreement at the initial parameters, averaged over ``batches`` batches of ``batch_size``."""

    batch_size: int = 8
    batches: int = 2


@dataclass
class CompareTrainingConfig:
    """Learning curves: ``steps`` iterations (one batch of sequences each), an optimizer update every
    ``online_chunk`` steps for online estimators (``None``: once per sequence), validation loss every
    ``eval_every`` iterations and the cosine to the reference along training every ``align_every`` iterations."""

    steps: int = 200
    batch_size: int = 16
    online_chunk: int | None = None
    eval_every: int = 20
    eval_batch_size: int = 256
    align_every: int = 50


@dataclass
class ScalingSeries:
    """One cost curve: ``cell`` with ``hidden`` units over sequences of ``T`` steps, varying ``vary`` (``"T"`` or
    ``"n"``) over ``values``, for each of ``estimators`` (random regression data, ``input_size`` inputs)."""

    cell: str
    vary: str
    values: list = field(default_factory=list)
    estimators: list = field(default_factory=list)
    hidden: int = 16
    T: int = 20
    input_size: int = 4
    output_size: int = 2
    options: dict = field(default_factory=dict)
    name: str | None = None


@dataclass
class ScalingConfig:
    batch_size: int = 4
    repeats: int = 3
    dtype: str = "float32"
    series: list = field(default_factory=list)


@dataclass
class CompareConfig:
    task: TaskConfig
    model: ModelConfig
    optimizer: OptimizerConfig
    estimators: list
    agreement: AgreementConfig
    training: CompareTrainingConfig
    scaling: ScalingConfig | None
    reference: str = "bptt"
    seed: int = 0
    out_dir: str = "runs/compare"


def _estimator_specs(raw, path: str, source: str) -> list[EstimatorSpec]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(path, f"expected a non-empty list of estimators, got {raw!r}", source)
    specs = []
    for i, item in enumerate(raw):
        spec = EstimatorSpec(item) if isinstance(item, str) else parse_section(EstimatorSpec, item, f"{path}[{i}]",
                                                                               source)
        spec.label = spec.label or spec.name
        specs.append(spec)
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ConfigError(path, f"estimator labels must be unique, got {labels}", source)
    return specs


def parse_compare_config(raw, source: str = "<config>") -> CompareConfig:
    """A :class:`CompareConfig` from a raw dict; every problem raises one
    :class:`~jbptt.experiment.config.ConfigError`."""
    if not isinstance(raw, dict):
        raise ConfigError("", f"the file must hold a mapping, got {type(raw).__name__}", source)
    known = {f.name for f in dataclasses.fields(CompareConfig)}
    for key in raw:
        if key not in known:
            raise ConfigError(str(key), f"unknown key; the top level accepts {sorted(known)}", source)
    if "task" not in raw:
        raise ConfigError("task", "required field is missing", source)
    scaling = None
    if raw.get("scaling") is not None:
        s = dict(raw["scaling"])
        series_raw = s.pop("series", [])
        scaling = parse_section(ScalingConfig, s, "scaling", source)
        if not isinstance(series_raw, list):
            raise ConfigError("scaling.series", "expected a list", source)
        for i, item in enumerate(series_raw):
            path = f"scaling.series[{i}]"
            item = dict(item or {})
            ests = item.pop("estimators", None)
            vals = item.pop("values", None)
            ser = parse_section(ScalingSeries, item, path, source)
            if ser.vary not in ("T", "n"):
                raise ConfigError(f"{path}.vary", f"must be 'T' or 'n', got {ser.vary!r}", source)
            if ser.cell not in CELLS:
                raise ConfigError(f"{path}.cell", f"unknown cell {ser.cell!r}; choose from {sorted(CELLS)}", source)
            if not isinstance(vals, list) or len(vals) < 2 or not all(isinstance(v, int) and v > 0 for v in vals):
                raise ConfigError(f"{path}.values", f"expected at least two positive ints, got {vals!r}", source)
            ser.values, ser.estimators = vals, _estimator_specs(ests, f"{path}.estimators", source)
            ser.name = ser.name or f"{ser.cell}_{ser.vary}"
            scaling.series.append(ser)
    cfg = CompareConfig(
        task=parse_section(TaskConfig, raw["task"], "task", source),
        model=parse_section(ModelConfig, raw.get("model"), "model", source),
        optimizer=parse_section(OptimizerConfig, raw.get("optimizer"), "optimizer", source),
        estimators=_estimator_specs(raw.get("estimators", ["bptt", "rtrl"]), "estimators", source),
        agreement=parse_section(AgreementConfig, raw.get("agreement"), "agreement", source),
        training=parse_section(CompareTrainingConfig, raw.get("training"), "training", source),
        scaling=scaling,
        reference=raw.get("reference", "bptt"),
        seed=raw.get("seed", 0),
        out_dir=raw.get("out_dir", "runs/compare"))
    labels = [s.label for s in cfg.estimators]
    if cfg.reference not in labels:
        raise ConfigError("estimators", f"must include the reference {cfg.reference!r} (the estimators compared "
                          f"with it are {labels}; set `reference` to one of them)", source)
    chunk = cfg.training.online_chunk
    if chunk is not None and chunk < 1:
        raise ConfigError("training.online_chunk", f"must be >= 1, got {chunk}", source)
    if chunk is not None:
        try:
            T = sequence_length(make_task(cfg.task.name, **cfg.task.options))
        except (TypeError, ValueError) as e:
            raise ConfigError("task", str(e), source) from None
        if chunk > T:
            raise ConfigError("training.online_chunk", f"must be <= the task's sequence length T = {T}, got {chunk}",
                              source)
    return cfg


def load_compare_config(path: str, overrides=()) -> CompareConfig:
    """Reads a comparison YAML config and applies dotted overrides (``training.steps=10``)."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError("", "file not found", path) from None
    except yaml.YAMLError as e:
        raise ConfigError("", f"invalid YAML: {e}", path) from None
    return parse_compare_config(apply_overrides(raw, overrides, path), path)


# ----------------------------------------------------------------------------------------------------------------
# Measurements.


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(tree)])


def _model(cfg: CompareConfig):
    """``(model, params)``: the task, cell and loss of ``cfg`` (built like a runner config) and the initial
    parameters of the agreement section."""
    model = build_model(Config(task=cfg.task, model=cfg.model, optimizer=cfg.optimizer, seed=cfg.seed))
    return model, model.cell.init(jax.random.key(cfg.seed), model.task.input_size)


def _init(est, cell, params, batch: Batch, key):
    """A fresh estimator state for ``batch`` (initial carry of its batch size; its inputs as the example)."""
    carry = cell.initial_carry(params, (jax.tree.leaves(batch.inputs)[0].shape[0],))
    return est.init(params, carry, key=key, inputs=batch.inputs)


def _fresh_gradient(est, cell):
    """Jitted ``(params, batch, key) -> grads`` of ``est`` from a fresh state (whole sequence, initial carry)."""
    return jax.jit(lambda params, batch, key: est.update(params, _init(est, cell, params, batch, key), batch)[1])


def gradient_agreement(cfg: CompareConfig, task, params, fns) -> dict:
    """Relative error and cosine to the reference, and the pairwise cosine matrix, averaged over the agreement
    batches.

    ``fns``: per label, the jitted ``(params, batch, key) -> grads`` of :func:`_fresh_gradient`."""
    labels, ref = [s.label for s in cfg.estimators], cfg.reference
    rel = {lab: [] for lab in labels}
    cos = {lab: [] for lab in labels}
    matrix = np.zeros((len(labels), len(labels)))
    for b in range(cfg.agreement.batches):
        key = jax.random.fold_in(jax.random.key(cfg.seed + 1), b)
        batch = task.sample(key, cfg.agreement.batch_size, "train")
        grads = {lab: fns[lab](params, batch, key) for lab in labels}
        for lab in labels:
            rel[lab].append(float(relative_error(grads[lab], grads[ref])))
            cos[lab].append(float(cosine_similarity(grads[lab], grads[ref])))
        flat = np.stack([_flat(grads[lab]) for lab in labels])
        unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
        matrix += unit @ unit.T / cfg.agreement.batches
    return {"labels": labels, "reference": ref,
            "relative_error": {lab: float(np.mean(v)) for lab, v in rel.items()},
            "cosine": {lab: float(np.mean(v)) for lab, v in cos.items()},
            "alignment_matrix": matrix.tolist()}


def _training_config(cfg: CompareConfig, spec: EstimatorSpec, out_dir: str, chunk: int | None, n: int) -> Config:
    """The runner config that trains ``spec`` for the learning curves: ``training.steps`` batches of sequences,
    ``n`` optimizer steps (chunks of ``chunk`` steps) per batch for a chunked estimator, 1 for the others."""
    tc = cfg.training
    # training.chunk makes a chunked estimator stateful; the others start every batch from the initial carry
    options = {k: v for k, v in spec.options.items() if k != "stateful"}
    run = Config(task=cfg.task, model=cfg.model, optimizer=cfg.optimizer, estimator=EstimatorConfig(spec.name, options),
                 training=TrainingConfig(steps=tc.steps * n, batch_size=tc.batch_size, eval_every=tc.eval_every * n,
                                         eval_batch_size=tc.eval_batch_size, checkpoint_every=tc.steps * n,
                                         chunk=chunk),
                 logging=LoggingConfig(root=out_dir, name=spec.label, log_every=1, plots=False, gradient_flow=False),
                 seed=cfg.seed)
    validate(run)
    return run


def learning_curves(cfg: CompareConfig, model, fns, out_dir: str) -> dict:
    """Trains each estimator with the runner (:func:`jbptt.experiment.runner.train`, one run folder per label
    under ``<out_dir>/runs``) from the same parameters on the same batches; returns curves per label, read from
    the runs' ``metrics.jsonl`` (``wall_time``: the run's time since its first step, which compiles; the
    evaluations are included).

    ``fns``: per label, the jitted fresh-state gradient, for the cosine to the reference logged with the
    validations whose iteration is a multiple of ``align_every`` (and the last).
    """
    tc, task = cfg.training, model.task
    align_batch = task.sample(jax.random.key(cfg.seed + 4), cfg.agreement.batch_size, "val")
    T = sequence_length(task)
    out = {}
    for spec in cfg.estimators:
        chunk = tc.online_chunk if spec.stateful else None
        n = -(-T // chunk) if chunk else 1
        grad_fn, ref_grad = fns[spec.label], fns[cfg.reference]

        def align(step, params, n=n, grad_fn=grad_fn, ref_grad=ref_grad):
            it = step // n
            if it % tc.align_every and it != tc.steps:
                return {}
            key = jax.random.fold_in(jax.random.key(cfg.seed + 5), it)
            g, g_ref = grad_fn(params, align_batch, key), ref_grad(params, align_batch, key)
            return {"align_cosine": float(cosine_similarity(g, g_ref)),
                    "align_relative_error": float(relative_error(g, g_ref))}

        try:
            run_cfg = _training_config(cfg, spec, os.path.join(out_dir, "runs"), chunk, n)
            run_dir = os.path.join(out_dir, "runs", spec.label)
            summary = runner.train(run_cfg, run_dir, overwrite=True, extra_metrics=align)
        except ConfigError as e:
            path = "training.online_chunk" if e.path.startswith("training.chunk") else f"estimators ({spec.label})"
            raise ConfigError(path, e.problem, e.source) from None
        records = rundir.read_metrics(run_dir)
        t0 = records[0]["time"]  # the end of the first (compiling) step
        val = [r for r in records if r["split"] == "val"]
        aligned = [r for r in val if "align_cosine" in r]
        out[spec.label] = {
            "iteration": [r["step"] / n for r in val], "updates": [r["step"] for r in val],
            "wall_time": [r["time"] - t0 for r in val], "loss": [r["loss"] for r in val],
            "metric": [r.get(task.metric, np.nan) for r in val],
            "align_iteration": [r["step"] / n for r in aligned],
            "align_cosine": [r["align_cosine"] for r in aligned],
            "align_relative_error": [r["align_relative_error"] for r in aligned],
            "online_chunk": chunk, "status": summary["status"], "run_dir": run_dir}
    return {"metric": task.metric, "curves": out}


def fit_exponent(xs, ys) -> float | None:
    """Least-squares slope of ``log y`` against ``log x`` (``None`` with fewer than two positive points)."""
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and y > 0]
    if len(pts) < 2:
        return None
    lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(lx, ly, 1)[0])


def _exponents(xs, ys) -> dict:
    """Exponent over all points and over the larger half (less dominated by fixed overheads; >= 3 points where
    there are that many)."""
    start = max(0, min(len(xs) // 2, len(xs) - 3))
    return {"all": fit_exponent(xs, ys), "upper_half": fit_exponent(xs[start:], ys[start:])}


def measure_point(cell, spec: EstimatorSpec, *, B: int, T: int, input_size: int, dtype, repeats: int,
                  seed: int = 0) -> dict:
    """Median wall time of the compiled update and its XLA temp memory for one estimator at one size."""
    est = make_estimator(spec.name, cell, losses.mse, **spec.options)
    params = cell.init(jax.random.key(seed), input_size)
    kx, ky = jax.random.split(jax.random.key(seed + 1))
    batch = Batch(jax.random.normal(kx, (B, T, input_size), dtype),
                  jax.random.normal(ky, (B, T, cell.output_size), dtype))
    state = est.init(params, cell.initial_carry(params, (B,)), key=jax.random.key(seed + 2), inputs=batch.inputs)
    t0 = time.perf_counter()
    compiled = jax.jit(est.update).lower(params, state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = int(mem.temp_size_in_bytes) if mem is not None else None
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(params, state, batch))
    calls = int(min(200, max(1, np.ceil(0.05 / max(time.perf_counter() - t0, 1e-6)))))  # >= ~50 ms a repeat
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            res = compiled(params, state, batch)
        jax.block_until_ready(res)
        times.append((time.perf_counter() - t0) / calls)
    med = statistics.median(times)
    return {"time_s": med, "time_per_step_s": med / T, "temp_bytes": temp, "compile_s": compile_s}


def cost_scaling(cfg: CompareConfig, log=print) -> dict:
    """Every scaling series: per estimator, time and memory at each value, and fitted log-log exponents."""
    sc = cfg.scaling
    dtype = jnp.float64 if sc.dtype == "float64" else jnp.float32
    out = {}
    for ser in sc.series:
        res = {"vary": ser.vary, "values": ser.values, "cell": ser.cell, "fixed": {}, "estimators": {}}
        res["fixed"] = {"T": ser.T} if ser.vary == "n" else {"n": ser.hidden}
        for spec in ser.estimators:
            points, skipped = [], None
            for v in ser.values:
                n, T = (v, ser.T) if ser.vary == "n" else (ser.hidden, v)
                cell = with_readout(CELLS[ser.cell](n, dtype=dtype, **ser.options), ser.output_size)
                try:
                    p = measure_point(cell, spec, B=sc.batch_size, T=T, input_size=ser.input_size, dtype=dtype,
                                      repeats=sc.repeats, seed=cfg.seed)
                except ValueError as e:  # e.g. the influence-size guard or a cell the estimator does not support
                    skipped = f"{ser.vary}={v}: {e}"
                    break
                points.append({"value": v, **p})
                log(f"  scaling {ser.name} {spec.label} {ser.vary}={v}: {p['time_s'] * 1e3:.2f} ms, "
                    f"temp {p['temp_bytes']} B")
            xs = [p["value"] for p in points]
            res["estimators"][spec.label] = {
                "points": points, "skipped": skipped,
                "time_exponent": _exponents(xs, [p["time_s"] for p in points]),
                "memory_exponent": _exponents(xs, [p["temp_bytes"] for p in points])}
        out[ser.name] = res
    return out


def run(cfg: CompareConfig, *, config_file: str = "<config>", out_dir: str | None = None,
        only=SECTIONS, log=print) -> dict:
    """Runs the comparison and writes the report files; returns the report dict.

    The agreement and training sections run with ``jax_enable_x64`` scoped to ``model.dtype``, the scaling section
    to ``scaling.dtype`` (:func:`~jbptt.experiment.build.precision`); the process's setting is left alone.
    """
    out_dir = out_dir or cfg.out_dir
    report = {"config_file": config_file, "config": dataclasses.asdict(cfg), "machine": machine_info(), "plots": []}
    plots = report["plots"]

    def write():  # after every section, so a run cut short still leaves what it measured
        atomic_write(os.path.join(out_dir, "report.json"), json.dumps(report, indent=1, default=str))
        atomic_write(os.path.join(out_dir, "report.md"), markdown(report))

    def section(name, measure, summary, plot):
        t0 = time.perf_counter()
        report[name] = measure()
        log(f"{name} ({time.perf_counter() - t0:.1f} s)" + summary(report[name]))
        plots.extend(plot(report[name], out_dir))
        write()

    if "agreement" in only or "training" in only:
        with precision(cfg.model.dtype):
            model, params = _model(cfg)
            estimators = {s.label: make_estimator(s.name, model.cell, model.loss_fn, **s.options)
                          for s in cfg.estimators}
            fns = {label: _fresh_gradient(est, model.cell) for label, est in estimators.items()}
    if "agreement" in only:
        with precision(cfg.model.dtype):
            section("agreement", lambda: gradient_agreement(cfg, model.task, params, fns),
                    lambda r: ": " + ", ".join(f"{k} {v:.2g}" for k, v in r["relative_error"].items()),
                    plot_agreement)
    if "scaling" in only and cfg.scaling is not None and cfg.scaling.series:
        with precision(cfg.scaling.dtype):
            section("scaling", lambda: cost_scaling(cfg, log), lambda r: "", plot_scaling)
    if "training" in only:
        with precision(cfg.model.dtype):
            section("training", lambda: learning_curves(cfg, model, fns, out_dir),
                    lambda r: ": " + ", ".join(f"{k} {c['loss'][-1]:.3f}" for k, c in r["curves"].items()),
                    plot_training)
    write()
    return report


def main(argv=None) -> int:
    """``jbptt compare CONFIG [overrides] [--out DIR] [--only ...]``; returns the exit code."""
    p = argparse.ArgumentParser(prog="jbptt compare", description="Compare BPTT, RTRL and approximations.")
    p.add_argument("config", help="comparison YAML config (e.g. configs/compare_small.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.steps=20")
    p.add_argument("--out", help="output folder (default: the config's out_dir)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    try:
        args = p.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:
        return int(e.code or 0)
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        print(f"jbptt compare: --only accepts {', '.join(SECTIONS)}; got {', '.join(bad)}", file=sys.stderr)
        return 2
    try:
        cfg = load_compare_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"jbptt compare: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    report = run(cfg, config_file=args.config, out_dir=args.out, only=only)
    out = args.out or cfg.out_dir
    print(f"wrote {os.path.join(out, 'report.md')} and {len(report['plots'])} plots "
          f"in {time.perf_counter() - t0:.0f} s")
    return 0
