"""Experiment configs: YAML files read with ``yaml.safe_load`` into typed dataclasses, with dotted overrides.

A config has the sections ``task``, ``model``, ``estimator``, ``optimizer``, ``training``, ``logging``, ``remat``,
``parallel`` and a top-level ``seed``; only ``task.name`` is required::

    task: {name: adding, options: {length: 50}}
    model: {cell: lstm, hidden: 64}               # fused: auto (the default) attaches the fused fast path
    estimator: {name: bptt, options: {}}          # options go to make_estimator(name, cell, loss, **options)
    optimizer: {name: adam, lr: 3e-3, clip_norm: 1.0}
    training: {steps: 1500, batch_size: 64, eval_every: 100}

Every problem (an unknown key, a wrong type, a missing required field, an impossible value) raises one
:class:`ConfigError` whose message names the file and the dotted key path. :func:`load_config` also accepts
overrides like ``optimizer.lr=3e-4`` (values parsed as YAML). :func:`to_dict` gives the resolved config, which
:func:`load_config` reads back to an equal config.
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from jbptt.names import cell_names, task_names


class ConfigError(ValueError):
    """A bad config; ``str(err)`` is ``"<file>: <key.path>: <problem>"``."""

    def __init__(self, path: str, problem: str, source: str = "<config>"):
        self.path, self.problem, self.source = path, problem, source
        super().__init__(f"{source}: {path or '<top level>'}: {problem}")


@dataclass
class TaskConfig:
    """``name`` of a task in :data:`jbptt.tasks.TASKS` and its ``options`` (keyword arguments)."""

    name: str
    options: dict = field(default_factory=dict)


@dataclass
class ModelConfig:
    """The cell: ``layers`` copies of ``CELLS[cell](hidden, dtype=dtype, **options)``, stacked, plus a readout.

    ``fused``: ``auto`` (default) builds each layer with :func:`jbptt.fused.cell`, the same cell with its fused
    whole-sequence fast path where one exists (Elman, LSTM, GRU); ``none`` (or ``false``) builds the plain
    :data:`jbptt.cells.CELLS` cell. Both compute the same function.

    ``dtype: float64`` runs the whole run with ``jax_enable_x64`` on, scoped to the run (``jax.enable_x64``, see
    :func:`jbptt.experiment.build.precision`); nothing is switched for the rest of the process.

    ``bidirectional``: ``true`` makes every layer bidirectional (a forward and a backward cell of ``hidden`` units
    each, outputs concatenated), or a list of ``layers`` booleans, one per layer.

    ``attention``: for an encoder-decoder (a task with the ``seq2seq`` loss, :mod:`jbptt.experiment.translation`),
    the width of the additive attention over the encoder outputs; ``null`` (default): no attention.
    """

    cell: str = "lstm"
    hidden: int = 64
    layers: int = 1
    options: dict = field(default_factory=dict)
    dropout: float = 0.0
    residual: bool = False
    learned_initial_carry: bool = False
    fused: bool | str = "auto"
    dtype: str = "float32"
    bidirectional: bool | list = False
    attention: int | None = None


@dataclass
class EstimatorConfig:
    """A registered gradient estimator (``bptt``, ``tbptt``, ...; ``options`` go to
    :func:`~jbptt.estimator.make_estimator`) or a closed-form fitter of :data:`jbptt.experiment.runner.FITTERS`
    (``esn``: ridge regression of the readout)."""

    name: str = "bptt"
    options: dict = field(default_factory=dict)


@dataclass
class OptimizerConfig:
    """An optax optimizer by name with a learning-rate schedule, clipping, weight decay and L1/L2 penalties.

    ``schedule``: ``constant``, ``cosine`` (to ``end_lr_fraction * lr`` at the last step), ``warmup`` (linear from 0
    over ``warmup_steps``, then constant) or ``warmup_cosine``. ``weight_decay`` is decoupled for ``adamw`` and added
    to the gradient (L2) otherwise; ``l1``/``l2`` add ``l1 * |p|_1 + l2 / 2 * |p|^2`` to the objective through the
    gradient. ``options`` go to the optax constructor (e.g. ``b1``, ``eps``).
    """

    name: str = "adam"
    lr: float = 1e-3
    schedule: str = "constant"
    warmup_steps: int = 0
    end_lr_fraction: float = 0.0
    momentum: float = 0.9
    clip_norm: float | None = None
    clip_value: float | None = None
    weight_decay: float = 0.0
    l1: float = 0.0
    l2: float = 0.0
    options: dict = field(default_factory=dict)


@dataclass
class TrainingConfig:
    """Steps, batches, evaluation, early stopping (``patience`` evaluations without improvement of the task's
    headline metric on the validation split), checkpointing, and what a NaN/Inf does (``halt`` or
    ``skip``; a skipping run halts after ``max_consecutive_skips`` skipped steps in a row). A NaN/Inf validation
    metric always halts the run before anything is saved. A run checkpoints at step 0 and every
    ``checkpoint_every`` steps; ``keep_checkpoints: N`` keeps the last N of them (``last.msgpack`` and
    ``step-<step>.msgpack``), and a resume whose last checkpoint is corrupt falls back to the newest good one.

    ``chunk: K`` feeds each batch to the estimator in consecutive chunks of ``K`` steps with one optimizer step per
    chunk, the estimator's state crossing chunks (truncated BPTT over a sequence, online learning with an update
    every ``K`` steps); ``stateful_stream: true`` makes the chunks consecutive pieces of the task's stream, the state
    crossing batches too (tasks that provide a stream)."""

    steps: int = 1000
    batch_size: int = 64
    eval_every: int = 100
    eval_batch_size: int = 256
    eval_batches: int = 1
    patience: int | None = None
    min_delta: float = 0.0
    checkpoint_every: int = 500
    on_nan: str = "halt"
    max_consecutive_skips: int = 10
    keep_checkpoints: int = 1
    chunk: int | None = None
    stateful_stream: bool = False


@dataclass
class LoggingConfig:
    """Run folder ``<root>/<name>-<timestamp>/`` (``name`` defaults to the config file's stem), the logging
    interval (losses averaged over it), plots, and the gradient-flow profile's batch size. ``tensorboard: true``
    also writes TensorBoard event files (optional extra ``jbptt[tensorboard]``); ``metrics.jsonl`` stays the source of
    truth."""

    root: str = "runs"
    name: str | None = None
    log_every: int = 10
    plots: bool = True
    gradient_flow: bool = True
    gradient_flow_batch: int = 32
    tensorboard: bool = False


@dataclass
class RematConfig:
    """Rematerialisation schedule (:mod:`jbptt.remat`): ``policy`` plus free-form keys passed along with
    it."""

    policy: str = "none"
    options: dict = field(default_factory=dict)


@dataclass
class ParallelConfig:
    """Data parallelism (:mod:`jbptt.parallel`): ``mode`` ``none``, ``pmap`` or ``sharded``; ``devices``
    ``auto`` or a count."""

    mode: str = "none"
    devices: int | str = "auto"
    # Multi-process (jax.distributed): unset values come from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    # JAX_PROCESS_ID or cluster auto-detection (see jbptt.parallel.initialize_distributed).
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclass
class Config:
    """A whole experiment (see the module docstring)."""

    task: TaskConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    remat: RematConfig = field(default_factory=RematConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 0


OPEN_SECTIONS = (RematConfig,)
"""Sections whose unknown keys are collected into ``options`` (their owning module validates them)."""

OPTIMIZER_NAMES = ("sgd", "momentum", "nesterov", "adam", "adamw", "adagrad", "adadelta", "rmsprop")
SCHEDULES = ("constant", "cosine", "warmup", "warmup_cosine")


# ----------------------------------------------------------------------------------------------------------
# Parsing.


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return {type(None): "null", dict: "mapping", list: "list"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value, tp, path: str, source: str):
    """Checks ``value`` against the annotation ``tp`` (int, float, str, bool, dict, unions with None)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, path, source)
            except ConfigError:
                continue
        raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}", source)
    if dataclasses.is_dataclass(tp):
        return parse_section(tp, value, path, source)
    ok = {
        type(None): value is None,
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
        list: isinstance(value, list),
        float: isinstance(value, int | float) and not isinstance(value, bool),
    }[tp]
    if tp is float and isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not ok:
        raise ConfigError(path, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}", source)
    return float(value) if tp is float else value


