"""Shared test helpers: float64 cells on random inputs and a central finite-difference gradient."""

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.flatten_util import ravel_pytree

from jbptt import cells


def to_f64(tree):
    """Casts every floating leaf of a pytree to float64."""
    return jax.tree.map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def cell_zoo():
    """(name, cell) pairs covering every cell type and combinator, for parameterised tests."""
    return [
        ("elman_tanh", cells.elman(4)),
        ("elman_irnn", cells.elman(4, activation="relu", recurrent_init="identity")),
        ("lstm", cells.lstm(4)),
        ("gru", cells.gru(4)),
        ("lru_complex", cells.diagonal_linear(4, 3)),
        ("lru_real", cells.diagonal_linear(4, complex_valued=False)),
        ("indrnn", cells.indrnn(4, activation="tanh")),
        ("esn", cells.esn(6, density=0.5)),
        ("flax_lstm", cells.from_flax(nn.LSTMCell(features=3, param_dtype=jnp.float64))),
        ("learned_carry_gru", cells.learned_initial_carry(cells.gru(3))),
        ("stack", cells.stack([cells.lstm(3), cells.gru(3), cells.elman(3)], residual=True)),
        ("stack_lru_indrnn", cells.stack([cells.diagonal_linear(3, 3), cells.indrnn(3)])),
    ]


def init_f64(cell, key, input_size):
    """``cell.init`` cast to float64, with a non-zero learned carry (so its gradient is tested too)."""
    params = to_f64(cell.init(key, input_size))
    if isinstance(params, dict) and "carry0" in params:
        params["carry0"] = jax.tree.map(lambda c: 0.3 * jnp.ones_like(c), params["carry0"])
    return params


def finite_difference_grad(f, params, eps=1e-6):
    """Central finite differences of a scalar ``f`` with respect to every parameter (vmapped, float64)."""
    flat, unravel = ravel_pytree(params)
    basis = eps * jnp.eye(flat.size, dtype=flat.dtype)
    fv = jax.jit(jax.vmap(lambda v: f(unravel(v))))
    return unravel((fv(flat + basis) - fv(flat - basis)) / (2 * eps))
