"""Gradient-flow diagnostics: vanishing/exploding-gradient profiles, Jacobian spectra, gradient alignment.

Pure functions returning arrays (plots come with the experiment runner). Time index ``t`` always refers to the
carry *entering* step ``t`` (``h_{t-1}`` in the usual notation; ``t = 0`` is the initial carry), which is where a
gradient with respect to the state is defined for any cell.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jbptt.batch import Batch, batch_and_time, time_major
from jbptt.cells import Cell, plain
from jbptt.losses import LossFn, sequence_loss
from jbptt.unroll import unroll


def _with_state_input(cell: Cell, fn) -> Cell:
    """A cell whose step input is ``(x, aux)`` and whose step is ``fn(cell, params, carry, x, aux)``."""
    return plain(cell)._replace(step=lambda p, c, inp: fn(cell, p, c, *inp))


def state_gradients(cell: Cell, loss_fn: LossFn, params, batch: Batch, carry=None):
    """The gradient of the loss with respect to the carry entering every step.

    Returns:
      A pytree like the carry with leaves ``[B, T, ...]``: ``dL/dh_{t-1}`` at index ``t``.
    """
    B, T = batch_and_time(batch.inputs)
    carry = cell.initial_carry(params, (B,)) if carry is None else carry
    perturbed = _with_state_input(
        cell, lambda c0, p, c, x, eps: c0.step(p, jax.tree.map(jnp.add, c, eps), x))
    zeros = jax.tree.map(lambda a: jnp.zeros((B, T) + a.shape[1:], a.dtype), carry)

    def loss(eps):
        _, ys = unroll(perturbed, params, (batch.inputs, eps), carry, seq_lengths=batch.seq_lengths,
                       resets=batch.resets)
        return sequence_loss(loss_fn, ys, batch.targets, batch.weights(ys.dtype))

    return jax.grad(loss)(zeros)


def state_gradient_norms(cell: Cell, loss_fn: LossFn, params, batch: Batch, carry=None):
    """The vanishing/exploding-gradient profile: ``||dL/dh_{t-1}||`` for every step ``t``.

    The norm is taken over the whole batch and every carry component (e.g. ``h`` and ``c`` of an LSTM).

    Returns:
      ``[T]`` norms.
    """
    grads = state_gradients(cell, loss_fn, params, batch, carry)
    sq = sum(jnp.sum(jnp.square(g), axis=(0,) + tuple(range(2, g.ndim))) for g in jax.tree.leaves(grads))
    return jnp.sqrt(sq)


def carry_trajectory(cell: Cell, params, xs, carry=None):
    """The carries entering every step, batch-major: a pytree like the carry with leaves ``[B, T, ...]``."""
    B, _ = batch_and_time(xs)
    carry = cell.initial_carry(params, (B,)) if carry is None else carry

    def step(p, c, x):
        new, _ = cell.step(p, c, x)
        return new, c

    _, carries = unroll(plain(cell)._replace(step=step), params, xs, carry)
    return carries


def step_jacobians(cell: Cell, params, xs, carry=None):
    """One-step Jacobians ``d h_t / d h_{t-1}`` along the trajectory, per example, with the carry flattened.

    Args:
      xs: ``[B, T, I]`` inputs.

    Returns:
      ``[B, T, n, n]`` where ``n`` is the flattened carry size of one example and index ``t`` is the Jacobian of
      step ``t`` with respect to the carry entering it.
    """
    carries = carry_trajectory(cell, params, xs, carry)
    flat0, unravel = ravel_pytree(cell.initial_carry(params, ()))
    del flat0

    def jac(c_flat, x):
        return jax.jacfwd(lambda c: ravel_pytree(cell.step(params, unravel(c), x)[0])[0])(c_flat)

    flat = jax.vmap(jax.vmap(lambda c: ravel_pytree(c)[0]))(carries)
    return jax.vmap(jax.vmap(jac))(flat, xs)


def jacobian_singular_values(cell: Cell, params, xs, carry=None):
    """Singular values of every one-step Jacobian along the trajectory. Returns ``[B, T, n]`` (descending)."""
    return jnp.linalg.svd(step_jacobians(cell, params, xs, carry), compute_uv=False)


def final_state_jacobian_norms(cell: Cell, params, xs, carry=None):
    """Frobenius norms ``||d h_final / d h_{t-1}||`` for every step ``t``, per example.

    Computed as the backward product of the one-step Jacobians (``M_T = I``, ``M_t = M_{t+1} J_t``).

    Returns:
      ``[B, T]`` norms.
    """
    jacs = time_major(step_jacobians(cell, params, xs, carry))  # [T, B, n, n]
    n = jacs.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(n, dtype=jacs.dtype), jacs.shape[1:])

    def back(m, j):
        m = m @ j
        return m, jnp.linalg.norm(m, axis=(-2, -1))

    _, norms = jax.lax.scan(back, eye, jacs, reverse=True)
    return norms.T


def global_norm(tree):
    """The global L2 norm of a pytree of arrays (e.g. a gradient). Returns a scalar."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def relative_error(estimate, reference):
    """``||estimate - reference|| / ||reference||`` over whole pytrees. Returns a scalar."""
    diff = jax.tree.map(jnp.subtract, estimate, reference)
    return global_norm(diff) / global_norm(reference)


def cosine_similarity(a, b):
    """Cosine of the angle between two pytrees seen as flat vectors. Returns a scalar."""
    dot = sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    return dot / (global_norm(a) * global_norm(b))
