"""The plain recurrent cells: Elman (tanh/ReLU, IRNN), LSTM, GRU, diagonal linear (LRU-style), IndRNN, ESN.

Each factory returns a :class:`~jbptt.cells.base.Cell` of three pure functions; the fused fast paths of the
Elman, LSTM and GRU cells are attached by :mod:`jbptt.fused`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jbptt.cells.base import Cell, check_size, params_dtype, zeros_carry
from jbptt.cells.initializers import get_activation, get_initializer, scale_to_spectral_radius


def lstm_update(z, c):
    """The LSTM's gate nonlinearities: pre-activations ``z [..., 4H]`` (``[i, f, g, o]``) and cell state
    ``c [..., H]`` -> ``(h, c)`` of the next step."""
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


def gru_update(zx, zh, h):
    """The GRU's gates (cuDNN form): input and recurrent pre-activations ``zx, zh [..., 3H]`` (``[r, z, n]``, biases
    included) and ``h [..., H]`` -> the next ``h``."""
    xr, xz, xn = jnp.split(zx, 3, axis=-1)
    hr, hz, hn = jnp.split(zh, 3, axis=-1)
    r = jax.nn.sigmoid(xr + hr)
    z = jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    return (1.0 - z) * n + z * h


def elman(hidden: int, *, activation: str = "tanh", recurrent_init="orthogonal", input_init="lecun",
          recurrent_scale: float = 1.0, dtype=jnp.float32) -> Cell:
    """Elman RNN: ``h' = act(x W_x + h W_h + b)``; ``y = h'``.

    ``activation="relu", recurrent_init="identity"`` gives the IRNN of Le et al. (2015).

    Args:
      hidden: state size H.
      activation: ``"tanh"``, ``"relu"`` or ``"identity"`` (a linear RNN).
      recurrent_init / input_init: initialiser names (see ``INITIALIZERS``) or callables.
      recurrent_scale: multiplies the initial recurrent matrix (e.g. ``a`` for ``a * I``).

    Returns:
      A :class:`Cell` with params ``{"w_x": [I, H], "w_h": [H, H], "b": [H]}``, carry ``[*batch, H]``.
    """
    check_size("elman", hidden)
    act = get_activation(activation)
    rinit, iinit = get_initializer(recurrent_init), get_initializer(input_init)

    def init(key, input_size):
        kx, kh = jax.random.split(key)
        return {"w_x": iinit(kx, (input_size, hidden), dtype),
                "w_h": recurrent_scale * rinit(kh, (hidden, hidden), dtype),
                "b": jnp.zeros((hidden,), dtype)}

    def step(params, h, x):
        h = act(x @ params["w_x"] + h @ params["w_h"] + params["b"])
        return h, h

    return Cell(init, zeros_carry(hidden), step, hidden, hidden)


def lstm(hidden: int, *, forget_bias: float = 1.0, recurrent_init="orthogonal", input_init="lecun",
         dtype=jnp.float32) -> Cell:
    """LSTM with the four gates fused into one matrix product.

    Gate layout along the last axis of ``w_x [I, 4H]``, ``w_h [H, 4H]`` and ``b [4H]``: ``[i, f, g, o]`` (input,
    forget, candidate, output)::

        i, f, g, o = split(x W_x + h W_h + b, 4)
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g);   h' = sigmoid(o) * tanh(c')

    Args:
      hidden: state size H.
      forget_bias: initial value of the forget-gate bias (1.0 as in Jozefowicz et al. 2015).

    Returns:
      A :class:`Cell` whose carry is ``(h, c)``, each ``[*batch, H]``, and ``y = h'``.
    """
    check_size("lstm", hidden)
    rinit, iinit = get_initializer(recurrent_init), get_initializer(input_init)

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
        h, c = lstm_update(z, c)
        return (h, c), h

    return Cell(init, initial_carry, step, 2 * hidden, hidden)


def gru(hidden: int, *, recurrent_init="orthogonal", input_init="lecun", dtype=jnp.float32) -> Cell:
    """GRU in the cuDNN / ``flax.linen.GRUCell`` form (reset gate applied after the recurrent product).

    Gate layout along the last axis of ``w_x [I, 3H]``, ``w_h [H, 3H]``, ``b_x [3H]``, ``b_h [3H]``: ``[r, z, n]``::

        r = sigmoid(x W_xr + b_xr + h W_hr + b_hr);  z = sigmoid(x W_xz + b_xz + h W_hz + b_hz)
        n = tanh(x W_xn + b_xn + r * (h W_hn + b_hn));  h' = (1 - z) * n + z * h

    Args:
      hidden: state size H.

    Returns:
      A :class:`Cell` with carry ``[*batch, H]`` and ``y = h'``.
    """
    check_size("gru", hidden)
    rinit, iinit = get_initializer(recurrent_init), get_initializer(input_init)

    def init(key, input_size):
        kx, kh = jax.random.split(key)
        w_h = jnp.concatenate([rinit(k, (hidden, hidden), dtype) for k in jax.random.split(kh, 3)], axis=1)
        return {"w_x": iinit(kx, (input_size, 3 * hidden), dtype), "w_h": w_h,
                "b_x": jnp.zeros((3 * hidden,), dtype), "b_h": jnp.zeros((3 * hidden,), dtype)}

    def step(params, h, x):
        zx = x @ params["w_x"] + params["b_x"]
        zh = h @ params["w_h"] + params["b_h"]
        h = gru_update(zx, zh, h)
        return h, h

    return Cell(init, zeros_carry(hidden), step, hidden, hidden)


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
    check_size("diagonal_linear", hidden)
    out = hidden if output_size is None else output_size

    def init(key, input_size):
        ku, kp, kb, kbi, kc, kci, kd = jax.random.split(key, 7)
        u = jax.random.uniform(ku, (hidden,), dtype)
        nu = jnp.log(-0.5 * jnp.log(u * (r_max**2 - r_min**2) + r_min**2))
        params = {"nu": nu.astype(dtype),
                  "b_re": jax.random.normal(kb, (input_size, hidden), dtype) / math.sqrt(2 * input_size),
                  "c_re": jax.random.normal(kc, (hidden, out), dtype) / math.sqrt(hidden),
                  "d": jax.random.normal(kd, (input_size, out), dtype) / math.sqrt(input_size)}
        if complex_valued:
            theta = jnp.log(max_phase * jax.random.uniform(kp, (hidden,), dtype))
            params.update(theta=theta.astype(dtype),
                          b_im=jax.random.normal(kbi, (input_size, hidden), dtype) / math.sqrt(2 * input_size),
                          c_im=jax.random.normal(kci, (hidden, out), dtype) / math.sqrt(hidden))
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
    check_size("indrnn", hidden)
    act = get_activation(activation)
    iinit = get_initializer(input_init)

    def init(key, input_size):
        kw, ku = jax.random.split(key)
        return {"w": iinit(kw, (input_size, hidden), dtype),
                "u": jax.random.uniform(ku, (hidden,), dtype, -recurrent_max, recurrent_max),
                "b": jnp.zeros((hidden,), dtype)}

    def step(params, h, x):
        h = act(x @ params["w"] + params["u"] * h + params["b"])
        return h, h

    return Cell(init, zeros_carry(hidden), step, hidden, hidden)


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
    check_size("esn", hidden)
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

    return Cell(init, zeros_carry(hidden), step, hidden, hidden)
