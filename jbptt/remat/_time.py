"""Time-axis helpers shared by the schedules and the executor: leaves are time-major, ``[T, ...]``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def length(xs) -> int:
    """The number of steps ``T`` of time-major ``xs``."""
    leaves = jax.tree_util.tree_leaves(xs)
    if not leaves:
        raise ValueError("remat scan: xs has no arrays (a scan with length= only is not supported)")
    return int(jnp.shape(leaves[0])[0])


def flip(tree):
    """Reverses the time axis of every leaf."""
    return jax.tree.map(lambda a: jnp.flip(a, 0), tree)


def window(xs, start: int, stop: int):
    """Steps ``[start, stop)`` of every leaf."""
    return jax.tree.map(lambda a: a[start:stop], xs)


def concat(parts):
    """Concatenates pytrees along time, skipping ``None`` parts."""
    parts = [p for p in parts if p is not None]
    if len(parts) == 1:
        return parts[0]
    return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *parts)


def forward_only(scan_impl):
    """Adds ``reverse=`` to a forward-only scan implementation ``scan_impl(body, init, xs, unroll)``, giving a
    ``lax.scan`` drop-in ``scan(body, init, xs, reverse=False, unroll=1)``."""

    @functools.wraps(scan_impl)
    def scan(body, init, xs, reverse: bool = False, unroll: int = 1):
        if reverse:
            carry, ys = scan_impl(body, init, flip(xs), unroll)
            return carry, flip(ys)
        return scan_impl(body, init, xs, unroll)

    return scan


def per_length(make_scan):
    """A ``lax.scan`` drop-in that builds its implementation for the ``T`` seen at trace time with
    ``make_scan(T)`` (cached: planning happens once per length)."""
    executor = functools.lru_cache(maxsize=16)(make_scan)

    def scan(body, init, xs, reverse: bool = False, unroll: int = 1):
        return executor(length(xs))(body, init, xs, reverse=reverse, unroll=unroll)

    return scan
