"""Generated tasks: copy, delayed recall, the adding problem and bracket-depth tagging.

Each factory returns a :class:`jbptt.tasks.Task` whose ``sample(key, batch_size, split)`` builds a batch-major
:class:`jbptt.Batch` from the key alone (no data files).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jbptt.batch import Batch
from jbptt.losses import final_step_weights
from jbptt.tasks import Task, classification_metrics, one_hot, register_task, regression_metrics, split_key


def _positive(name: str, value: int, minimum: int = 1):
    if int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@register_task("copy")
def copy(length: int = 10, lag: int = 20, n_symbols: int = 8, dtype: str = "float32") -> Task:
    """Copy task: read ``length`` random symbols, wait ``lag`` blank steps, then reproduce them after a
    marker.

    ``T = 2 * length + lag + 1``. Inputs ``[B, T, n_symbols + 1]``: one-hot symbols at steps ``0..length-1``,
    zeros while waiting, and the "go" marker (the last channel) at step ``length + lag``. Targets ``[B, T]``
    ints: symbol ``k`` is expected at step ``length + lag + 1 + k`` (mask 1 there, 0 elsewhere).
    Loss ``cross_entropy``; metrics ``loss``, ``accuracy`` (headline) over the recall steps.
    """
    _positive("copy length", length)
    _positive("copy lag", lag, 0)
    _positive("copy n_symbols", n_symbols, 2)
    T = 2 * length + lag + 1
    start = length + lag + 1

    def sample(key, batch_size: int, split: str = "train"):
        ids = jax.random.randint(split_key(key, split), (batch_size, length), 0, n_symbols, jnp.int32)
        x = jnp.zeros((batch_size, T, n_symbols + 1), dtype)
        x = x.at[:, :length, :n_symbols].set(one_hot(ids, n_symbols, dtype))
        x = x.at[:, length + lag, n_symbols].set(1)
        targets = jnp.zeros((batch_size, T), jnp.int32).at[:, start:].set(ids)
        mask = jnp.zeros((batch_size, T), dtype).at[:, start:].set(1)
        return Batch(x, targets, mask)

    return Task(
        "copy",
        n_symbols + 1,
        n_symbols,
        "cross_entropy",
        sample,
        classification_metrics,
        "accuracy",
        True,
        {"seq_len": T, "chance_accuracy": 1.0 / n_symbols},
    )


@register_task("delayed_recall")
def delayed_recall(length: int = 50, lag: int = 10, n_symbols: int = 4, dtype: str = "float32") -> Task:
    """Delayed recall (echo with a time lag): at each step ``t >= lag`` output the symbol seen at ``t - lag``.

    Inputs ``[B, length, n_symbols]`` one-hot random symbols; targets ``[B, length]`` ints with
    ``targets[:, t] = ids[:, t - lag]``; ``mask`` is 0 for ``t < lag``. A gradient estimator must carry credit
    over ``lag`` steps to learn it (truncated BPTT with a window shorter than ``lag`` stays at chance,
    ``1 / n_symbols``). Loss ``cross_entropy``; headline metric ``accuracy``.
    """
    _positive("delayed_recall length", length)
    _positive("delayed_recall lag", lag, 0)
    _positive("delayed_recall n_symbols", n_symbols, 2)
    if lag >= length:
        raise ValueError(f"delayed_recall needs lag < length, got lag={lag}, length={length}")

    def sample(key, batch_size: int, split: str = "train"):
        ids = jax.random.randint(split_key(key, split), (batch_size, length), 0, n_symbols, jnp.int32)
        targets = jnp.zeros_like(ids).at[:, lag:].set(ids[:, : length - lag])
        mask = (jnp.arange(length) >= lag).astype(dtype)[None].repeat(batch_size, 0)
        return Batch(one_hot(ids, n_symbols, dtype), targets, mask)

    return Task(
        "delayed_recall",
        n_symbols,
        n_symbols,
        "cross_entropy",
        sample,
        classification_metrics,
        "accuracy",
        True,
        {"seq_len": length, "lag": lag, "chance_accuracy": 1.0 / n_symbols},
    )


@register_task("adding")
def adding(length: int = 50, dtype: str = "float32") -> Task:
    """The adding problem (Hochreiter & Schmidhuber 1997, in the form of Le et al. 2015).

    Inputs ``[B, T, 2]``: channel 0 holds values uniform in [0, 1], channel 1 marks two steps, one uniform in
    the first half and one in the second half. The target ``[B, T, 1]`` is the sum of the two marked values
    at the last step only (``mask`` one-hot at ``T - 1``). Predicting the constant 1 gives MSE 1/6 = 0.167
    (``info["baseline"]``). Loss ``mse``; headline metric ``mse``.
    """
    _positive("adding length", length, 2)
    half = length // 2

    def sample(key, batch_size: int, split: str = "train"):
        kv, k1, k2 = jax.random.split(split_key(key, split), 3)
        values = jax.random.uniform(kv, (batch_size, length), dtype)
        first = jax.random.randint(k1, (batch_size,), 0, half)
        second = jax.random.randint(k2, (batch_size,), half, length)
        marks = one_hot(first, length, dtype) + one_hot(second, length, dtype)
        total = jnp.sum(values * marks, axis=1)
        targets = jnp.zeros((batch_size, length, 1), dtype).at[:, -1, 0].set(total)
        mask = final_step_weights(batch_size, length, dtype=dtype)
        return Batch(jnp.stack([values, marks], -1), targets, mask)

    def metrics(ys, batch):
        return {"mse": regression_metrics(ys, batch)["mse"]}

    return Task(
        "adding", 2, 1, "mse", sample, metrics, "mse", False, {"seq_len": length, "baseline": 1.0 / 6.0}
    )


BRACKET_TOKENS = "()x"


@register_task("brackets")
def brackets(
    length: int = 40, max_depth: int = 6, p_open: float = 0.35, p_close: float = 0.35, dtype: str = "float32"
) -> Task:
    """Sequence tagging: label every token of a random bracket string with the nesting depth after it.

    Tokens (``BRACKET_TOKENS``) are ``"("``, ``")"`` and a filler ``"x"``, drawn with probabilities
    ``p_open``, ``p_close`` and the rest; a ``")"`` at depth 0 or a ``"("`` at ``max_depth`` is replaced by
    the filler, so every string is a valid prefix. Inputs ``[B, T, 3]`` one-hot tokens,
    targets ``[B, T]`` depths in
    ``0..max_depth`` (``output_size = max_depth + 1``), every step has a target. Loss ``cross_entropy``;
    headline metric per-token ``accuracy``.
    """
    _positive("brackets length", length)
    _positive("brackets max_depth", max_depth)
    if not (0 < p_open and 0 < p_close and p_open + p_close <= 1):
        raise ValueError(
            f"brackets needs p_open, p_close > 0 with p_open + p_close <= 1, got {p_open}, {p_close}"
        )
    probs = jnp.log(jnp.array([p_open, p_close, max(1.0 - p_open - p_close, 1e-9)]))

    def sample(key, batch_size: int, split: str = "train"):
        raw = jax.random.categorical(split_key(key, split), probs, shape=(length, batch_size))

        def step(depth, tok):
            tok = jnp.where((tok == 1) & (depth == 0), 2, tok)
            tok = jnp.where((tok == 0) & (depth == max_depth), 2, tok)
            depth = depth + (tok == 0) - (tok == 1)
            return depth, (tok, depth)

        _, (toks, depths) = lax.scan(step, jnp.zeros((batch_size,), jnp.int32), raw)
        mask = jnp.ones((batch_size, length), dtype)
        return Batch(one_hot(toks.T, 3, dtype), depths.T.astype(jnp.int32), mask)

    return Task(
        "brackets",
        3,
        max_depth + 1,
        "cross_entropy",
        sample,
        classification_metrics,
        "accuracy",
        True,
        {"seq_len": length, "tokens": BRACKET_TOKENS},
    )
