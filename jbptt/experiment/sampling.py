"""Text generation from a trained character-level model: warm up on a prompt, then sample with a temperature."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jbptt.cells import Cell, params_dtype
from jbptt.unroll import unroll


def generate(cell: Cell, params, prompt_ids, length: int, key, *, vocab_size: int, temperature: float = 1.0):
    """Samples ``length`` token ids after the prompt.

    Args:
      cell: a cell whose outputs are logits over ``vocab_size`` tokens and whose inputs are one-hot tokens.
      prompt_ids: ``[P]`` ints, ``P >= 1``.
      length: number of tokens to sample.
      key: PRNG key.
      temperature: logits are divided by it (``> 0``; small values approach greedy decoding).

    Returns:
      ``[length]`` int32 sampled ids (a pure function of its arguments; jittable with static ``length``).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    prompt = jax.nn.one_hot(jnp.asarray(prompt_ids)[None], vocab_size, dtype=params_dtype(params))  # [1, P, V]
    carry, ys = unroll(cell, params, prompt)

    def body(state, k):
        carry, logits = state
        tok = jax.random.categorical(k, logits / temperature, axis=-1)  # [1]
        carry, y = cell.step(params, carry, jax.nn.one_hot(tok, vocab_size, dtype=prompt.dtype))
        return (carry, y), tok[0]

    _, toks = jax.lax.scan(body, (carry, ys[:, -1]), jax.random.split(key, length))
    return toks.astype(jnp.int32)
