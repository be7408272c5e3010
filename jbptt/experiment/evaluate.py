"""Evaluating a model: the task's metrics and the loss on fixed batches, and the gradient-flow profile.

``model`` below is anything with ``task``, ``cell`` and ``loss_fn`` (a :class:`~jbptt.experiment.build.Model` or
:class:`~jbptt.experiment.build.Experiment`). The runner, the ESN fit and the comparison harness all evaluate
through :func:`make_eval_fn`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jbptt import diagnostics, losses
from jbptt.unroll import SequenceModel, unroll


def make_eval_fn(model):
    """A jitted ``eval_fn(params, batch) -> dict`` of scalars: the task's metrics plus ``loss`` (the weighted mean
    per-step loss), on one batch (``inputs [B, T, I]``)."""

    @jax.jit
    def eval_fn(params, b):
        _, ys = unroll(model.cell, params, b.inputs, seq_lengths=b.seq_lengths, resets=b.resets)
        return _metrics(model, ys, b)

    return eval_fn


def _metrics(model, ys, b):
    m = dict(model.task.metrics(ys, b))
    m.setdefault("loss", losses.sequence_loss(model.loss_fn, ys, b.targets, b.weights(ys.dtype)))
    return m


def make_stream_evaluator(model, stream):
    """``evaluate(params) -> dict`` of floats over a whole :class:`~jbptt.experiment.build.Stream`: the chunks are
    run in order from the initial carry, the carry kept from one to the next (one jitted ``lax.scan``), and each
    chunk's metrics (:func:`make_eval_fn`'s) are averaged with the weight of its loss weights, so the loss-like
    metrics (loss, accuracy, bits per character) are those of the whole stream."""

    @jax.jit
    def run(params):
        def body(carry, k):
            b = stream.chunk(k)
            carry, ys = unroll(model.cell, params, b.inputs, carry, seq_lengths=b.seq_lengths, resets=b.resets)
            return carry, (_metrics(model, ys, b), jnp.sum(b.weights(ys.dtype)))

        carry = model.cell.initial_carry(params, (stream.rows,))
        _, (ms, w) = lax.scan(body, carry, jnp.arange(stream.n_chunks))
        return {name: jnp.sum(v * w) / jnp.sum(w) for name, v in ms.items()}

    return lambda params: {name: float(v) for name, v in sorted(jax.device_get(run(params)).items())}


def make_evaluator(model, split: str, batch_size: int, n_batches: int, key, eval_fn=None):
    """``evaluate(params) -> dict`` of floats: :func:`make_eval_fn`'s metrics averaged over ``n_batches`` fixed
    batches of ``split`` (sampled once, ``fold_in(key, i)``). Evaluators sharing ``eval_fn`` share its
    compilation."""
    eval_fn = eval_fn or make_eval_fn(model)
    batches = [model.task.sample(jax.random.fold_in(key, i), batch_size, split) for i in range(n_batches)]

    def evaluate(params):
        ms = [jax.device_get(eval_fn(params, b)) for b in batches]
        return {name: float(np.mean([m[name] for m in ms])) for name in sorted(ms[0])}

    return evaluate


def make_gradient_flow(model, key, batch_size: int):
    """``flow(params) -> list`` of ``||dL/dh_t||`` for every step ``t`` on a fixed validation batch; ``None`` for a
    whole-sequence model (bidirectional layers: there is no single state to differentiate at each step)."""
    if isinstance(model.cell, SequenceModel):
        return None
    b = model.task.sample(key, batch_size, "val")
    norms = jax.jit(lambda p: diagnostics.state_gradient_norms(model.cell, model.loss_fn, p, b))
    return lambda params: [float(x) for x in np.asarray(norms(params))]