def parse_section(cls, raw, path: str, source: str):
    """Parses the mapping ``raw`` into the config dataclass ``cls`` (``path``: its dotted key, for errors)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(path, f"expected a mapping, got {type(raw).__name__} {raw!r}", source)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    raw = dict(raw)
    if cls in OPEN_SECTIONS:
        extra = {k: raw.pop(k) for k in list(raw) if k not in fields}
        raw["options"] = {**(raw.get("options") or {}), **extra}
    kwargs = {}
    for key, value in raw.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(sub, f"unknown key; {path or 'the top level'} accepts {sorted(fields)}", source)
        kwargs[key] = _coerce(value, hints[key], sub, source)
    for name, f in fields.items():
        if (
            name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            raise ConfigError(f"{path}.{name}" if path else name, "required field is missing", source)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optimizer.lr=3e-4"`` -> ``(["optimizer", "lr"], 3e-4)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(text, "an override must look like key.path=value", "<command line>")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(key, "empty key in override", "<command line>")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(key, f"cannot parse the value {value!r}: {e}", "<command line>") from None
    return parts, parsed


def apply_overrides(raw: dict, overrides, source: str = "<command line>") -> dict:
    """Returns a copy of the raw config dict with ``key.path=value`` overrides applied (nested dicts
    created)."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(
                    ".".join(parts[: i + 1]), f"is {nxt!r}, not a section; cannot set {text!r}", source
                )
            node = nxt
        node[parts[-1]] = value
    return raw


