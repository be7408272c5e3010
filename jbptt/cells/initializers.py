"""Initialisers ``init(key, shape, dtype) -> array``, spectral-radius helpers and the activation table."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def glorot(key, shape, dtype=jnp.float32):
    """Glorot/Xavier uniform initialiser for a ``[fan_in, fan_out]`` matrix."""
    return jax.nn.initializers.glorot_uniform()(key, shape, dtype)


def lecun(key, shape, dtype=jnp.float32):
    """LeCun normal initialiser (variance ``1/fan_in``) for a ``[fan_in, fan_out]`` matrix."""
    return jax.nn.initializers.lecun_normal()(key, shape, dtype)


def orthogonal(key, shape, dtype=jnp.float32):
    """Random orthogonal matrix (blocks of orthogonal columns for non-square shapes)."""
    return jax.nn.initializers.orthogonal()(key, shape, dtype)


def identity(key, shape, dtype=jnp.float32):
    """Identity initialiser (Le et al. 2015, IRNN); ``shape`` must be square."""
    del key
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"identity initialiser needs a square shape, got {shape}")
    return jnp.eye(shape[0], dtype=dtype)


def spectral_radius(w) -> float:
    """Largest absolute eigenvalue of the square matrix ``w`` (computed on the host in float64)."""
    return float(np.max(np.abs(np.linalg.eigvals(np.asarray(w, dtype=np.float64)))))


def scale_to_spectral_radius(w, radius: float):
    """Returns ``w`` rescaled so that its spectral radius equals ``radius``. Host-side: not for use under jit."""
    rho = spectral_radius(w)
    if rho == 0.0:
        raise ValueError("cannot rescale a matrix whose spectral radius is 0")
    return (jnp.asarray(w) * (radius / rho)).astype(jnp.asarray(w).dtype)


INITIALIZERS: dict[str, Callable] = {
    "glorot": glorot,
    "lecun": lecun,
    "orthogonal": orthogonal,
    "identity": identity,
}


def get_initializer(name_or_fn) -> Callable:
    """An initialiser by name (see ``INITIALIZERS``), or ``name_or_fn`` itself when it is callable."""
    if callable(name_or_fn):
        return name_or_fn
    try:
        return INITIALIZERS[name_or_fn]
    except KeyError:
        raise ValueError(f"unknown initialiser {name_or_fn!r}; choose from {sorted(INITIALIZERS)}") from None


ACTIVATIONS: dict[str, Callable] = {"tanh": jnp.tanh, "relu": jax.nn.relu, "identity": lambda z: z}


def get_activation(name: str) -> Callable:
    """An activation by name (see ``ACTIVATIONS``), with one clear error for an unknown name."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}") from None
