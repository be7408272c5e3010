"""Recurrent cells as values: a NamedTuple of pure functions over pytrees.

A :class:`Cell` is one recurrent step::

    params = cell.init(key, input_size)
    carry = cell.initial_carry(params, batch_shape)      # e.g. batch_shape=(B,)
    carry, y = cell.step(params, carry, x)               # x: [*batch_shape, input_size]

Every ``step`` works for any leading batch shape (including none), so ``jax.vmap`` of the unbatched step equals
the batched call. Steps are safe under ``jit``, ``grad``, ``vmap``, ``jvp`` and ``pmap``. Combinators
(:func:`stack`, :func:`with_readout`, :func:`learned_initial_carry`, :func:`from_flax`) map cells to cells.

Parameters under a dict key named ``"fixed"`` are not trained: steps read them through ``lax.stop_gradient`` and
:func:`trainable_mask` marks them ``False`` so optimizers (``optax.masked``) leave them alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jbptt import fused as fast

Params = Any
Carry = Any
PRNGKey = jax.Array


class Cell(NamedTuple):
    """One recurrent step as pure functions.

    Attributes:
      init: ``init(key, input_size) -> params``.
      initial_carry: ``initial_carry(params, batch_shape) -> carry`` (zeros, or a learned state in params).
      step: ``step(params, carry, x) -> (carry, y)`` with ``x: [*batch, input_size]`` and ``y: [*batch, output_size]``.
      hidden_size: size of the (real) recurrent state, for diagnostics and influence-size estimates.
      output_size: size of ``y``.
      layer: optional :class:`Layer`, a whole-sequence implementation of the same recurrence that
        :func:`jbptt.unroll.unroll` uses instead of scanning ``step`` when nothing blocks it (see :class:`Layer`).
    """

    init: Callable[[PRNGKey, int], Params]
    initial_carry: Callable[[Params, tuple[int, ...]], Carry]
    step: Callable[[Params, Carry, Any], tuple[Carry, jax.Array]]
    hidden_size: int
    output_size: int
    layer: Layer | None = None


class Layer(NamedTuple):
    """Fused whole-sequence implementations of a cell's recurrence (the fast paths of :func:`jbptt.unroll.unroll`).

    Both functions have the signature ``f(params, xs, carry, valid, reset, unroll) -> (carry, ys)`` over time-major
    ``xs: [T, B, I]`` with optional ``valid``/``reset: [T, B]`` masks (``reset`` re-initialises the carry to the
    cell's ``initial_carry``, which must be zeros; ``ys: [T, B, O]`` must be zero where ``valid`` is False) and
    ``unroll=None`` meaning "pick your own scan unroll factor". Each computes exactly what scanning ``step`` does.

    Attributes:
      step: the per-step function this layer is equivalent to. The layer is used only while
        ``cell.layer.step is cell.step``, so ``cell._replace(step=new_step)`` silently falls back to scanning
        ``new_step``.
      apply: used by :func:`~jbptt.unroll.unroll` in place of the scan when no ``scan=`` replacement is given
        (``None``: always scan ``step`` then).
      segment: used by the segmented remat schedules of :mod:`jbptt.remat` (``every_k``, ``sqrt``, ``nested``) for
        their innermost segments; meant for an implementation whose backward pass stores as little as possible
        (the Elman layer keeps only the carries). ``None``: those schedules use ``apply`` if there is one.
      segment_readout: optional ``f(params, readout_params, xs, carry, valid, reset, unroll) -> (carry, ys)``:
        ``segment`` followed by :func:`with_readout`'s linear readout (``readout_params = {"w": [H, O], "b":
        [O]}``) of every step, computed inside the layer's loops so that its backward pass never holds the
        ``[T, B, H]`` cotangent of the outputs. :func:`with_readout` uses it for its ``segment``, and for its
        ``apply_reverse`` when the core's ``apply_reverse`` is its ``segment`` (the Elman layer).
      apply_reverse: optional faster variant of ``apply`` that supports reverse-mode differentiation only (a
        ``custom_vjp``; ``jax.jvp`` of it raises). :func:`~jbptt.unroll.unroll` uses it when called with
        ``reverse_mode_only=True``, as the BPTT estimator does (the LSTM's hand-written VJP layer, the Elman
        layer).
    """

    step: Callable
    apply: Callable | None
    segment: Callable | None = None
    segment_readout: Callable | None = None
    apply_reverse: Callable | None = None


def layer_of(cell: Cell) -> Layer | None:
    """``cell.layer`` when it is valid for ``cell.step`` (see :class:`Layer`), else ``None``."""
    layer = cell.layer
    return layer if layer is not None and layer.step is cell.step else None


def segment_fn(layer: Layer | None) -> Callable | None:
    """The whole-sequence function a segmented remat schedule runs: ``layer.segment``, else ``layer.apply``."""
    if layer is None:
        return None
    return layer.segment if layer.segment is not None else layer.apply


# ----------------------------------------------------------------------------------------------------------------
# Initialisers: ``init(key, shape, dtype) -> array``.


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


def _initializer(name_or_fn) -> Callable:
    if callable(name_or_fn):
        return name_or_fn
    try:
        return INITIALIZERS[name_or_fn]
    except KeyError:
        raise ValueError(f"unknown initialiser {name_or_fn!r}; choose from {sorted(INITIALIZERS)}") from None


def params_dtype(params):
    """The floating dtype of a cell's parameters (the carry is created in it, so float64 params run in float64)."""
    return jnp.result_type(*jax.tree_util.tree_leaves(params))


