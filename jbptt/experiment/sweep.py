"""Sweeps: one config run over a grid of overrides, one standard run folder per point, aggregated over seeds.

    jbptt sweep CONFIG [axes ...] [--parallel auto|vmap|process] [--sweep-dir DIR] [--quiet]

An axis is ``key=v1,v2,...`` (a grid axis, values parsed as YAML like ``jbptt run`` overrides), ``key=a..b`` (the
integers ``a`` to ``b`` inclusive, e.g. ``seed=0..4``) or a plain ``key=value`` (a fixed override of every point).
The grid is the product of the grid axes, in the order given. ``CONFIG`` is a run config (YAML) or a ``.sweep`` file
``{config: <run config, relative to the .sweep file>, axes: [...]}`` whose axes the command line's extend (an axis
of the same key replaces the file's).

Every point is validated (parsed and built, its optimizer and estimator tried abstractly) before anything is
written; a bad axis or value is a :class:`~jbptt.experiment.config.ConfigError` (exit 2). The sweep folder
(default ``<logging.root>/sweep-<config stem>-<hash of the config file and the axes>``, so the same command finds
its folder again) holds one run folder per point, named from the point (``optimizer.lr=0.01,seed=1``), written by
:func:`jbptt.experiment.runner.train` (``jbptt plot`` and ``load_run`` work on it), and the reports of
:mod:`jbptt.experiment.sweep_report` (``sweep.json``, ``sweep.md``, ``curves.png``, ``heatmap.png``): per point of
the non-seed axes (a *group*) the mean/min/max over its seeds of the final and best validation metric (and test).

Restarts: a point whose folder holds a finished run (``summary.json`` with status completed, early_stopped or
halted_nan) is not run again; a folder holding a run that was stopped (killed, interrupted) is resumed from its last
checkpoint (``train(..., resume=True)``), so a killed sweep started again continues where it stopped.

Execution (``--parallel``):

* ``process``: the points one after another, each in a subprocess (``python -m jbptt run ...``): a point that
  crashes is reported (``status: failed``) and the sweep goes on.
* ``vmap`` / ``auto`` (default): the new seeds of a group train side by side in one program (``jax.vmap`` over
  seeds of one jitted training step; batches, initial states and evaluations as in the plain loop, so every seed's
  run folder holds what a run of that seed alone writes). This applies when :func:`vmap_blocker` finds nothing:
  a gradient estimator (not a fitted one), ``parallel.mode: none``, no ``training.chunk``/``stateful_stream``, no
  TensorBoard, estimator states of one shape across seeds. Everything else (and resuming an interrupted seed) runs
  as in ``process`` mode, with a note. Vmapped seeds share one wall time.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jbptt import checkpoint as ckpt
from jbptt.experiment import loop, rundir, runner
from jbptt.experiment.build import build, build_model, precision, run_keys
from jbptt.experiment.config import Config, ConfigError, load_config, parse_override, read_yaml, to_dict
from jbptt.experiment.evaluate import make_eval_fn, make_gradient_flow
from jbptt.experiment.sweep_report import FINISHED, read_json, record, write_reports
from jbptt.train import make_train_step

CLI = "<command line>"


# ----------------------------------------------------------------------------------------------------------
# Axes, points, the plan.


class Axis(NamedTuple):
    """A grid axis: ``key`` (dotted), the values' texts (for folder names) and the values."""

    key: str
    texts: list
    values: list


class Point(NamedTuple):
    """One run of the grid: its folder ``name``, the ``key=value`` overrides, the seed and its group's name."""

    name: str
    overrides: tuple
    group: str


def split_values(text: str) -> list[str]:
    """``"1,[2,3],'a,b'"`` -> ``["1", "[2,3]", "'a,b'"]``: commas outside brackets, braces and quotes."""
    out, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    return out + [cur.strip()]


