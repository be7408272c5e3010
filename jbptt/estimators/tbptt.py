"""Truncated backpropagation through time: TBPTT(k1, k2) (Williams & Peng 1990) and ARTBP (Tallec & Ollivier 2017).

Every ``k1`` steps the gradient of those steps' losses is taken through the last ``k2 >= k1`` steps (the carry at
the window start is ``stop_gradient``-ed). A segment ``[B, T, ...]`` is cut into chunks of ``k1`` steps (the last
padded and masked) and a ``lax.scan`` runs one compiled chunk step that re-runs the ``k2 - k1`` stored inputs of
the window in front of the chunk: compute and memory ``O(k2)`` per chunk. ``update`` returns the segment's weighted
mean loss and its truncated gradient (chunk gradients of the summed weighted loss / the segment's total weight):
``TBPTT(T, T)`` is BPTT. ``stateful=False`` starts every segment from ``cell.initial_carry``; ``stateful=True``
streams: carry, window and ARTBP state cross updates (feed chunks of ``k1`` steps, see
:func:`jbptt.train.train_stream`). ``resets`` act as in :func:`~jbptt.unroll.unroll`, in the replayed window too.

ARTBP (``artbp=c``, a probability or a schedule ``c(steps_since_last_truncation)``): before each step the backward
flow is cut with probability ``c_t`` and otherwise scaled by ``1 / (1 - c_t)``, so the expected gradient equals the
exact one inside the window. Decisions are drawn once per step and kept with the window (overlapping windows agree).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jbptt.batch import Batch, batch_and_time, padding_steps, sequence_mask, split_chunks, time_major
from jbptt.cells import Cell, params_dtype, plain, scan_steps
from jbptt.estimator import GradientEstimator, register_estimator
from jbptt.losses import LossFn
from jbptt.unroll import ScanFn

__all__ = ["TBPTTState", "Window", "tbptt"]


class Window(NamedTuple):
    """The replay window of the last ``k2 - k1`` steps: ``inputs`` (leaves ``[B, k2 - k1, ...]``), ``valid`` and
    ``resets`` (``[B, k2 - k1]`` booleans; ``valid`` is False at padded steps and before the stream started) and
    the ARTBP ``gates`` (``[B, k2 - k1]``, ``None`` without ARTBP)."""

    inputs: Any
    valid: Any
    resets: Any
    gates: Any


class TBPTTState(NamedTuple):
    """State of :func:`tbptt`: ``carry`` after the last step seen, ``window_carry`` at the start of the replay
    window, the :class:`Window` (``None`` when ``k2 == k1``), the ARTBP ``key`` and ``since_truncation`` (``[B]``
    steps since the last truncation); both ``None`` without ARTBP."""

    carry: Any
    window_carry: Any
    window: Window | None
    key: Any
    since_truncation: Any


def _gated(cell: Cell) -> Cell:
    """``cell`` with input ``(x, gate)``: ``gate [B]`` scales the gradient flowing into the incoming carry."""

    def step(params, carry, inp):
        x, gate = inp

        def scale(a):
            if not jnp.issubdtype(a.dtype, jnp.inexact):
                return a
            g = jnp.reshape(gate, gate.shape + (1,) * (a.ndim - gate.ndim)).astype(a.dtype)
            frozen = lax.stop_gradient(a)
            return frozen + g * (a - frozen)  # value: a; backward: g * cotangent

        return cell.step(params, jax.tree.map(scale, carry), x)

    return plain(cell)._replace(step=step)


def _sample_gates(prob_fn, key, since, valid, resets, dtype):
    """ARTBP gates ``[B, k]``: ``0`` (truncate) with probability ``c``, else ``1 / (1 - c)``; 1 at padded and reset
    steps. A truncation or reset restarts the ``since`` counter. Returns ``(gates, since)``."""
    u = jax.random.uniform(key, valid.shape, dtype)

    def body(s, inp):
        u_t, v_t, r_t = inp
        c = jnp.asarray(prob_fn(s), dtype)
        keep = u_t >= c
        gate = jnp.where(r_t | ~v_t, 1.0, jnp.where(keep, 1.0 / (1.0 - c), 0.0))
        return jnp.where(v_t, jnp.where(r_t | ~keep, 0, s + 1), s), gate

    since, gates = lax.scan(body, since, (u.T, valid.T, resets.T))
    return gates.T, since


@register_estimator("tbptt")
def tbptt(cell: Cell, loss_fn: LossFn, *, k1: int, k2: int | None = None, stateful: bool = False,
          artbp: float | Callable | None = None, unroll_steps: int = 1, scan: ScanFn | None = None
          ) -> GradientEstimator:
    """Truncated BPTT(k1, k2) as a :class:`~jbptt.estimator.GradientEstimator` (see the module docstring).

    Args:
      cell, loss_fn: the cell (readout included) and the per-step loss, weighted by ``Batch.weights()``.
      k1: steps between gradient computations (the chunk length); k2: steps backpropagated (default ``k1``).
      stateful: carry the stream state across ``update`` calls instead of starting every segment afresh.
      artbp: ARTBP truncation probability in ``[0, 1)`` or a jittable schedule ``c(since: int[B]) -> prob[B]``.
      unroll_steps, scan: ``lax.scan`` unroll factor and replacement (e.g. :mod:`jbptt.remat`) inside each chunk.

    Returns:
      A :class:`GradientEstimator`. ``init(params, carry, *, key=None, inputs=None)``: ``key`` seeds ARTBP;
      ``inputs`` (an example segment, leaves ``[B, T, ...]``) is required when ``stateful`` and ``k2 > k1``, to
      allocate the replay window. ``update`` takes segments ``[B, T, ...]`` of any ``T``.
    """
    if not isinstance(k1, int) or isinstance(k1, bool) or k1 < 1:
        raise ValueError(f"tbptt: k1 must be a positive int, got {k1!r}")
    k2 = k1 if k2 is None else k2
    if not isinstance(k2, int) or isinstance(k2, bool) or k2 < k1:
        raise ValueError(f"tbptt: k2 must be an int >= k1 = {k1}, got {k2!r}")
    if scan is not None and not callable(scan):
        raise ValueError(f"tbptt: scan must be a callable like lax.scan, got {scan!r}")
    if artbp is not None and not callable(artbp) and not 0.0 <= float(artbp) < 1.0:
        raise ValueError(f"tbptt: artbp truncation probability must be in [0, 1), got {artbp}")
    prob_fn = artbp if artbp is None or callable(artbp) else lambda since: jnp.full(jnp.shape(since), float(artbp))
    W = k2 - k1
    stepper = plain(cell) if prob_fn is None else _gated(cell)

    def start(params, carry, key, inputs, window: bool):
        B = jnp.shape(jax.tree_util.tree_leaves(carry)[0])[0]
        win = None
        if window and W:
            if inputs is None or batch_and_time(inputs)[0] != B:
                raise ValueError(f"tbptt: stateful with k2 > k1 ({k2} > {k1}), init needs inputs= (an example segment"
                                 f" of the training inputs, leaves [B={B}, T, ...]) to allocate the replay window")
            gates = None if prob_fn is None else jnp.ones((B, W), params_dtype(params))
            win = Window(padding_steps(inputs, W), jnp.zeros((B, W), bool), jnp.zeros((B, W), bool), gates)
        artbp_state = (None, None) if prob_fn is None else \
            (jax.random.key(0) if key is None else key, jnp.zeros((B,), jnp.int32))
        return TBPTTState(carry, carry, win, *artbp_state)

    def init(params, carry, *, key=None, inputs=None):
        return start(params, carry, key, inputs, window=stateful)  # the window crosses updates only in streams

    def run(params, carry, inputs, valid, resets, gates):
        xs = inputs if gates is None else (inputs, gates)
        carry, ys = scan_steps(stepper, params, time_major(xs), carry, valid.T, resets.T, scan=scan or lax.scan,
                               unroll=unroll_steps)
        return carry, time_major(ys)

    def chunk_step(params, state: TBPTTState, chunk):
        """One chunk of ``k1`` steps: ``(summed weighted loss, grads of it, new state)``."""
        inputs, targets, weights, valid, resets = chunk
        gates, key, since = None, state.key, state.since_truncation
        if prob_fn is not None:
            key, sub = jax.random.split(key)
            gates, since = _sample_gates(prob_fn, sub, since, valid, resets, params_dtype(params))
        if W:  # replay the window in front of the chunk
            cat = lambda a, b: jax.tree.map(lambda u, v: jnp.concatenate([u, v], axis=1), a, b)
            win = state.window
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
        window = Window(part(inputs, k1, k2), valid[:, k1:], resets[:, k1:], part(gates, k1, k2)) if W else None
        return total, grads, TBPTTState(end, mid, window, key, since)

    def update(params, state: TBPTTState, batch: Batch):
        B, T = batch_and_time(batch.inputs)
        resets = jnp.zeros((B, T), bool) if batch.resets is None else jnp.asarray(batch.resets, bool)
        running = state
        if not stateful:  # a fresh batch of sequences: the reset pulls in cell.initial_carry(params) with its grad
            running = start(params, cell.initial_carry(params, (B,)), state.key, batch.inputs, True)
            resets = resets.at[:, 0].set(True)
        chunks = split_chunks(batch._replace(resets=resets), k1)
        valid = sequence_mask(chunks.seq_lengths.reshape(-1), k1).reshape(chunks.resets.shape)
        weights = chunks.mask * valid.astype(chunks.mask.dtype)

        def body(acc, chunk):
            loss_sum, grad_sum, st = acc
            total, grads, st = chunk_step(params, st, chunk)
            return (loss_sum + total.astype(loss_sum.dtype), jax.tree.map(jnp.add, grad_sum, grads), st), None

        zero = (jnp.zeros((), params_dtype(params)), jax.tree.map(jnp.zeros_like, params))
        (loss_sum, grad_sum, running), _ = lax.scan(
            body, (*zero, running), (chunks.inputs, chunks.targets, weights, valid, chunks.resets))
        total_weight = jnp.sum(weights)
        denom = jnp.where(total_weight > 0, total_weight, 1.0).astype(loss_sum.dtype)
        grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grad_sum)
        # not stateful: keep the given state (its structure); only the ARTBP key advances
        return loss_sum / denom, grads, running if stateful else state._replace(key=running.key)

    return GradientEstimator(init, update)