def _zeros_carry(hidden: int) -> Callable:
    def initial_carry(params, batch_shape):
        return jnp.zeros((*tuple(batch_shape), hidden), params_dtype(params))

    return initial_carry


ACTIVATIONS: dict[str, Callable] = {"tanh": jnp.tanh, "relu": jax.nn.relu, "identity": lambda z: z}


def _activation(name: str) -> Callable:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}") from None


# ----------------------------------------------------------------------------------------------------------------
# Cells.


def elman(hidden: int, *, activation: str = "tanh", recurrent_init="orthogonal", input_init="lecun",
          recurrent_scale: float = 1.0, dtype=jnp.float32, fused: str | None = "reverse") -> Cell:
    """Elman RNN: ``h' = act(x W_x + h W_h + b)``; ``y = h'``.

    ``activation="relu", recurrent_init="identity"`` gives the IRNN of Le et al. (2015).

    Args:
      hidden: state size H.
      activation: ``"tanh"``, ``"relu"`` or ``"identity"`` (a linear RNN).
      recurrent_init / input_init: initialiser names (see ``INITIALIZERS``) or callables.
      recurrent_scale: multiplies the initial recurrent matrix (e.g. ``a`` for ``a * I``).
      fused: where the whole-sequence layer :func:`jbptt.fused.elman_layer` (a custom VJP that stores only the
        carries, one per step instead of JAX's three for tanh) replaces the per-step scan. ``"reverse"`` (default):
        wherever only reverse-mode derivatives are taken — the segments of the segmented remat schedules
        (:func:`jbptt.remat.every_k`, ``sqrt``, ``nested``) and ``unroll(..., reverse_mode_only=True)``, which the
        BPTT estimator uses (with :func:`with_readout` the readout then runs inside the layer's loops); a plain
        :func:`~jbptt.unroll.unroll` scans ``step``, so ``jax.jvp`` works through it. ``"vjp"``: every unroll
        (reverse mode only). ``None``: never.

    Returns:
      A :class:`Cell` with params ``{"w_x": [I, H], "w_h": [H, H], "b": [H]}``, carry ``[*batch, H]``.
    """
    act = _activation(activation)
    rinit, iinit = _initializer(recurrent_init), _initializer(input_init)

    def init(key, input_size):
        kx, kh = jax.random.split(key)
        return {"w_x": iinit(kx, (input_size, hidden), dtype),
                "w_h": recurrent_scale * rinit(kh, (hidden, hidden), dtype),
                "b": jnp.zeros((hidden,), dtype)}

    def step(params, h, x):
        h = act(x @ params["w_x"] + h @ params["w_h"] + params["b"])
        return h, h

    if fused not in (None, "reverse", "vjp"):
        raise ValueError(f"elman: fused must be None, 'reverse' or 'vjp', got {fused!r}")
    layer = None
    if fused is not None:
        def apply(params, xs, carry, valid, reset, unroll):
            return fast.elman_layer(params, xs, carry, valid, reset, activation=activation, unroll=unroll)

        def apply_readout(params, readout, xs, carry, valid, reset, unroll):
            return fast.elman_layer(params, xs, carry, valid, reset, activation=activation, readout=readout,
                                    unroll=unroll)

        layer = Layer(step, apply if fused == "vjp" else None, apply, apply_readout, apply_reverse=apply)
    return Cell(init, _zeros_carry(hidden), step, hidden, hidden, layer)


