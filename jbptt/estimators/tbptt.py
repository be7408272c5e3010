"""Truncated backpropagation through time: TBPTT(k1, k2) (Williams & Peng 1990) and ARTBP (Tallec & Ollivier 2017).

The network runs forward continuously; every ``k1`` steps a gradient is taken by backpropagating through the last
``k2 >= k1`` steps. Each step's loss is counted once (in the chunk of ``k1`` steps it belongs to); with
``k2 > k1`` the windows overlap, so a loss at the start of a chunk backpropagates ``k2 - k1 + 1`` steps and one at
its end ``k2`` steps. Gradients never cross a window start: the carry there is ``stop_gradient``-ed.

**Implementation.** A segment handed to ``update`` (``[B, T, ...]``) is right-padded to a multiple of ``k1`` and
cut into chunks on the grid ``0, k1, 2 k1, ...``; a ``lax.scan`` over chunks runs one compiled chunk step. The
state keeps the carry at the start of the current window and the inputs of the last ``k2 - k1`` steps, which the
chunk step re-runs (forward) in front of the new ``k1`` steps before backpropagating: compute per chunk is
``k2`` forward steps and ``k2`` backward steps, memory ``O(k2)``, independent of ``T``. Padded steps (the tail of
a short last chunk, steps past ``seq_lengths``) leave the carry untouched and carry no loss, exactly as in
:func:`~jbptt.unroll.unroll`; the window is the last ``k2`` *slots* of the chunk grid, so after a short last chunk
of ``r`` valid steps the window holds ``k2 - k1 + r`` valid steps (every loss still backpropagates at least
``k2 - k1 + 1`` steps).

**Loss normalisation.** ``update`` returns ``loss`` = the weighted mean per-step loss over the valid steps of the
*segment it was given* (``sum_t w_t l_t / sum_t w_t``, the same number :func:`~jbptt.estimators.bptt.bptt` returns) and
``grads`` = the truncated gradient of that same quantity: ``sum over chunks of (truncated grad of the chunk's
summed loss) / (segment's total weight)``. So with one chunk per ``update`` (stream mode: the user feeds chunks of
``k1`` steps and the optimizer steps once per chunk) each chunk's loss is the mean over *that chunk's* valid
steps, and a chunk without targets (sparse losses) yields loss 0 and zero gradients. Over a whole segment,
``TBPTT(T, T)`` is exactly full BPTT and ``TBPTT(k, k)`` is the sum of the per-chunk BPTT gradients with the carry
stopped at chunk boundaries, divided by the segment's total weight.

**Modes.**

* ``stateful=False`` (default, like :func:`~jbptt.estimators.bptt.bptt`): every ``update`` starts a fresh batch
of sequences
  from ``cell.initial_carry(params, (B,))`` (a learned initial carry gets its gradient) and applies TBPTT inside
  the segment, with one gradient (one optimizer step) per segment.
* ``stateful=True``: streams. The carry, the replay window and the ARTBP state cross ``update`` calls; feed
  chunks of ``k1`` steps (:func:`pad_chunk` pads the last short one, :func:`train_stream` runs an iterator) so
  one compiled step serves every chunk and the optimizer steps once per chunk, as Williams & Peng describe.
  :func:`make_sequence_train_step` does the same for a batch of long sequences held in memory (a ``lax.scan``
  over chunks, one optimizer step per chunk). ``resets`` reset the carry before flagged steps exactly as in
  ``unroll`` (episode boundaries inside a stream); the replayed window honours them, so no gradient crosses one.

**ARTBP** (``artbp=c``, a probability or a schedule ``c(steps_since_last_truncation) -> prob``): before each step
``t`` the backward flow into the past is truncated at random with probability ``c_t`` and otherwise multiplied
by ``1 / (1 - c_t)``. By induction backwards in time the expected backpropagated state gradient equals the exact
one, so the estimate is unbiased for the gradient of everything inside the window — with ``k1 = k2 = T`` (one
window per sequence) for full BPTT. Truncation decisions are drawn once per step (per example) and kept with the
replay window, so overlapping windows agree on them. The window start stays a hard cut, so in stream mode with
``k2 > k1`` ARTBP's only bias is the cap of ``k2`` steps (choose ``c`` so that ``(1 - c)^(k2 - k1)`` is small).
The forward pass does not depend on the decisions; they only gate ``dL/dh``. Compensation factors ``(1-c)^-n``
grow with the distance travelled, which is the estimator's variance (Tallec & Ollivier's schedules keep it
finite).

All functions are pure and safe under ``jit``, ``grad`` and ``vmap`` (states can be vmapped over keys).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jbptt.batch import Batch, batch_and_time, batch_where, sequence_mask
from jbptt.cells import Cell, params_dtype
from jbptt.estimator import GradientEstimator, register_estimator
from jbptt.losses import LossFn
from jbptt.train import make_train_step
from jbptt.unroll import ScanFn, unroll

__all__ = ["TBPTTState", "Window", "make_sequence_train_step", "pad_chunk", "prime_state", "split_chunks",
           "tbptt", "train_stream"]


class Window(NamedTuple):
    """The replay window of the last ``k2 - k1`` steps (leaves ``[B, k2 - k1, ...]``).

    Attributes:
      inputs: the inputs (``None`` until the first ``update`` has seen the input shape; see :func:`prime_state`).
      valid: ``[B, k2 - k1]`` booleans, False at padded steps (and before the stream started).
      resets: ``[B, k2 - k1]`` booleans.
      gates: ``[B, k2 - k1]`` ARTBP backward gates (``None`` without ARTBP).
    """

    inputs: Any
    valid: Any
    resets: Any
    gates: Any


class TBPTTState(NamedTuple):
    """State of :func:`tbptt` (a pytree).

    Attributes:
      carry: the carry after the last step seen (the current state of the stream).
      window_carry: the carry at the start of the replay window (``k2 - k1`` steps before ``carry``).
      window: the :class:`Window` (``None`` when ``k2 == k1``).
      key: PRNG key for ARTBP (``None`` without ARTBP).
      since_truncation: ``[B]`` ints, steps since the last ARTBP truncation (``None`` without ARTBP).
    """

    carry: Any
    window_carry: Any
    window: Window | None
    key: Any
    since_truncation: Any


# ----------------------------------------------------------------------------------------------------------------
# Chunking helpers (shared by the estimator, the sequence train step and the stream driver).


def _pad_time(tree, T_new: int):
    """Right-pads every ``[B, T, ...]`` leaf of ``tree`` with zeros (False) to ``T_new`` steps."""

    def pad(a):
        a = jnp.asarray(a)
        widths = [(0, 0), (0, T_new - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
        return jnp.pad(a, widths)

    return jax.tree.map(pad, tree)


def _valid_mask(batch: Batch, B: int, T: int):
    """``[B, T]`` booleans: True at the valid steps of ``batch`` (all, or ``t < seq_lengths``)."""
    if batch.seq_lengths is None:
        return jnp.ones((B, T), bool)
    return sequence_mask(batch.seq_lengths, T)


def pad_chunk(batch: Batch, length: int) -> Batch:
    """Right-pads a batch of ``T <= length`` steps to ``length`` steps; the padding is masked out.

    The padded steps are invalid (``seq_lengths`` marks them): they leave the carry untouched and carry no loss,
    so a stream's short last chunk runs through the same compiled step as every full chunk.

    Args:
      batch: a :class:`~jbptt.estimator.Batch` with leaves ``[B, T, ...]``.
      length: the chunk length (``k1``).

    Returns:
      A :class:`Batch` with leaves ``[B, length, ...]`` and ``seq_lengths: [B]`` (always set).
    """
    B, T = batch_and_time(batch.inputs)
    if T > length:
        raise ValueError(f"pad_chunk: the chunk has {T} steps, more than the chunk length {length}")
    lengths = jnp.full((B,), T, jnp.int32) if batch.seq_lengths is None else \
        jnp.minimum(jnp.asarray(batch.seq_lengths, jnp.int32), T)
    if T == length:
        return batch._replace(seq_lengths=lengths)
    mask = None if batch.mask is None else _pad_time(jnp.broadcast_to(jnp.asarray(batch.mask), (B, T)), length)
    resets = None if batch.resets is None else _pad_time(jnp.asarray(batch.resets, bool), length)
    return Batch(_pad_time(batch.inputs, length), _pad_time(batch.targets, length), mask, lengths, resets)


def split_chunks(batch: Batch, k1: int) -> Batch:
    """Cuts a batch of long sequences into chunks of ``k1`` steps on the grid ``0, k1, 2 k1, ...``.

    Args:
      batch: leaves ``[B, T, ...]``; ``mask``, ``seq_lengths`` and ``resets`` are optional.
      k1: the chunk length.

    Returns:
      A :class:`Batch` whose leaves are ``[n, B, k1, ...]`` with ``n = ceil(T / k1)`` (scan over the leading
      axis); the last chunk is right-padded and masked. ``seq_lengths: [n, B]`` gives each chunk's valid steps and
      ``mask``/``resets`` are always arrays.
    """
    B, T = batch_and_time(batch.inputs)
    n = -(-T // k1)
    valid = _valid_mask(batch, B, T)
    mask = jnp.ones((B, T)) if batch.mask is None else jnp.broadcast_to(jnp.asarray(batch.mask), (B, T))
    resets = jnp.zeros((B, T), bool) if batch.resets is None else jnp.asarray(batch.resets, bool)

    def cut(a):
        a = _pad_time(a, n * k1)
        a = jnp.reshape(a, (a.shape[0], n, k1) + a.shape[2:])
        return jnp.moveaxis(a, 1, 0)

    lengths = jnp.sum(cut(valid), axis=-1).astype(jnp.int32)  # valid steps are a prefix of each row
    return Batch(cut(batch.inputs), cut(batch.targets), cut(mask), lengths, cut(resets))


# ----------------------------------------------------------------------------------------------------------------
# The estimator.


def _stepping_cell(cell: Cell, gated: bool) -> Cell:
    """Wraps ``cell`` so that its input is ``(x, valid[, gate])``: invalid steps keep the carry and output zeros,
    and ``gate`` scales the gradient flowing from this step into the incoming carry (ARTBP)."""

    def step(params, carry, inp):
        x, valid = inp[0], inp[1]
        if gated:
            gate = inp[2]

            def scale(a):
                if not jnp.issubdtype(a.dtype, jnp.inexact):
                    return a
                g = jnp.reshape(gate, gate.shape + (1,) * (a.ndim - gate.ndim)).astype(a.dtype)
                frozen = lax.stop_gradient(a)
                return frozen + g * (a - frozen)  # value: a; backward: g * cotangent

            carry = jax.tree.map(scale, carry)
        new, y = cell.step(params, carry, x)
        new = jax.tree.map(lambda n, o: n.astype(o.dtype), new, carry)
        return batch_where(valid, new, carry), batch_where(valid, y, jnp.zeros_like(y))

    return cell._replace(step=step)


def _truncation_prob(artbp) -> Callable:
    if callable(artbp):
        return artbp
    c = float(artbp)
    if not 0.0 <= c < 1.0:
        raise ValueError(f"tbptt: artbp truncation probability must be in [0, 1), got {c}")
    return lambda since: jnp.full(jnp.shape(since), c)


def _sample_gates(prob_fn, key, since, valid, resets, dtype):
    """ARTBP gates ``[B, k]`` for ``k`` new steps: ``0`` (truncate) with probability ``c``, else ``1 / (1 - c)``.

    Padded steps and reset steps get gate 1 (nothing flows there anyway); a truncation or reset restarts the
    ``since`` counter. Returns ``(gates, since)``.
    """
    u = jax.random.uniform(key, valid.shape, dtype)

    def body(s, inp):
        u_t, v_t, r_t = inp
        c = jnp.asarray(prob_fn(s), dtype)
        keep = u_t >= c
        gate = jnp.where(keep, 1.0 / (1.0 - c), 0.0)
        gate = jnp.where(r_t | ~v_t, 1.0, gate)
        s = jnp.where(v_t, jnp.where(r_t | ~keep, 0, s + 1), s)
        return s, gate

    since, gates = lax.scan(body, since, (u.T, valid.T, resets.T))
    return gates.T, since


def prime_state(state: TBPTTState, inputs) -> TBPTTState:
    """Allocates the replay window's input buffer from example ``inputs: [B, T, ...]`` (any ``T``).

    ``init`` cannot know the input shape, so with ``k2 > k1`` the first ``update`` allocates it (the state's
    structure changes once). Call this first when the structure must be fixed from the start (``lax.scan`` over
    train steps, checkpoints). A no-op when the buffer exists or ``k2 == k1``.
    """
    if state.window is None or state.window.inputs is not None:
        return state
    W = state.window.valid.shape[1]
    buf = jax.tree.map(lambda a: jnp.zeros((a.shape[0], W) + a.shape[2:], a.dtype), inputs)
    return state._replace(window=state.window._replace(inputs=buf))


@register_estimator("tbptt")
def tbptt(cell: Cell, loss_fn: LossFn, *, k1: int, k2: int | None = None, stateful: bool = False,
          artbp: float | Callable | None = None, seed: int = 0, unroll_steps: int = 1,
          scan: ScanFn | None = None) -> GradientEstimator:
    """Truncated BPTT(k1, k2) as a :class:`~jbptt.estimator.GradientEstimator` (see the module docstring).

    Args:
      cell: the cell (include the readout).
      loss_fn: per-step loss ``loss_fn(y, target) -> [...]``; steps are weighted by ``Batch.weights()`` (masks make
        sparse losses).
      k1: steps between gradient computations (the chunk length).
      k2: steps backpropagated through at each computation (default ``k1``; must be ``>= k1``).
      stateful: carry the stream state across ``update`` calls (streams) instead of starting every segment from
        ``cell.initial_carry``.
      artbp: ARTBP truncation probability per step (float in ``[0, 1)``) or schedule
        ``c(steps_since_truncation: int[B]) -> prob[B]`` (jittable, values in ``[0, 1)``: a 1 would need an
        infinite compensation factor); ``None`` (default) for deterministic truncation.
      seed: seeds the ARTBP key in ``init`` (replace ``state.key`` to draw other estimates).
      unroll_steps: ``lax.scan`` unroll factor inside each chunk.
      scan: drop-in replacement for ``lax.scan`` used inside each chunk (e.g. a checkpointing schedule from
        :mod:`jbptt.remat`).

    Returns:
      A :class:`GradientEstimator`; ``update(params, state, batch)`` takes ``[B, T, ...]`` for any ``T`` and returns
      ``(loss, grads, state)`` with ``loss`` the weighted mean per-step loss of the segment and ``grads`` the
      truncated gradient of it.
    """
    if not isinstance(k1, int) or isinstance(k1, bool) or k1 < 1:
        raise ValueError(f"tbptt: k1 must be a positive int, got {k1!r}")
    k2 = k1 if k2 is None else k2
    if not isinstance(k2, int) or isinstance(k2, bool) or k2 < k1:
        raise ValueError(f"tbptt: k2 must be an int >= k1 = {k1}, got {k2!r}")
    if scan is not None and not callable(scan):
        raise ValueError(f"tbptt: scan must be a callable like lax.scan, got {scan!r}")
    prob_fn = None if artbp is None else _truncation_prob(artbp)
    W = k2 - k1
    stepper = _stepping_cell(cell, gated=prob_fn is not None)

    def init(params, carry):
        B = jnp.shape(jax.tree_util.tree_leaves(carry)[0])[0]
        gates = None if prob_fn is None else jnp.ones((B, W), params_dtype(params))
        window = None if W == 0 else Window(None, jnp.zeros((B, W), bool), jnp.zeros((B, W), bool), gates)
        key = None if prob_fn is None else jax.random.key(seed)
        since = None if prob_fn is None else jnp.zeros((B,), jnp.int32)
        return TBPTTState(carry, carry, window, key, since)

    def run(params, carry, inputs, valid, resets, gates):
        xs = (inputs, valid) if gates is None else (inputs, valid, gates)
        return unroll(stepper, params, xs, carry, resets=resets, unroll=unroll_steps, scan=scan)

    def chunk_step(params, state: TBPTTState, chunk):
        """One chunk of ``k1`` steps: ``(summed weighted loss, grads of it, new state)``."""
        inputs, targets, weights, valid, resets = chunk
        gates, key, since = None, state.key, state.since_truncation
        if prob_fn is not None:
            key, sub = jax.random.split(key)
            gates, since = _sample_gates(prob_fn, sub, since, valid, resets, params_dtype(params))
        win = state.window
        if W:
            cat = lambda a, b: jax.tree.map(lambda u, v: jnp.concatenate([u, v], axis=1), a, b)
            inputs, valid, resets = cat(win.inputs, inputs), cat(win.valid, valid), cat(win.resets, resets)
            gates = None if gates is None else cat(win.gates, gates)
        part = lambda tree, lo, hi: None if tree is None else jax.tree.map(lambda a: a[:, lo:hi], tree)

        def summed_loss(p):
            start = lax.stop_gradient(state.window_carry)
            if W:  # the first k1 slots lead to the next window's start; the rest end in the current carry
                mid, ys_a = run(p, start, *(part(t, 0, k1) for t in (inputs, valid, resets, gates)))
                end, ys_b = run(p, mid, *(part(t, k1, k2) for t in (inputs, valid, resets, gates)))
                ys = jnp.concatenate([ys_a, ys_b], axis=1)[:, W:]
            else:
                end, ys = run(p, start, inputs, valid, resets, gates)
                mid = end
            values = loss_fn(ys, targets)
            return jnp.sum(weights.astype(values.dtype) * values), (mid, end)

        (total, (mid, end)), grads = jax.value_and_grad(summed_loss, has_aux=True)(params)
        window = None if not W else Window(part(inputs, k1, k2), valid[:, k1:], resets[:, k1:],
                                           part(gates, k1, k2))
        return total, grads, TBPTTState(end, mid, window, key, since)

    def update(params, state: TBPTTState, batch: Batch):
        given = state
        B, T = batch_and_time(batch.inputs)
        resets = jnp.zeros((B, T), bool) if batch.resets is None else jnp.asarray(batch.resets, bool)
        if not stateful:  # a fresh batch of sequences: the reset pulls in cell.initial_carry(params) with its grad
            fresh = init(params, cell.initial_carry(params, (B,)))
            state = fresh._replace(key=state.key)
            resets = resets.at[:, 0].set(True)
        state = prime_state(state, batch.inputs)
        chunks = split_chunks(batch._replace(resets=resets), k1)
        weights = chunks.mask * sequence_mask(chunks.seq_lengths.reshape(-1), k1).reshape(chunks.mask.shape)
        valid = sequence_mask(chunks.seq_lengths.reshape(-1), k1).reshape(chunks.resets.shape)

        def body(acc, chunk):
            loss_sum, grad_sum, st = acc
            total, grads, st = chunk_step(params, st, chunk)
            return (loss_sum + total.astype(loss_sum.dtype), jax.tree.map(jnp.add, grad_sum, grads), st), None

        zero_grads = jax.tree.map(jnp.zeros_like, params)
        zero = jnp.zeros((), params_dtype(params))
        (loss_sum, grad_sum, state), _ = lax.scan(
            body, (zero, zero_grads, state), (chunks.inputs, chunks.targets, weights, valid, chunks.resets))
        total_weight = jnp.sum(weights)
        denom = jnp.where(total_weight > 0, total_weight, 1.0).astype(loss_sum.dtype)
        grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grad_sum)
        if not stateful:  # keep the given state's structure; only the ARTBP key advances
            state = given._replace(key=state.key)
        return loss_sum / denom, grads, state

    return GradientEstimator(init, update)


# ----------------------------------------------------------------------------------------------------------------
# Training drivers: one optimizer step per chunk.


def make_sequence_train_step(estimator: GradientEstimator, optimizer: optax.GradientTransformation, k1: int,
                             *, reset: bool = True):
    """Builds ``train_sequence(state, batch) -> (state, metrics)``: TBPTT over a batch of long sequences held in
    memory, with one optimizer step per chunk of ``k1`` steps (a ``lax.scan`` over chunks; compiled once).

    Args:
      estimator: a ``tbptt(..., k1=k1, stateful=True)`` estimator (stateful, so the carry crosses chunks).
      optimizer: an optax transformation.
      k1: the chunk length (the estimator's ``k1``).
      reset: start the sequences from the initial carry (a reset before their first step); ``False`` continues
        from the state's carry (consecutive pieces of one stream).

    Returns:
      A pure function; ``state`` is a :class:`~jbptt.train.TrainState` (see :func:`prime_state` for ``k2 > k1``)
      and ``metrics`` leaves are ``[n_chunks]``.
    """
    train_step = make_train_step(estimator, optimizer)

    def train_sequence(state, batch: Batch):
        B, T = batch_and_time(batch.inputs)
        if reset:
            resets = jnp.zeros((B, T), bool) if batch.resets is None else jnp.asarray(batch.resets, bool)
            batch = batch._replace(resets=resets.at[:, 0].set(True))
        if isinstance(state.est_state, TBPTTState):
            state = state._replace(est_state=prime_state(state.est_state, batch.inputs))
        return lax.scan(train_step, state, split_chunks(batch, k1))

    return train_sequence


def train_stream(train_step, state, chunks: Iterable[Batch], k1: int, *, on_metrics: Callable | None = None):
    """Feeds a stream of chunks (an iterator of :class:`Batch`, each ``[B, T <= k1, ...]``) to ``train_step``.

    Every chunk is padded to ``k1`` steps (:func:`pad_chunk`), so a jitted ``train_step`` compiles once and serves
    every chunk, the short last one included. The estimator must be ``stateful`` so the carry crosses chunks.

    Args:
      train_step: ``train_step(state, batch) -> (state, metrics)``, e.g. ``jax.jit(make_train_step(...))``.
      state: the initial train state.
      chunks: iterable of batches in stream order.
      k1: the chunk length.
      on_metrics: optional callback ``on_metrics(index, metrics)`` after each chunk.

    Returns:
      ``(state, n_chunks)``.
    """
    n = 0
    for n, chunk in enumerate(chunks, start=1):
        state, metrics = train_step(state, pad_chunk(chunk, k1))
        if on_metrics is not None:
            on_metrics(n - 1, metrics)
    return state, n