def parse_axes(axes) -> tuple[list[Axis], list[str]]:
    """``(grid axes, fixed overrides)`` of the command-line axes (see the module docstring).

    Raises:
      ConfigError: an axis that is not ``key=value``, an empty value, a bad range, or a key given twice.
    """
    grid, fixed, seen = [], [], set()
    for text in axes:
        parse_override(text.split("=", 1)[0] + "=0" if "=" in text else text)  # key=value syntax
        key, value = (s.strip() for s in text.split("=", 1))
        if key in seen:
            raise ConfigError(key, "is given twice in the sweep's axes", CLI)
        seen.add(key)
        lo, dots, hi = value.partition("..")
        if dots:
            try:
                a, b = int(lo), int(hi)
            except ValueError:
                raise ConfigError(key, f"a range must be two integers like 0..4, got {value!r}", CLI) from None
            if b < a:
                raise ConfigError(key, f"empty range {value!r}", CLI)
            grid.append(Axis(key, [str(v) for v in range(a, b + 1)], list(range(a, b + 1))))
            continue
        texts = split_values(value)
        if len(texts) == 1:
            parse_override(f"{key}={value}")
            fixed.append(f"{key}={value}")
            continue
        if not all(texts) or len(set(texts)) < len(texts):
            raise ConfigError(key, f"the values {value!r} must be distinct and non-empty", CLI)
        grid.append(Axis(key, texts, [parse_override(f"{key}={t}")[1] for t in texts]))
    return grid, fixed


def grid_points(grid: list[Axis]) -> list[Point]:
    """The product of the grid axes (the last axis fastest); ``seed`` does not enter a point's group."""
    points = []
    for combo in itertools.product(*[list(zip(a.texts, a.values, strict=True)) for a in grid]):
        parts = [f"{a.key}={text}" for a, (text, _) in zip(grid, combo, strict=True)]
        name = ",".join(parts).replace("/", "_") or "run"
        group = ",".join(p for a, p in zip(grid, parts, strict=True) if a.key != "seed").replace("/", "_") or "run"
        points.append(Point(name, tuple(parts), group))
    return points


def read_spec(path: str, axes) -> tuple[str, list[str]]:
    """``(run config path, axes)``: a run config with the command line's axes, or a ``.sweep`` file's config and
    axes extended by them (a command-line axis replaces the file's axis of that key)."""
    if not path.endswith(".sweep"):
        return path, list(axes)
    spec = read_yaml(path)
    if not isinstance(spec, dict) or set(spec) - {"config", "axes"} or not isinstance(spec.get("config"), str):
        raise ConfigError("", "a .sweep file holds {config: <run config path>, axes: [key=values, ...]}", path)
    keys = {a.split("=", 1)[0].strip() for a in axes}
    own = [str(a) for a in spec.get("axes") or [] if str(a).split("=", 1)[0].strip() not in keys]
    return os.path.join(os.path.dirname(path), spec["config"]), own + list(axes)


class Plan(NamedTuple):
    """A validated sweep: the run config, its axes, the points and their configs, the sweep folder."""

    config: str
    axes: list
    grid: list
    fixed: list
    points: list
    configs: list
    sweep_dir: str


def plan(config: str, axes=(), sweep_dir: str | None = None) -> Plan:
    """Parses the axes and validates every point (config parsed; per group built and one step tried abstractly).

    Raises:
      ConfigError: any problem, before anything is written (also a point folder holding a run of another config).
    """
    path, axes = read_spec(config, axes)
    grid, fixed = parse_axes(axes)
    points = grid_points(grid)
    configs = [load_config(path, fixed + list(p.overrides)) for p in points]
    checked = set()
    for p, cfg in zip(points, configs, strict=True):
        if p.group not in checked:
            checked.add(p.group)
            _try_build(cfg, path)
    if sweep_dir is None:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read() + "\n".join(axes).encode()).hexdigest()[:8]
        stem = os.path.splitext(os.path.basename(path))[0]
        sweep_dir = os.path.join(configs[0].logging.root, f"sweep-{stem}-{digest}")
    for p, cfg in zip(points, configs, strict=True):
        old = os.path.join(sweep_dir, p.name, "config.yaml")
        if os.path.exists(old) and _comparable(load_config(old)) != _comparable(cfg):
            raise ConfigError("--sweep-dir", f"{os.path.dirname(old)} holds a run of another config; choose another "
                              "--sweep-dir", CLI)
    return Plan(path, axes, grid, fixed, points, configs, sweep_dir)


def _comparable(cfg: Config) -> dict:
    d = to_dict(cfg)
    d.pop("logging")
    return d


def _try_build(cfg: Config, source: str) -> None:
    """Builds the run of ``cfg`` and tries its first training step abstractly (what ``train`` checks first)."""
    with precision(cfg.model.dtype):
        if cfg.estimator.name in runner.FITTERS:
            build_model(cfg, source)
            return
        exp, keys = build(cfg, source), run_keys(cfg.seed)
        make_batch = loop.batch_fn(exp, keys)
        loop.dry_run(exp, keys, loop.start(exp, keys, make_batch), make_batch, source)