def lstm(hidden: int, *, forget_bias: float = 1.0, recurrent_init="orthogonal", input_init="lecun",
         dtype=jnp.float32, fused: str | None = "jvp") -> Cell:
    """LSTM with the four gates fused into one matrix product.

    Gate layout along the last axis of ``w_x [I, 4H]``, ``w_h [H, 4H]`` and ``b [4H]``: ``[i, f, g, o]`` (input,
    forget, candidate, output)::

        i, f, g, o = split(x W_x + h W_h + b, 4)
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g);   h' = sigmoid(o) * tanh(c')

    Args:
      hidden: state size H.
      forget_bias: initial value of the forget-gate bias (1.0 as in Jozefowicz et al. 2015).
      fused: the whole-sequence fast path :func:`jbptt.unroll.unroll` uses (``"jvp"``, ``"vjp"``, ``"hoist"``;
        see :mod:`jbptt.fused`), or ``None`` to always scan ``step``. It computes the same function as ``step``.
        With ``"jvp"`` (default) a ``reverse_mode_only=True`` unroll (the BPTT estimator) runs ``"vjp"``.

    Returns:
      A :class:`Cell` whose carry is ``(h, c)``, each ``[*batch, H]``, and ``y = h'``.
    """
    rinit, iinit = _initializer(recurrent_init), _initializer(input_init)

    def init(key, input_size):
        kx, kh = jax.random.split(key)
        w_h = jnp.concatenate([rinit(k, (hidden, hidden), dtype) for k in jax.random.split(kh, 4)], axis=1)
        b = jnp.zeros((4 * hidden,), dtype).at[hidden:2 * hidden].set(forget_bias)
        return {"w_x": iinit(kx, (input_size, 4 * hidden), dtype), "w_h": w_h, "b": b}

    def initial_carry(params, batch_shape):
        z = jnp.zeros((*tuple(batch_shape), hidden), params_dtype(params))
        return (z, z)

    def step(params, carry, x):
        h, c = carry
        z = x @ params["w_x"] + h @ params["w_h"] + params["b"]
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    # Where only reverse mode is needed (the BPTT estimator) the hand-written VJP is 5-10% faster than "jvp"'s
    # transposed tangent loop (experiments/PERFORMANCE.md).
    reverse = "vjp" if fused == "jvp" else None
    return Cell(init, initial_carry, step, 2 * hidden, hidden, _fused_layer(step, fast.lstm_layer, fused, reverse))


def _fused_layer(step, layer_fn, method: str | None, reverse_method: str | None = None) -> Layer | None:
    """A :class:`Layer` running ``layer_fn(..., method=method)`` (``None`` when ``method`` is ``None``), with
    ``layer_fn(..., method=reverse_method)`` as its reverse-mode-only variant when given."""
    if method is None:
        return None
    fast.check_method(method)

    def with_method(m):
        def apply(params, xs, carry, valid, reset, unroll):
            return layer_fn(params, xs, carry, valid, reset, unroll=unroll, method=m)

        return apply

    reverse = None if reverse_method is None else with_method(reverse_method)
    return Layer(step, with_method(method), apply_reverse=reverse)


