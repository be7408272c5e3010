"""The ``jbptt`` command line (also ``python -m jbptt``).

    jbptt run CONFIG [key.path=value ...] [--run-dir DIR [--overwrite]] [--quiet] [--print-config]
    jbptt run --resume RUN_DIR [training.steps=N ...] [--quiet] [--print-config]
    jbptt sample RUN_DIR [--prompt TEXT] [--length N] [--temperature T] [--seed S] [--checkpoint last|best]
    jbptt plot RUN_DIR [RUN_DIR ...] [--out FILE.png|.pdf|.svg] [--metric NAME]
    jbptt sweep CONFIG [key=v1,v2 ...] [seed=0..4] [key=value ...] [--parallel auto|vmap|process] [--sweep-dir DIR]
                [--quiet]             (a grid of runs, :mod:`~jbptt.experiment.sweep`)
    jbptt compare ...                 (the estimator-comparison harness, :mod:`~jbptt.experiment.compare`)

Exit codes: 0 success (also early stopping), 1 a run halted on a NaN/Inf (also after ``training.max_consecutive_skips``
skipped steps) or a bad checkpoint, 2 a bad config or bad arguments (nothing is written: option values are tried
before the run folder is opened; an existing run in ``--run-dir`` needs ``--overwrite``; a run being resumed by
another process is refused), 128 + signal number when SIGINT/SIGTERM stopped a run (after checkpointing; 130 for a
SIGINT before the training loop, a run folder then resumable from its step-0 checkpoint).

Precision: ``run`` and ``compare`` scope ``jax_enable_x64`` to each run's ``model.dtype`` themselves; ``sample``
runs the whole command inside that scope (:func:`jbptt.experiment.build.precision`). No command switches it for
the process.

Start-up: this module imports the experiment layer (and with it JAX) only inside the command that needs it, and the
package root is lazy, so ``--help``, ``--version``, argument errors and config errors (parsing and
:func:`~jbptt.experiment.config.validate`, which checks names against :mod:`jbptt.names`) answer without loading JAX
(about 0.2 s; ``tests/test_startup.py``). Errors found by trying option values on the model load it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

RESUME_OVERRIDABLE = (
    "training.steps",
    "training.patience",
    "training.eval_every",
    "training.checkpoint_every",
    "training.keep_checkpoints",
    "logging.",
    "parallel.coordinator_address",  # how the processes of a multi-process run are launched
    "parallel.num_processes",
    "parallel.process_id",
)


def _err(msg: str, code: int) -> int:
    print(f"jbptt: {msg}", file=sys.stderr)
    return code


def _run(args) -> int:
    from jbptt.experiment.config import ConfigError, dump_config, load_config

    try:  # parsing and validating a config needs no JAX: config errors answer at once
        if args.resume:
            if args.run_dir is not None or args.overwrite:
                return _err("--resume continues the run in its own folder: it takes no --run-dir or --overwrite", 2)
            if args.config is not None:
                args.overrides.insert(0, args.config)
            bad = [o for o in args.overrides if not o.split("=", 1)[0].startswith(RESUME_OVERRIDABLE)]
            if bad:
                raise ConfigError(
                    bad[0].split("=", 1)[0],
                    f"cannot be changed when resuming (only {', '.join(RESUME_OVERRIDABLE)}* can)",
                    "<command line>",
                )
            source = os.path.join(args.resume, "config.yaml")
            if not os.path.exists(source):
                return _err(f"{args.resume} is not a run folder (no config.yaml)", 2)
        elif args.config is None:
            return _err("run needs a CONFIG file (or --resume RUN_DIR)", 2)
        else:
            source = args.config
        cfg = load_config(source, args.overrides)
    except ConfigError as e:
        return _err(f"config error: {e}", 2)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    return _train(cfg, args, source)


def _train(cfg, args, source: str) -> int:
    """Trains a parsed config (loads JAX and the library); returns the exit code."""
    from jbptt.checkpoint import CheckpointError
    from jbptt.experiment.config import ConfigError
    from jbptt.experiment.runner import STATUS_EXIT_CODES, train

    try:
        summary = train(cfg, args.resume or args.run_dir, resume=bool(args.resume), quiet=args.quiet, source=source,
                        overwrite=args.overwrite)
    except ConfigError as e:  # option values tried on the model, a run folder in the way
        return _err(f"config error: {e}", 2)
    except CheckpointError as e:
        return _err(f"checkpoint error: {e}", 1)
    except OSError as e:  # a disk that fills up or turns read-only during the run
        return _err(f"cannot write: {e}", 1)
    except KeyboardInterrupt:  # SIGINT before the training loop handles it (start-up, compilation)
        return _err("interrupted (SIGINT) outside the training loop; a run folder already written can be "
                    "continued with `jbptt run --resume RUN_DIR` (from step 0 if it has no checkpoint yet)", 130)
    print(_describe(summary))
    if summary.get("message"):
        print(summary["message"], file=sys.stderr)
    if summary["status"] == "interrupted":
        return 128 + int(summary.get("signal", 15))
    return STATUS_EXIT_CODES.get(summary["status"], 1)


def _describe(summary: dict) -> str:
    parts = [
        f"run {summary['run_dir']}: {summary['status']} after {summary['steps']} steps "
        f"in {summary['wall_time_s']:.1f} s"
    ]
    metric = summary.get("metric")
    final = summary.get("final")
    if final and metric:
        parts.append(f"val {metric} {final['val'][metric]:.4g}, test {metric} {final['test'][metric]:.4g}")
    return "; ".join(parts)


def _sample(args) -> int:
    import jax

    from jbptt.checkpoint import CheckpointError
    from jbptt.experiment.build import precision
    from jbptt.experiment.config import ConfigError, load_config
    from jbptt.experiment.runner import load_run
    from jbptt.experiment.sampling import generate
    from jbptt.tasks import text

    if args.length < 1 or args.temperature <= 0:
        return _err("--length must be >= 1 and --temperature > 0", 2)
    path = os.path.join(args.run_dir, "config.yaml")
    if not os.path.exists(path):
        return _err(f"checkpoint error: {args.run_dir} is not a run folder (no config.yaml)", 1)
    try:
        dtype = load_config(path).model.dtype
        with precision(dtype):  # the run's arrays in the run's dtype, for the whole command
            cfg, exp, state = load_run(args.run_dir, args.checkpoint)
            if "vocab" not in exp.task.info:
                return _err(f"sample needs a character-level model; this run's task is {cfg.task.name!r}", 2)
            params = state if args.checkpoint == "best" else state.params
            prompt = args.prompt or "\n"
            ids = generate(exp.cell, params, text.encode(prompt), args.length, jax.random.key(args.seed),
                           vocab_size=len(text.VOCAB), temperature=args.temperature)
    except ConfigError as e:
        return _err(f"config error: {e}", 2)
    except CheckpointError as e:
        return _err(f"checkpoint error: {e}", 1)
    print(prompt + text.decode(ids))
    return 0


def _plot(args) -> int:
    from jbptt.checkpoint import CheckpointError
    from jbptt.experiment import plots

    for d in args.run_dirs:
        if not os.path.exists(os.path.join(d, "metrics.jsonl")):
            return _err(f"{d} is not a run folder (no metrics.jsonl)", 2)
    out = args.out or (os.path.join(args.run_dirs[0], "curves.png") if len(args.run_dirs) == 1 else "runs.png")
    try:
        plots.plot_runs(args.run_dirs, out, metric=args.metric)
    except CheckpointError as e:
        return _err(f"checkpoint error: {e}", 1)
    except ValueError as e:  # --out with another extension, --metric a run does not have
        return _err(str(e), 2)
    written = [out]
    if len(args.run_dirs) == 1:
        flow = plots.plot_gradient_flow(args.run_dirs[0], os.path.join(args.run_dirs[0], "gradient_flow.png"))
        written += [flow] if flow else []
    print("\n".join(written))
    return 0


def _decode(args) -> int:
    from jbptt.experiment import decode

    return decode.run_cli(args)


def _sweep(args) -> int:
    try:
        sweep = importlib.import_module("jbptt.experiment.sweep")
    except ImportError as e:
        return _err(f"sweep is not available ({e})", 1)
    return sweep.run_cli(args)


def parser() -> argparse.ArgumentParser:
    from jbptt import __version__  # the package root is lazy: this loads nothing else

    p = argparse.ArgumentParser(prog="jbptt", description="Train and study RNNs with BPTT and its alternatives.")
    p.add_argument("--version", action="version", version=f"jbptt {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train from a YAML config (or resume a run)")
    r.add_argument("config", nargs="?", help="YAML config file")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=3e-4 model.hidden=128")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    r.add_argument("--run-dir", help="run folder (default: <logging.root>/<name>-<timestamp>)")
    r.add_argument("--overwrite", action="store_true", help="replace the run already in --run-dir (if any)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--print-config", action="store_true",
                   help="print the resolved config (YAML, overrides applied) and exit without running")
    s = sub.add_parser("sample", help="generate text from a character-level run",
                       description="Generates text from the model of a character-level run (task chars): the prompt, "
                       "then LENGTH characters drawn one at a time from the model's softmax, and prints it.")
    s.add_argument("run_dir", metavar="RUN_DIR", help="run folder of a character-level run (task chars)")
    s.add_argument("--prompt", default="", help="text the generated characters continue (default: a newline)")
    s.add_argument("--length", type=int, default=200, help="number of characters to generate (default: 200)")
    s.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature > 0: below 1 more likely characters, above 1 more varied (default: 1)")
    s.add_argument("--seed", type=int, default=0, help="random seed of the sampling; the same seed gives the same "
                   "text (default: 0)")
    s.add_argument("--checkpoint", choices=("last", "best"), default="last",
                   help="the last checkpoint (default) or the one with the best validation metric")
    pl = sub.add_parser("plot", help="overlay the curves of one or more runs",
                        description="Plots the training loss and the validation metric of runs, overlaid: one "
                        "validation panel per metric (runs of different tasks get their own), loss-like metrics on a "
                        "log axis, a task's baseline as a dashed line.")
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders")
    pl.add_argument("--out", help="output file, .png, .pdf or .svg (default: RUN_DIR/curves.png for one run, "
                    "runs.png for several)")
    pl.add_argument("--metric", help="validation metric to plot (default: each run's headline metric)")
    sw = sub.add_parser("sweep", help="run a grid of configs (seeds, values) and summarise it",
                        description="Runs CONFIG at every point of the grid the axes span, one run folder per point, "
                        "and writes sweep.json, sweep.md and an overlay plot; the same command again continues a "
                        "sweep that was stopped.")
    sw.add_argument("config", help="YAML config file")
    sw.add_argument("axes", nargs="*", help="axes: key=v1,v2 (a list of values), seed=0..4 (a range), or key=value "
                    "(a fixed override for every point)")
    sw.add_argument("--parallel", choices=("auto", "vmap", "process"), default="auto",
                    help="vmap: all seeds of a point in one program; process: one process per run; auto (default): "
                    "vmap where the config allows it")
    sw.add_argument("--sweep-dir", default=None, help="sweep folder (default: under logging.root)")
    sw.add_argument("--quiet", action="store_true", help="no progress output")
    d = sub.add_parser("decode", help="reference vs hypothesis of a speech (CTC) or translation run's test items",
                       description="Decodes N items of a run trained with the CTC loss (speech_digits) and prints "
                       "reference, hypothesis and edit distance per item, with the label error rate over them; of "
                       "a translation run (translate, an encoder-decoder): source, reference and hypothesis per "
                       "item, with the exact match over them and by reference length.")
    d.add_argument("run_dir", metavar="RUN_DIR", help="run folder of a CTC or translation run")
    d.add_argument("--n", type=int, default=10, help="number of items (default: 10)")
    d.add_argument("--split", choices=("test", "val", "train"), default="test", help="data split (default: test)")
    d.add_argument("--beam", type=int, default=0, help="beam width (CTC: prefix beam search; translation: beam "
                   "search); 0 (default): greedy decoding")
    d.add_argument("--checkpoint", choices=("last", "best"), default="best",
                   help="the checkpoint with the best validation metric (default) or the last one")
    d.add_argument("--seed", type=int, default=0, help="which items are drawn (default: 0)")
    d.add_argument("--plot", metavar="FILE", help="also draw the first item's log-mel features with the CTC "
                   "posteriors under them, or for translation its attention map (.png, .pdf or .svg)")
    sub.add_parser("compare", help="compare gradient estimators (jbptt.experiment.compare)", add_help=False)
    return p


def main(argv=None) -> int:
    """Entry point of the ``jbptt`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        from jbptt.experiment import compare

        return compare.main(argv[1:]) or 0
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad arguments, 0 for --help
        return int(e.code or 0)
    try:
        return {"run": _run, "sample": _sample, "plot": _plot, "sweep": _sweep, "decode": _decode}[args.command](args)
    except KeyboardInterrupt:  # SIGINT while importing or loading: one line, no traceback
        return _err("interrupted (SIGINT)", 130)


if __name__ == "__main__":
    sys.exit(main())
