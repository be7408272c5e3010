"""Unrolling a cell over time with ``lax.scan``: variable lengths, episode resets, reverse and bidirectional.

Inputs are batch-major: every leaf of ``xs`` is ``[B, T, ...]``. The scan runs time-major internally, and the
compiled program does not grow with ``T`` (no Python loop over time).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jbptt.batch import batch_and_time, sequence_mask, time_major
from jbptt.cells import Cell, scan_steps
from jbptt.cells.initializers import get_initializer

ScanFn = Callable[..., tuple[Any, Any]]
"""A drop-in replacement for ``lax.scan``: ``scan(body, init, xs, reverse=False, unroll=1) -> (carry, ys)``."""


class Scan(NamedTuple):
    """How :func:`unroll` walks time when the plain ``lax.scan`` is replaced (e.g. a checkpointing schedule).

    Attributes:
      steps: a :data:`ScanFn` used to scan the cell's step.
      sequence: optional ``sequence(run, carry, xs) -> (carry, ys)`` that runs a whole-sequence function
        ``run(carry, xs) -> (carry, ys)`` over time-major ``xs`` (leaves ``[T, ...]``), e.g. on checkpointed
        segments. Given it, a cell's fused fast path runs under this schedule; ``None`` means "scan the step".

    A ``Scan`` is itself a :data:`ScanFn` (calling it calls ``steps``).
    """

    steps: ScanFn
    sequence: Callable | None = None

    def __call__(self, body, init, xs, reverse: bool = False, unroll: int = 1):
        return self.steps(body, init, xs, reverse=reverse, unroll=unroll)


def _whole(run, carry, xs):
    return run(carry, xs)


def unroll(cell: Cell, params, xs, carry=None, *, seq_lengths=None, resets=None, unroll: int = 1,
           reverse: bool = False, scan: ScanFn | Scan | None = None, reverse_mode_only: bool = False,
           truncate: int | None = None):
    """Runs ``cell`` over the time axis of ``xs``.

    Args:
      cell: the :class:`~jbptt.cells.Cell`, or a whole-sequence model (:class:`Bidirectional`,
        :class:`SequenceModel`), which is applied to the whole sequence (``carry``, ``reverse`` and ``scan`` do not
        apply to it).
      params: its parameters.
      xs: batch-major inputs, a pytree with leaves ``[B, T, ...]`` (e.g. ``[B, T, I]``, or ``(x, keys)`` from
        :func:`with_step_keys` for dropout).
      carry: initial carry for batch shape ``(B,)``; default ``cell.initial_carry(params, (B,))``.
      seq_lengths: ``[B]`` ints for right-padded batches. Outputs at ``t >= seq_lengths[b]`` are zero and the
        returned carry is each sequence's carry after its last valid step.
      resets: ``[B, T]`` booleans; the carry is re-initialised (to ``cell.initial_carry``) *before* each flagged
        step, so several episodes can share one row. In reverse mode an episode starting at ``s`` is entered at its
        last step, so the carry is reset before step ``t`` when ``resets[:, t + 1]`` is set.
      unroll: ``lax.scan`` unroll factor of the step scan.
      reverse: run from the last step to the first (outputs stay in input order). With ``seq_lengths`` the
        padded steps come first and leave the carry untouched, so each sequence starts at its own last step.
      scan: a drop-in replacement for ``lax.scan``, or a :class:`Scan` (e.g. a schedule from :mod:`jbptt.remat`).
      reverse_mode_only: promise that the result is only differentiated in reverse mode (``grad``/``vjp``), so a
        fused fast path may use a ``custom_vjp`` (``jax.jvp`` through it then raises). The BPTT estimator sets it.
      truncate: ``k`` truncates the gradient every ``k`` steps: the carry entering steps ``0, k, 2k, ...`` (in scan
        order: in reverse, the carry entering step ``t`` from ``t + 1`` when ``t + 1`` is a multiple of ``k``) is
        wrapped in ``lax.stop_gradient``. Values are unchanged; ``grad`` then equals the sum over chunks of
        ``k`` steps of each chunk's gradient at a fixed incoming carry (truncated BPTT(k, k) at fixed parameters).
        The step is scanned (no fused path).

    Returns:
      ``(final_carry, ys)`` with ``ys: [B, T, output_size]``.

    The one fast path: when ``cell.fused`` is set (:mod:`jbptt.fused`), ``xs`` is a single array sharing one
    floating dtype with ``params`` and ``carry``, and ``scan`` is ``None`` or a :class:`Scan` with a ``sequence``,
    the whole sequence runs through ``cell.fused`` (same function, same masks). Otherwise ``cell.step`` is scanned.

    Safe under ``jit``, ``grad``, ``vmap`` and (without ``reverse_mode_only``) ``jvp``.
    """
    if isinstance(cell, Bidirectional | SequenceModel):
        if carry is not None and jax.tree.leaves(carry):
            raise ValueError("unroll: a whole-sequence model (bidirectional) starts from its own initial carry; "
                             "it takes no carry")
        if scan is not None or reverse:
            raise ValueError("unroll: a whole-sequence model (bidirectional layers) runs each layer's own scan: "
                             "scan= (a remat schedule) and reverse= apply to steppable cells only")
        return cell.apply(params, xs, seq_lengths=seq_lengths, resets=resets, unroll=unroll,
                          reverse_mode_only=reverse_mode_only, truncate=truncate)
    B, T = batch_and_time(xs)
    if carry is None:
        carry = cell.initial_carry(params, (B,))
    if truncate is not None:
        if truncate < 1:
            raise ValueError(f"unroll: truncate must be >= 1, got {truncate}")
        t = np.arange(T)
        cut = (t + 1) % truncate == 0 if reverse else t % truncate == 0
        cell, xs = _truncated(cell), (xs, jnp.broadcast_to(jnp.asarray(cut), (B, T)))
    _check_inputs(cell, params, xs, carry, seq_lengths, B, T)
    valid = None if seq_lengths is None else sequence_mask(seq_lengths, T).T  # [T, B]
    reset = None
    if resets is not None:
        resets = jnp.asarray(resets, bool)
        if resets.shape != (B, T):
            raise ValueError(f"unroll: resets must have shape [B, T] = {(B, T)}, got {resets.shape}")
        if reverse:
            resets = jnp.concatenate([resets[:, 1:], jnp.zeros((B, 1), bool)], axis=1)
        reset = resets.T
    flip = (lambda a: None if a is None else jax.tree.map(lambda v: jnp.flip(v, axis=0), a)) if reverse else \
        (lambda a: a)

    sequence = _whole if scan is None else scan.sequence if isinstance(scan, Scan) else None
    if truncate is None and cell.fused is not None and sequence is not None and _one_dtype(params, carry, xs):
        def run(c, inp):
            return cell.fused(params, inp[0], c, inp[1], inp[2], reverse_mode_only=reverse_mode_only)

        new_carry, ys = sequence(run, carry, flip((time_major(xs), valid, reset)))
        new_carry = jax.tree.map(lambda new, old: new.astype(old.dtype), new_carry, carry)
        return new_carry, time_major(flip(ys))

    carry, ys = scan_steps(cell, params, time_major(xs), carry, valid, reset, scan=scan or lax.scan,
                           reverse=reverse, unroll=unroll)
    return carry, time_major(ys)


def _truncated(cell: Cell) -> Cell:
    """``cell`` reading ``(x, cut)`` inputs: the incoming carry is gradient-stopped where ``cut`` is True."""

    def step(params, carry, inp):
        x, cut = inp
        carry = jax.tree.map(lambda c: jnp.where(cut.reshape(cut.shape + (1,) * (c.ndim - cut.ndim)),
                                                 lax.stop_gradient(c), c), carry)
        return cell.step(params, carry, x)

    return cell._replace(step=step, fused=None)


def _check_inputs(cell: Cell, params, xs, carry, seq_lengths, B: int, T: int):
    """One clear ``ValueError`` naming the shapes for a carry of another batch size, a step the inputs do not fit
    (e.g. a wrong input size or time-major inputs), or concrete ``seq_lengths`` outside ``[0, T]``. Under ``jit``
    the lengths are traced and not checked: lengths above ``T`` then act as ``T`` and negative ones as 0."""
    shapes = lambda tree: [tuple(jnp.shape(a)) for a in jax.tree.leaves(tree)]
    if any(jnp.ndim(a) < 1 or jnp.shape(a)[0] != B for a in jax.tree.leaves(carry)):
        raise ValueError(f"unroll: the carry (leaf shapes {shapes(carry)}) must have the batch size B = {B} of "
                         f"xs (batch-major [B, T, ...], leaf shapes {shapes(xs)})")
    x0 = jax.tree.map(lambda a: jax.ShapeDtypeStruct((B,) + jnp.shape(a)[2:], jnp.result_type(a)), xs)
    try:
        jax.eval_shape(cell.step, params, carry, x0)
    except (TypeError, ValueError) as e:
        raise ValueError(f"unroll: the cell's step does not accept one time step of xs (leaf shapes "
                         f"{shapes(x0)} from xs {shapes(xs)}, batch-major [B, T, ...]) with the carry "
                         f"{shapes(carry)}: {e}") from None
    if seq_lengths is not None:
        if jnp.shape(seq_lengths) != (B,):
            raise ValueError(f"unroll: seq_lengths must have shape [B] = {(B,)}, got {jnp.shape(seq_lengths)}")
        if not isinstance(seq_lengths, jax.core.Tracer):
            lengths = np.asarray(seq_lengths)
            if lengths.min() < 0 or lengths.max() > T:
                raise ValueError(f"unroll: seq_lengths must lie in [0, T = {T}], got {lengths.tolist()}")


def _one_dtype(params, carry, xs) -> bool:
    """True when ``xs`` is a single array and it, ``params`` and ``carry`` share one floating dtype."""
    if not jax.tree_util.treedef_is_leaf(jax.tree.structure(xs)):
        return False
    dtypes = {jnp.result_type(a) for a in jax.tree.leaves((params, carry, xs))}
    return len(dtypes) == 1 and jnp.issubdtype(dtypes.pop(), jnp.floating)


def with_step_keys(xs, key, *, batch_size: int | None = None):
    """Pairs inputs with per-example, per-step PRNG keys for dropout in :func:`jbptt.cells.stack`.

    Args:
      xs: batch-major inputs ``[B, T, ...]``.
      key: a typed PRNG key (``jax.random.key``).

    Returns:
      ``(xs, keys)`` with ``keys: [B, T]`` typed keys, to pass as ``xs`` to :func:`unroll`.
    """
    B, T = batch_and_time(xs) if batch_size is None else (batch_size, batch_and_time(xs)[1])
    return xs, jax.random.split(key, (B, T))


class Bidirectional(NamedTuple):
    """A bidirectional layer (built at the unroll level): ``init(key, input_size) -> params`` and
    ``apply(params, xs, *, seq_lengths=None, resets=None, unroll=1, reverse_mode_only=False, truncate=None) ->
    ((carry_fwd, carry_bwd), ys)`` with ``ys: [B, T, O_fwd + O_bwd]`` (forward outputs first)."""

    init: Callable
    apply: Callable
    output_size: int


def bidirectional(fwd: Cell, bwd: Cell) -> Bidirectional:
    """Combines a forward and a backward cell into a :class:`Bidirectional` layer.

    With ``seq_lengths`` the backward cell starts at each sequence's last valid step; outputs past the length
    are zero in both halves, so a padded batch gives each sequence what it gives alone.
    """

    def init(key, input_size):
        kf, kb = jax.random.split(key)
        return {"fwd": fwd.init(kf, input_size), "bwd": bwd.init(kb, input_size)}

    run = unroll  # the argument below shadows the function

    def apply(params, xs, *, seq_lengths=None, resets=None, unroll: int = 1, reverse_mode_only: bool = False,
              truncate: int | None = None):
        kw = dict(seq_lengths=seq_lengths, resets=resets, unroll=unroll, reverse_mode_only=reverse_mode_only,
                  truncate=truncate)
        cf, yf = run(fwd, params["fwd"], xs, **kw)
        cb, yb = run(bwd, params["bwd"], xs, reverse=True, **kw)
        return (cf, cb), jnp.concatenate([yf, yb], axis=-1)

    return Bidirectional(init, apply, fwd.output_size + bwd.output_size)


class SequenceModel(NamedTuple):
    """A stack of layers some of which read the whole sequence (:func:`sequence_stack`), e.g. a BiLSTM.

    It has the fields a :class:`~jbptt.cells.Cell` user reads (``init``, ``initial_carry``, ``hidden_size``,
    ``output_size``), and :func:`unroll` applies it; but it has no per-step ``step`` (its ``step`` raises a
    ``ValueError`` saying so): only estimators that differentiate the whole unroll (``bptt``, also with
    ``truncation``) can train it. ``initial_carry`` is empty: no carry crosses segments.

    Attributes:
      init: ``init(key, input_size) -> params``.
      initial_carry: ``initial_carry(params, batch_shape) -> ()``.
      apply: ``apply(params, xs, *, seq_lengths=None, resets=None, unroll=1, reverse_mode_only=False,
        truncate=None) -> (final_carries, ys [B, T, output_size])``.
      step: raises ``ValueError``.
      hidden_size: the last layer's output size; output_size: the readout's (or the last layer's) size.
    """

    init: Callable
    initial_carry: Callable
    apply: Callable
    step: Callable
    hidden_size: int
    output_size: int


def sequence_stack(layers, output_size: int | None = None, *, init: str | Callable = "lecun") -> SequenceModel:
    """Stacks :class:`~jbptt.cells.Cell` and :class:`Bidirectional` layers (each reads the previous layer's
    outputs ``[B, T, O]``), with an optional linear readout to ``output_size`` applied at every step.

    Args:
      layers: a non-empty sequence of cells and bidirectional layers (e.g. ``[bidirectional(lstm(64), lstm(64)),
        bidirectional(lstm(64), lstm(64))]``).
      output_size: the readout's size (``None``: no readout; the outputs are the last layer's).
      init: the readout weights' initializer (:func:`jbptt.cells.initializers.get_initializer`).

    Returns:
      A :class:`SequenceModel` with params ``{"layers": [...], "readout": {"w", "b"}}``. Outputs past each
      sequence's length are zero.
    """
    layers = list(layers)
    if not layers:
        raise ValueError("sequence_stack: needs at least one layer")
    winit = get_initializer(init)
    last = layers[-1].output_size

    def init_fn(key, input_size):
        keys = jax.random.split(key, len(layers) + 1)
        params, size = [], input_size
        for k, layer in zip(keys[:-1], layers, strict=True):
            params.append(layer.init(k, size))
            size = layer.output_size
        out = {"layers": params}
        if output_size is not None:
            dtype = jax.tree.leaves(params)[0].dtype
            out["readout"] = {"w": winit(keys[-1], (last, output_size), dtype), "b": jnp.zeros((output_size,), dtype)}
        return out

    def initial_carry(params, batch_shape):
        del params, batch_shape
        return ()

    run = unroll

    def apply(params, xs, *, seq_lengths=None, resets=None, unroll: int = 1, reverse_mode_only: bool = False,
              truncate: int | None = None):
        finals, ys = [], xs
        for layer, p in zip(layers, params["layers"], strict=True):
            final, ys = run(layer, p, ys, seq_lengths=seq_lengths, resets=resets, unroll=unroll,
                            reverse_mode_only=reverse_mode_only, truncate=truncate)
            finals.append(final)
        if output_size is not None:
            ys = ys @ params["readout"]["w"] + params["readout"]["b"]
            if seq_lengths is not None:
                ys = jnp.where(sequence_mask(seq_lengths, ys.shape[1])[..., None], ys, 0.0)
        return tuple(finals), ys

    def step(params, carry, x):
        raise ValueError("this model has bidirectional layers, which read the whole sequence: it has no per-step "
                         "step, so only estimators that differentiate the whole unroll apply (bptt, also with "
                         "truncation=k); online estimators and tbptt need a steppable Cell")

    return SequenceModel(init_fn, initial_carry, apply, step, last, last if output_size is None else output_size)