def gru(hidden: int, *, recurrent_init="orthogonal", input_init="lecun", dtype=jnp.float32,
        fused: str | None = "jvp") -> Cell:
    """GRU in the cuDNN / ``flax.linen.GRUCell`` form (reset gate applied after the recurrent product).

    Gate layout along the last axis of ``w_x [I, 3H]``, ``w_h [H, 3H]``, ``b_x [3H]``, ``b_h [3H]``: ``[r, z, n]``::

        r = sigmoid(x W_xr + b_xr + h W_hr + b_hr);  z = sigmoid(x W_xz + b_xz + h W_hz + b_hz)
        n = tanh(x W_xn + b_xn + r * (h W_hn + b_hn));  h' = (1 - z) * n + z * h

    Args:
      hidden: state size H.
      fused: the whole-sequence fast path for :func:`jbptt.unroll.unroll`, as in :func:`lstm`.

    Returns:
      A :class:`Cell` with carry ``[*batch, H]`` and ``y = h'``.
    """
    rinit, iinit = _initializer(recurrent_init), _initializer(input_init)

    def init(key, input_size):
        kx, kh = jax.random.split(key)
        w_h = jnp.concatenate([rinit(k, (hidden, hidden), dtype) for k in jax.random.split(kh, 3)], axis=1)
        return {"w_x": iinit(kx, (input_size, 3 * hidden), dtype), "w_h": w_h,
                "b_x": jnp.zeros((3 * hidden,), dtype), "b_h": jnp.zeros((3 * hidden,), dtype)}

    def step(params, h, x):
        zx = x @ params["w_x"] + params["b_x"]
        zh = h @ params["w_h"] + params["b_h"]
        xr, xz, xn = jnp.split(zx, 3, axis=-1)
        hr, hz, hn = jnp.split(zh, 3, axis=-1)
        r = jax.nn.sigmoid(xr + hr)
        z = jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * hn)
        h = (1.0 - z) * n + z * h
        return h, h

    return Cell(init, _zeros_carry(hidden), step, hidden, hidden, _fused_layer(step, fast.gru_layer, fused))


def diagonal_linear(hidden: int, output_size: int | None = None, *, complex_valued: bool = True,
                    r_min: float = 0.9, r_max: float = 0.999, max_phase: float = 2 * np.pi,
                    normalize_input: bool = True, dtype=jnp.float32) -> Cell:
    """Diagonal linear recurrence in the style of the LRU (Orvieto et al. 2023).

    ``h' = lambda * h + gamma * (x B)`` and ``y = Re(h' C) + x D`` with a diagonal ``lambda`` parameterised
    stably as ``lambda = exp(-exp(nu) + i exp(theta))`` (so ``|lambda| < 1`` for any ``nu``), eigenvalue
    magnitudes initialised uniformly on the ring ``[r_min, r_max]`` and ``gamma = sqrt(1 - |lambda|^2)`` input
    normalisation. All arithmetic is real: the complex state is carried as ``(re, im)``.

    Args:
      hidden: number of (complex) state dimensions N.
      output_size: size of ``y`` (default: ``hidden``).
      complex_valued: ``False`` gives a real diagonal recurrence ``lambda = exp(-exp(nu))`` (no ``theta``).

    Returns:
      A :class:`Cell` with carry ``(re, im)`` (``[*batch, N]`` each; ``im`` absent for real cells) and
      ``y: [*batch, output_size]``.
    """
    out = hidden if output_size is None else output_size

    def init(key, input_size):
        ku, kp, kb, kbi, kc, kci, kd = jax.random.split(key, 7)
        u = jax.random.uniform(ku, (hidden,), dtype)
        nu = jnp.log(-0.5 * jnp.log(u * (r_max**2 - r_min**2) + r_min**2))
        params = {"nu": nu.astype(dtype),
                  "b_re": jax.random.normal(kb, (input_size, hidden), dtype) / np.sqrt(2 * input_size),
                  "c_re": jax.random.normal(kc, (hidden, out), dtype) / np.sqrt(hidden),
                  "d": jax.random.normal(kd, (input_size, out), dtype) / np.sqrt(input_size)}
        if complex_valued:
            theta = jnp.log(max_phase * jax.random.uniform(kp, (hidden,), dtype))
            params.update(theta=theta.astype(dtype),
                          b_im=jax.random.normal(kbi, (input_size, hidden), dtype) / np.sqrt(2 * input_size),
                          c_im=jax.random.normal(kci, (hidden, out), dtype) / np.sqrt(hidden))
        return params

    def initial_carry(params, batch_shape):
        z = jnp.zeros((*tuple(batch_shape), hidden), params_dtype(params))
        return (z, z) if complex_valued else (z,)

    def step(params, carry, x):
        mag = jnp.exp(-jnp.exp(params["nu"]))
        gamma = jnp.sqrt(1.0 - mag**2) if normalize_input else 1.0
        if complex_valued:
            re, im = carry
            phase = jnp.exp(params["theta"])
            lam_re, lam_im = mag * jnp.cos(phase), mag * jnp.sin(phase)
            u_re = gamma * (x @ params["b_re"])
            u_im = gamma * (x @ params["b_im"])
            re, im = lam_re * re - lam_im * im + u_re, lam_re * im + lam_im * re + u_im
            y = re @ params["c_re"] - im @ params["c_im"] + x @ params["d"]
            return (re, im), y
        (re,) = carry
        re = mag * re + gamma * (x @ params["b_re"])
        return (re,), re @ params["c_re"] + x @ params["d"]

    return Cell(init, initial_carry, step, (2 if complex_valued else 1) * hidden, out)