def point_state(run_dir: str) -> str:
    """``"new"``, ``"done"`` (a finished run, see :data:`FINISHED`) or ``"resume"`` (a stopped run)."""
    if not os.path.exists(os.path.join(run_dir, "config.yaml")):
        return "new"
    summary = read_json(os.path.join(run_dir, "summary.json"))
    return "done" if summary and summary.get("status") in FINISHED else "resume"


# ----------------------------------------------------------------------------------------------------------
# Running points: in a subprocess, in this process, or the seeds of a group vmapped.


def run_subprocess(plan_: Plan, point: Point, run_dir: str, resume: bool, quiet: bool) -> dict:
    """Runs one point with ``python -m jbptt run`` and returns its summary (``status: failed`` with the exit code
    and the last lines of stderr when it wrote none)."""
    cmd = [sys.executable, "-m", "jbptt", "run"]
    cmd += ["--resume", run_dir] if resume else [plan_.config, *plan_.fixed, *point.overrides, "--run-dir", run_dir]
    t0 = time.time()
    with rundir.Signals() as signals:  # a SIGINT reaches the child too: it checkpoints and exits, then we stop
        proc = subprocess.Popen(cmd + (["--quiet"] if quiet else []), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE if quiet else None, text=True)  # not quiet: its progress shows
        _, err = proc.communicate()
    if signals.received is not None or proc.returncode in (130, 128 + 15):
        raise KeyboardInterrupt
    summary = read_json(os.path.join(run_dir, "summary.json"))
    if summary and os.path.getmtime(os.path.join(run_dir, "summary.json")) >= t0 - 1:
        return summary
    tail = "\n".join(err.strip().splitlines()[-3:]) if err else "see its output above"
    return {"status": "failed", "run_dir": run_dir, "message": f"exit code {proc.returncode}: {tail}"}


def run_inline(cfg: Config, run_dir: str, resume: bool, source: str, quiet: bool = True) -> dict:
    """Runs one point in this process with :func:`~jbptt.experiment.runner.train`."""
    try:
        summary = runner.train(cfg, run_dir, resume=resume, quiet=quiet, source=source)
    except (ConfigError, ckpt.CheckpointError, OSError) as e:
        return {"status": "failed", "run_dir": run_dir, "message": f"{type(e).__name__}: {e}"}
    if summary["status"] == "interrupted":
        raise KeyboardInterrupt
    return summary


def vmap_blocker(cfg: Config) -> str | None:
    """Why the seeds of ``cfg`` cannot train vmapped in one program (``None``: they can)."""
    t = cfg.training
    if cfg.estimator.name in runner.FITTERS:
        return f"estimator {cfg.estimator.name!r} is fitted, not trained step by step"
    if cfg.parallel.mode != "none":
        return f"parallel.mode is {cfg.parallel.mode!r}"
    if getattr(t, "chunk", None) is not None or getattr(t, "stateful_stream", False):
        return "training.chunk / stateful_stream use the runner's segment loop"
    if getattr(cfg.logging, "tensorboard", False):
        return "logging.tensorboard is on"
    return None