def parse_config(raw, source: str = "<config>") -> Config:
    """A :class:`Config` from a raw dict (as read from YAML), type-checked and validated."""
    cfg = parse_section(Config, raw, "", source)
    validate(cfg, source)
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice (YAML itself keeps the last one)."""


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, mark):
        self.key, self.mark = key, mark
        super().__init__(f"duplicate key {key!r} at line {mark.line + 1}")


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise _DuplicateKey(key, key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(path: str, source: str | None = None):
    """The YAML file at ``path`` parsed safely, refusing duplicate keys.

    Raises:
      ConfigError: the file is missing, not valid YAML, or repeats a key in one mapping.
    """
    source = source or str(path)
    try:
        with open(path) as f:
            return yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except FileNotFoundError:
        raise ConfigError("", "file not found", source) from None
    except _DuplicateKey as e:
        raise ConfigError(str(e.key), f"duplicate key (line {e.mark.line + 1}); YAML would silently keep the last "
                          "value", source) from None
    except yaml.YAMLError as e:
        raise ConfigError("", f"invalid YAML: {e}", source) from None


def load_config(path: str, overrides=(), *, source: str | None = None) -> Config:
    """Reads a YAML config file, applies dotted overrides and returns the validated :class:`Config`."""
    source = source or str(path)
    raw = read_yaml(path, source)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("", f"the file must hold a mapping, got {type(raw).__name__}", source)
    raw = apply_overrides(raw, overrides, source)
    cfg = parse_config(raw, source)
    if cfg.logging.name is None:
        cfg.logging.name = pathlib.Path(path).stem
    return cfg


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain dicts (what ``config.yaml`` in a run folder holds)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ----------------------------------------------------------------------------------------------------------
# Value checks (types are checked by the parser).


def validate(cfg: Config, source: str = "<config>") -> None:
    """Raises :class:`ConfigError` for impossible values (names of tasks/cells/optimizers, ranges)."""

    def need(ok: bool, path: str, problem: str):
        if not ok:
            raise ConfigError(path, problem, source)

    tasks, cells = task_names(), cell_names()
    need(cfg.task.name in tasks, "task.name", f"unknown task {cfg.task.name!r}; choose from {list(tasks)}")
    need(cfg.model.cell in cells, "model.cell", f"unknown cell {cfg.model.cell!r}; choose from {list(cells)}")
    need(cfg.model.hidden >= 1, "model.hidden", f"must be >= 1, got {cfg.model.hidden}")
    need(cfg.model.layers >= 1, "model.layers", f"must be >= 1, got {cfg.model.layers}")
    need(cfg.model.attention is None or cfg.model.attention >= 1, "model.attention",
         f"must be >= 1 (or null for none), got {cfg.model.attention}")
    need(0.0 <= cfg.model.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {cfg.model.dropout}")
    need(
        cfg.model.fused in ("auto", "none", True, False),
        "model.fused",
        f"must be auto, none or false, got {cfg.model.fused!r}",
    )
    need(
        cfg.model.dtype in ("float32", "float64"),
        "model.dtype",
        f"must be float32 or float64, got {cfg.model.dtype!r}",
    )
    o = cfg.optimizer
    need(
        o.name in OPTIMIZER_NAMES,
        "optimizer.name",
        f"unknown optimizer {o.name!r}; choose from {list(OPTIMIZER_NAMES)}",
    )
    need(o.lr > 0, "optimizer.lr", f"must be > 0, got {o.lr}")
    need(
        o.schedule in SCHEDULES,
        "optimizer.schedule",
        f"unknown schedule {o.schedule!r}; choose from {list(SCHEDULES)}",
    )
    need(o.warmup_steps >= 0, "optimizer.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    need(
        not o.schedule.startswith("warmup") or o.warmup_steps > 0,
        "optimizer.warmup_steps",
        f"schedule {o.schedule!r} needs warmup_steps > 0",
    )
    need(
        0.0 <= o.end_lr_fraction <= 1.0,
        "optimizer.end_lr_fraction",
        f"must be in [0, 1], got {o.end_lr_fraction}",
    )
    for name in ("clip_norm", "clip_value"):
        v = getattr(o, name)
        need(v is None or v > 0, f"optimizer.{name}", f"must be > 0 (or null for none), got {v}")
    for name in ("weight_decay", "l1", "l2"):
        need(getattr(o, name) >= 0, f"optimizer.{name}", f"must be >= 0, got {getattr(o, name)}")
    t = cfg.training
    for name in ("steps", "batch_size", "eval_every", "eval_batch_size", "eval_batches", "checkpoint_every",
                 "max_consecutive_skips", "keep_checkpoints"):
        need(getattr(t, name) >= 1, f"training.{name}", f"must be >= 1, got {getattr(t, name)}")
    need(
        t.patience is None or t.patience >= 1, "training.patience", f"must be >= 1 or null, got {t.patience}"
    )
    need(t.chunk is None or t.chunk >= 1, "training.chunk", f"must be >= 1 or null, got {t.chunk}")
    bi = cfg.model.bidirectional
    need(isinstance(bi, bool) or (len(bi) == cfg.model.layers and all(isinstance(b, bool) for b in bi)),
         "model.bidirectional", f"must be true, false or a list of {cfg.model.layers} booleans (one per layer), "
         f"got {bi!r}")
    need(t.on_nan in ("halt", "skip"), "training.on_nan", f"must be 'halt' or 'skip', got {t.on_nan!r}")
    need(cfg.logging.log_every >= 1, "logging.log_every", f"must be >= 1, got {cfg.logging.log_every}")
    need(cfg.logging.gradient_flow_batch >= 1, "logging.gradient_flow_batch", "must be >= 1")
    name = cfg.logging.name
    need(
        name is None or (name and "/" not in name and name not in (".", "..")),
        "logging.name",
        f"must be a plain folder name, got {name!r}",
    )
    need(
        cfg.parallel.mode in ("none", "pmap", "sharded"),
        "parallel.mode",
        f"must be none, pmap or sharded, got {cfg.parallel.mode!r}",
    )
    d = cfg.parallel.devices
    need(
        d == "auto" or (isinstance(d, int) and d >= 1),
        "parallel.devices",
        f"must be 'auto' or >= 1, got {d!r}",
    )
    n, pid = cfg.parallel.num_processes, cfg.parallel.process_id
    need(n is None or n >= 1, "parallel.num_processes", f"must be >= 1, got {n!r}")
    need(pid is None or (pid >= 0 and (n is None or pid < n)), "parallel.process_id",
         f"must be in [0, num_processes = {n}), got {pid!r}")
    need(n is None or n == 1 or cfg.parallel.mode != "none", "parallel.mode",
         f"is 'none' but num_processes = {n}; multi-process training needs pmap or sharded")
    need(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")