def indrnn(hidden: int, *, activation: str = "relu", recurrent_max: float = 1.0, input_init="lecun",
           dtype=jnp.float32) -> Cell:
    """IndRNN (Li et al. 2018): element-wise recurrence ``h' = act(x W + u * h + b)``.

    ``u`` is initialised uniformly in ``[-recurrent_max, recurrent_max]`` (keep it at most 1 for stability).

    Returns:
      A :class:`Cell` with params ``{"w": [I, H], "u": [H], "b": [H]}`` and carry ``[*batch, H]``.
    """
    act = _activation(activation)
    iinit = _initializer(input_init)

    def init(key, input_size):
        kw, ku = jax.random.split(key)
        return {"w": iinit(kw, (input_size, hidden), dtype),
                "u": jax.random.uniform(ku, (hidden,), dtype, -recurrent_max, recurrent_max),
                "b": jnp.zeros((hidden,), dtype)}

    def step(params, h, x):
        h = act(x @ params["w"] + params["u"] * h + params["b"])
        return h, h

    return Cell(init, _zeros_carry(hidden), step, hidden, hidden)


def esn(hidden: int, *, spectral_radius: float = 0.9, leak_rate: float = 1.0, input_scaling: float = 1.0,
        density: float = 0.1, bias_scaling: float = 0.0, dtype=jnp.float32) -> Cell:
    """Echo State Network reservoir (Jaeger 2001) with fixed random weights.

    ``h' = (1 - a) h + a tanh(s x W_in + h W + b)`` where ``W`` is a sparse random matrix (``density`` of its
    entries non-zero) rescaled to the given spectral radius, ``a`` is the leak rate and ``s`` the input scaling.
    All parameters live under ``params["fixed"]``: the step reads them through ``stop_gradient`` and
    :func:`trainable_mask` marks them untrained. A readout is usually fitted in closed form on the states.

    ``init`` rescales ``W`` on the host (eigenvalues in float64), so call it outside ``jit``.

    Returns:
      A :class:`Cell` with carry ``[*batch, H]`` and ``y = h'``.
    """
    if not 0.0 < leak_rate <= 1.0:
        raise ValueError(f"esn leak_rate must be in (0, 1], got {leak_rate}")

    def init(key, input_size):
        kw, km, ki, kb = jax.random.split(key, 4)
        w = jax.random.normal(kw, (hidden, hidden), jnp.float32)
        w = jnp.where(jax.random.bernoulli(km, density, (hidden, hidden)), w, 0.0)
        w = scale_to_spectral_radius(np.asarray(w, np.float64), spectral_radius)
        w_in = input_scaling * jax.random.uniform(ki, (input_size, hidden), jnp.float32, -1.0, 1.0)
        b = bias_scaling * jax.random.uniform(kb, (hidden,), jnp.float32, -1.0, 1.0)
        return {"fixed": {"w": jnp.asarray(w, dtype), "w_in": w_in.astype(dtype), "b": b.astype(dtype)}}

    def step(params, h, x):
        p = lax.stop_gradient(params["fixed"])
        h = (1.0 - leak_rate) * h + leak_rate * jnp.tanh(x @ p["w_in"] + h @ p["w"] + p["b"])
        return h, h

    return Cell(init, _zeros_carry(hidden), step, hidden, hidden)


# ----------------------------------------------------------------------------------------------------------------
# Combinators: functions from cells to cells.


def split_step_key(x):
    """Splits a step input into ``(x, key)``: ``key`` is ``None`` unless ``x`` is a ``(x, key)`` tuple."""
    if isinstance(x, tuple) and len(x) == 2:
        return x
    return x, None


def dropout(key, y, rate: float):
    """Inverted dropout on ``y: [*batch, H]`` with one PRNG key per batch element (``key: [*batch]`` typed keys).

    Returns ``y`` unchanged when ``key`` is ``None`` or ``rate == 0`` (evaluation).
    """
    if key is None or rate == 0.0:
        return y
    keys = jnp.reshape(key, (-1,))
    flat = jnp.reshape(y, (keys.shape[0], -1))
    keep = jax.vmap(lambda k, v: jax.random.bernoulli(k, 1.0 - rate, v.shape))(keys, flat)
    return jnp.reshape(jnp.where(keep, flat / (1.0 - rate), 0.0), y.shape)