@jax.jit
def _take_at(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def _take(i: int):
    """``gather(stacked) -> tree``: seed ``i``'s slice (one compiled program for every seed)."""
    return lambda tree: _take_at(tree, jnp.asarray(i, jnp.int32))


@jax.jit
def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def train_vmapped(cfgs: list[Config], run_dirs: list[str], source: str = "<config>", quiet: bool = True) -> list:
    """Trains the configs ``cfgs`` (equal but for ``seed``) side by side, ``jax.vmap`` over seeds, into the new
    run folders ``run_dirs``; returns their summaries. Every seed's folder holds what ``train`` writes for it alone
    (metrics, checkpoints, summary; equal up to float rounding of the batched operations).

    Raises:
      ValueError: the seeds' initial states differ in shape (their estimator's state depends on the seed).
    """
    with precision(cfgs[0].model.dtype):
        return _train_vmapped(cfgs, run_dirs, source, quiet)


def _train_vmapped(cfgs, run_dirs, source, quiet):
    exp, t, lg = build(cfgs[0], source), cfgs[0].training, cfgs[0].logging  # the seed changes nothing built
    keys = [run_keys(c.seed) for c in cfgs]
    templates = []
    for k in keys:
        make_batch = loop.batch_fn(exp, k)
        templates.append(loop.dry_run(exp, k, loop.start(exp, k, make_batch), make_batch, source))
    state = _stack([tpl[0] for tpl in templates])
    train_step = make_train_step(exp.estimator, exp.optimizer)
    step_fn = jax.jit(jax.vmap(lambda st, k, i: train_step(st, loop.batch_fn(exp, k)(i)), in_axes=(0, 0, None)))
    eval_fn, sessions, flows = make_eval_fn(exp), [], []
    for i, (cfg, k, (_, book, best)) in enumerate(zip(cfgs, keys, templates, strict=True)):
        run_dir = rundir.open_run_dir(cfg, run_dirs[i])
        evaluate = loop.make_split_evaluator(exp, "val", k.eval, eval_fn, source)
        sess = loop.Session(exp, loop.Loop(None, None, _take(i)), run_dir, True, book, best, evaluate,
                            rundir.MetricsLog(run_dir), time.monotonic())
        flow = make_gradient_flow(exp, k.flow, lg.gradient_flow_batch) if lg.gradient_flow else None
        flows.append((flow, {"start": {"step": 0, "norms": flow(templates[i][2])}} if flow else {}))
        if flow:
            rundir.write_json(run_dir, "gradient_flow.json", flows[-1][1])
        sess.save_last(state)
        sessions.append(sess)
    outcomes, stacked_keys = [None] * len(cfgs), _stack(keys)
    progress, step, t0 = rundir.Progress(t.steps, 0, quiet), 0, time.monotonic()
    try:
        with rundir.Signals() as signals:
            while step < t.steps and None in outcomes:
                new_state, m = step_fn(state, stacked_keys, jnp.asarray(step, jnp.int32))
                losses, gnorms = (np.asarray(x, np.float64) for x in jax.device_get((m["loss"], m["grad_norm"])))
                for i, sess in enumerate(sessions):
                    if outcomes[i] is None:
                        outcomes[i] = loop.nonfinite(sess, None, step, float(losses[i]), float(gnorms[i]))
                state, step = new_state, step + 1
                progress.update(step, float(np.nanmean(losses)) if np.isfinite(losses).any() else float("nan"))
                for i, sess in enumerate(sessions):
                    if outcomes[i] is None:
                        out = loop.after_step(sess, state, step, float(losses[i]), float(gnorms[i]))
                        early = out is not None and out.status == "early_stopped"
                        outcomes[i] = out and out._replace(state=sess.loop.gather(state) if early else None)
                if signals.received is not None:
                    for i, sess in enumerate(sessions):
                        if outcomes[i] is None:
                            sess.save_last(state)
                            outcomes[i] = loop.Outcome("interrupted", f"signal {signals.received} received: "
                                                       f"checkpoint saved at step {step}", step, None, float("nan"),
                                                       int(signals.received))
        outcomes = [o or loop.Outcome("completed", None, step, _take(i)(state), float(losses[i]))
                    for i, o in enumerate(outcomes)]
        progress.update(step, float(np.nanmean(losses)), force=True)
    finally:
        progress.close()
        for sess in sessions:
            sess.log.close()
    rate = step / max(time.monotonic() - t0, 1e-9)
    test = lambda k: lambda: loop.make_split_evaluator(exp, "test", jax.random.fold_in(k.eval, 1), eval_fn, source)
    return [loop.finish(sess, out, out.state if out.status in ("completed", "early_stopped") else None, test(k),
                        flow, dict(profiles), rate)
            for sess, out, k, (flow, profiles) in zip(sessions, outcomes, keys, flows, strict=True)]


# ----------------------------------------------------------------------------------------------------------
# The sweep: run what is missing, aggregate, report.


def run_sweep(config: str, axes=(), *, parallel: str = "auto", sweep_dir: str | None = None, quiet: bool = True,
              subprocesses: bool = True) -> dict:
    """Runs (or continues) the sweep of ``config`` over ``axes`` and returns what ``sweep.json`` holds.

    Args:
      config: a run config (YAML) or a ``.sweep`` file. axes: ``key=v1,v2``, ``key=a..b`` or ``key=value`` texts.
      parallel: ``auto``/``vmap`` (seeds vmapped where :func:`vmap_blocker` allows) or ``process``.
      sweep_dir: the sweep folder (default: derived from the config file's contents and the axes).
      subprocesses: False runs the points that are not vmapped in this process (``runner.train``), not in
        ``python -m jbptt run`` subprocesses (a crash then ends the sweep).

    Returns:
      ``{"points": [...], "groups": [...], "complete": bool, "sweep_dir": ..., ...}`` (see the module docstring).

    Raises:
      ConfigError: a bad axis or point (nothing written) or a sweep folder in use by another process.
      KeyboardInterrupt: SIGINT/SIGTERM stopped a point (it checkpointed; the same call continues the sweep).
    """
    if parallel not in ("auto", "vmap", "process"):
        raise ConfigError("--parallel", f"must be auto, vmap or process, got {parallel!r}", CLI)
    p = plan(config, axes, sweep_dir)
    try:
        os.makedirs(p.sweep_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError("--sweep-dir", f"cannot create {p.sweep_dir}: {e.strerror or e}", CLI) from None
    with rundir.run_lock(p.sweep_dir):
        return _run(p, parallel, quiet, subprocesses)


def _run(p: Plan, parallel: str, quiet: bool, subprocesses: bool) -> dict:
    t0, records = time.monotonic(), {}

    def say(msg: str, always: bool = False):
        if always or not quiet:
            print(msg, file=sys.stderr, flush=True)

    def done(i: int, summary: dict, mode: str):
        records[p.points[i].name] = record(p.points[i], summary, mode)
        r = records[p.points[i].name]
        say(f"{p.points[i].name}: {r['status']}" + (f", val {r['metric']} {r['final_val']:.4g}"
            if r["final_val"] is not None else "") + (f" ({r['message']})" if r["status"] == "failed" else ""))

    groups: dict[str, list[int]] = {}
    for i, pt in enumerate(p.points):
        groups.setdefault(pt.group, []).append(i)
    try:
        for idx in groups.values():
            dirs = {i: os.path.join(p.sweep_dir, p.points[i].name) for i in idx}
            todo = []
            for i in idx:
                if point_state(dirs[i]) == "done":
                    summary = read_json(os.path.join(dirs[i], "summary.json"))
                    records[p.points[i].name] = record(p.points[i], summary, "earlier")
                else:
                    todo.append(i)
            new = [i for i in todo if point_state(dirs[i]) == "new"]
            why = vmap_blocker(p.configs[new[0]]) if len(new) > 1 and parallel != "process" else "process mode"
            if why is None:
                try:
                    summaries = train_vmapped([p.configs[i] for i in new], [dirs[i] for i in new], p.config, quiet)
                except ValueError as e:  # seed-dependent state shapes: the seeds go one by one
                    why = f"{type(e).__name__}: {e}"
                else:
                    if any(s["status"] == "interrupted" for s in summaries):
                        raise KeyboardInterrupt
                    for i, s in zip(new, summaries, strict=True):
                        done(i, s, "vmap")
                    todo = [i for i in todo if i not in new]
            if why not in (None, "process mode") and len(new) > 1:
                say(f"note: {p.points[new[0]].group}: seeds not vmapped ({why}); running them one by one",
                    always=parallel == "vmap")
            for i in todo:
                resume = point_state(dirs[i]) == "resume"
                if subprocesses:
                    done(i, run_subprocess(p, p.points[i], dirs[i], resume, quiet), "process")
                else:
                    done(i, run_inline(p.configs[i], dirs[i], resume, p.config, quiet), "inline")
                write_reports(p, records, parallel, time.monotonic() - t0, figures=False)
            write_reports(p, records, parallel, time.monotonic() - t0, figures=False)
    finally:
        result = write_reports(p, records, parallel, time.monotonic() - t0, figures=True)
    return result


def run_cli(args) -> int:
    """``jbptt sweep``: ``args.config``, ``args.axes``, ``args.parallel``, ``args.sweep_dir``, ``args.quiet``.
    Returns the exit code: 0 every point finished (completed or early stopped), 1 a point failed or halted, 2 a bad
    config or axis (nothing written), 130 interrupted (the same command continues the sweep)."""
    try:
        result = run_sweep(args.config, args.axes, parallel=args.parallel or "auto", sweep_dir=args.sweep_dir,
                           quiet=args.quiet)
    except ConfigError as e:
        print(f"jbptt: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jbptt: sweep interrupted; run the same command again to continue it", file=sys.stderr)
        return 130
    with open(os.path.join(result["sweep_dir"], "sweep.md")) as f:
        print(f.read(), end="")
    print(f"sweep folder: {result['sweep_dir']}")
    return 0 if all(r["status"] in FINISHED[:2] for r in result["points"]) else 1