def stack(cells: Sequence[Cell], *, residual: bool = False, dropout_rate: float = 0.0) -> Cell:
    """Multi-layer cell: layer ``l`` reads layer ``l-1``'s output at the same time step.

    Args:
      cells: the layers, bottom first.
      residual: add each layer's input to its output where the sizes match (from the second layer on).
      dropout_rate: dropout between layers. It is active only when the step input is a tuple ``(x, key)`` with
        ``key: [*batch]`` typed PRNG keys (see :func:`jbptt.unroll.with_step_keys`); a plain ``x`` means no dropout.

    Returns:
      A :class:`Cell` with params and carry as tuples over layers and ``y`` the top layer's output.
    """
    cells = tuple(cells)
    if not cells:
        raise ValueError("stack needs at least one cell")

    def init(key, input_size):
        params, size = [], input_size
        for cell, k in zip(cells, jax.random.split(key, len(cells)), strict=True):
            params.append(cell.init(k, size))
            size = cell.output_size
        return tuple(params)

    def initial_carry(params, batch_shape):
        return tuple(c.initial_carry(p, batch_shape) for c, p in zip(cells, params, strict=True))

    def step(params, carry, x):
        x, key = split_step_key(x)
        keys = [None] * len(cells) if key is None else _split_batched_keys(key, len(cells))
        new_carry = []
        for l, (cell, p, c) in enumerate(zip(cells, params, carry, strict=True)):
            if l > 0:
                x = dropout(keys[l], x, dropout_rate)
            c, y = cell.step(p, c, x)
            if residual and l > 0 and y.shape[-1] == x.shape[-1]:
                y = y + x
            new_carry.append(c)
            x = y
        return tuple(new_carry), x

    layers = [layer_of(c) for c in cells]

    def layered(fns):  # layer by layer over the whole sequence, with each layer's whole-sequence function `fns[l]`
        if any(f is None for f in fns):
            return None

        def apply(params, xs, carry, valid, reset, unroll):
            new_carry, x = [], xs
            for l, (f, p, c) in enumerate(zip(fns, params, carry, strict=True)):
                c, y = f(p, x, c, valid, reset, unroll)
                if residual and l > 0 and y.shape[-1] == x.shape[-1]:
                    y = y + x
                new_carry.append(c)
                x = y
            return tuple(new_carry), x

        return apply

    # Dropout needs per-step keys, so it only ever runs in `step` (unroll uses a layer only for plain array inputs,
    # where `step` applies no dropout either).
    layer = None
    if all(lay is not None for lay in layers):
        reverse = None
        if any(lay.apply_reverse is not None for lay in layers):
            reverse = layered([lay.apply_reverse or lay.apply for lay in layers])
        layer = Layer(step, layered([lay.apply for lay in layers]), layered([segment_fn(lay) for lay in layers]),
                      apply_reverse=reverse)
    return Cell(init, initial_carry, step, sum(c.hidden_size for c in cells), cells[-1].output_size, layer)


def _split_batched_keys(key, n: int):
    flat = jnp.reshape(key, (-1,))
    split = jax.vmap(lambda k: jax.random.split(k, n))(flat)  # [B, n]
    return [jnp.reshape(split[:, i], jnp.shape(key)) for i in range(n)]


def with_readout(cell: Cell, output_size: int, *, init=lecun) -> Cell:
    """Adds a linear readout ``y = cell_y W + b`` to a cell (logits for classification, values for regression).

    Returns:
      A :class:`Cell` with params ``{"core": ..., "readout": {"w": [O_cell, output_size], "b": [output_size]}}``.
    """
    winit = _initializer(init)

    def init_fn(key, input_size):
        kc, kr = jax.random.split(key)
        core = cell.init(kc, input_size)
        dtype = jax.tree_util.tree_leaves(core)[0].dtype
        return {"core": core,
                "readout": {"w": winit(kr, (cell.output_size, output_size), dtype),
                            "b": jnp.zeros((output_size,), dtype)}}

    def initial_carry(params, batch_shape):
        return cell.initial_carry(params["core"], batch_shape)

    def step(params, carry, x):
        carry, y = cell.step(params["core"], carry, x)
        return carry, y @ params["readout"]["w"] + params["readout"]["b"]

    def read_out(core_fn):  # the core's whole-sequence function, then the readout of all steps as one product
        if core_fn is None:
            return None

        def apply(params, xs, carry, valid, reset, unroll):
            carry, ys = core_fn(params["core"], xs, carry, valid, reset, unroll)
            ys = fast.dense(ys, params["readout"]["w"], params["readout"]["b"])
            return carry, ys if valid is None else jnp.where(valid[..., None], ys, jnp.zeros((), ys.dtype))

        return apply

    core_layer, layer = layer_of(cell), None
    if core_layer is not None:
        core_segment = segment_fn(core_layer)
        segment, reverse = read_out(core_segment), read_out(core_layer.apply_reverse)
        if core_layer.segment_readout is not None:
            def segment(params, xs, carry, valid, reset, unroll):  # the readout inside the core's loops
                return core_layer.segment_readout(params["core"], params["readout"], xs, carry, valid, reset, unroll)

            if core_layer.apply_reverse is core_segment:
                reverse = segment
        layer = Layer(step, read_out(core_layer.apply), segment, apply_reverse=reverse)
    return Cell(init_fn, initial_carry, step, cell.hidden_size, output_size, layer)


def learned_initial_carry(cell: Cell) -> Cell:
    """Makes the initial carry a trained parameter ``params["carry0"]`` broadcast over the batch.

    Returns:
      A :class:`Cell` with params ``{"core": cell_params, "carry0": carry}`` (carry0 starts at the cell's own
      initial carry for an empty batch shape).
    """

    def init(key, input_size):
        core = cell.init(key, input_size)
        return {"core": core, "carry0": cell.initial_carry(core, ())}

    def initial_carry(params, batch_shape):
        return jax.tree.map(lambda c: jnp.broadcast_to(c, (*tuple(batch_shape), *c.shape)), params["carry0"])

    def step(params, carry, x):
        return cell.step(params["core"], carry, x)

    return Cell(init, initial_carry, step, cell.hidden_size, cell.output_size)


def from_flax(module, *, output_size: int | None = None) -> Cell:
    """Adapts a ``flax.linen`` recurrent cell (``RNNCellBase``: ``LSTMCell``, ``GRUCell``, ...) into a Cell.

    The params are the module's variables dict; ``step`` is ``module.apply``, so outputs equal
    ``flax.linen.RNN(module)`` on the same parameters.

    Args:
      module: a ``flax.linen.RNNCellBase`` instance (e.g. ``nn.LSTMCell(features=32)``).
      output_size: size of ``y`` (default: ``module.features``).

    Returns:
      A :class:`Cell` whose carry is the module's carry for ``batch_shape``.
    """
    features = getattr(module, "features", None)
    if output_size is None:
        if features is None:
            raise ValueError("from_flax: the module has no `features`; pass output_size")
        output_size = features

    def init(key, input_size):
        carry = module.initialize_carry(key, (1, input_size))
        return module.init(key, carry, jnp.zeros((1, input_size)))

    def initial_carry(params, batch_shape):
        del params
        # The carry's shape depends only on the batch dims (input_shape[:-1]) and module.features.
        return module.initialize_carry(jax.random.key(0), (*tuple(batch_shape), 1))

    def step(params, carry, x):
        return module.apply(params, carry, x)

    hidden = features * (2 if "LSTM" in type(module).__name__ else 1) if features else output_size
    return Cell(init, initial_carry, step, hidden, output_size)


def trainable_mask(params) -> Any:
    """A pytree of booleans like ``params``: ``False`` for leaves under a ``"fixed"`` dict key, else ``True``.

    Use with ``optax.masked`` so that optimizers and weight decay leave fixed (e.g. ESN reservoir) weights alone.
    """

    def is_trainable(path, leaf):
        del leaf
        return not any(getattr(k, "key", None) == "fixed" for k in path)

    return jax.tree_util.tree_map_with_path(is_trainable, params)


def count_params(params) -> int:
    """Number of scalar parameters in a pytree."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params)))


CELLS: dict[str, Callable[..., Cell]] = {
    "elman": elman,
    "lstm": lstm,
    "gru": gru,
    "diagonal_linear": diagonal_linear,
    "lru": diagonal_linear,
    "indrnn": indrnn,
    "esn": esn,
}
