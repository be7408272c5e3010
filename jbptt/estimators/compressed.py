"""The compressed per-unit influence (SnAp-1, exact RTRL on element-wise cells, KF-RTRL) and the eligibility-trace
estimator of e-prop and RFLO.

For a cell whose carry is ``C`` leaves of shape ``[N]`` (units) and whose parameters each drive one unit, the
influence ``d s / d theta`` is stored as ``[R, C*N]`` rows (layout :class:`~jbptt.estimators.online.UnitRows`):
row ``r`` holds ``d s[c, j] / d theta[idx[r, j]]`` for every unit ``j``. Memory O(P) per example. With a split
(:func:`~jbptt.estimators.online.state_acting`) rows and row jvps cover only the state-acting ``theta_s``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jbptt.cells import Cell
from jbptt.estimator import GradientEstimator
from jbptt.estimators.online import (
    Core,
    FlatStep,
    UnitRows,
    check_on_example,
    flat_step,
    online_estimator,
    step_jacobian_support,
    unit_rows,
)
from jbptt.losses import LossFn


def row_tangents(rows: UnitRows, P: int, dtype):
    """``[R, P]`` tangents: row ``r`` is 1 at the positions ``rows.idx[r]`` (all units at once). Pass ``P = Ps``
    for tangents of ``theta_s`` alone."""
    R = rows.idx.shape[0]
    return jnp.zeros((R, P), dtype).at[np.arange(R)[:, None], rows.idx].set(1.0)


def scatter_rows(rows: UnitRows, values, P: int):
    """Scatters per-row, per-unit values ``[R, N]`` to a flat ``[P]`` vector at ``rows.idx``."""
    return jnp.zeros((P,), values.dtype).at[rows.idx.reshape(-1)].add(values.reshape(-1))


def compressed_gradient(rows: UnitRows, trace, gs, P: int):
    """``sum_{c} gs[c, j] * trace[r, c, j]`` scattered to ``[P]``: the influence term of the gradient.

    Args:
      trace: ``[R, C*N]`` compressed influence; ``gs``: ``[C*N]`` the loss cotangent of the carry.
    """
    R = rows.idx.shape[0]
    v = jnp.sum(trace.reshape(R, rows.C, rows.N) * gs.reshape(rows.C, rows.N), axis=1)
    return scatter_rows(rows, v, P)


def compressed_trace0(rows: UnitRows):
    """``trace0`` for the compressed influence: ``d s0 / d theta`` along the row tangents (zero for a fixed s0)."""

    def trace0(fs: FlatStep, theta, key):
        del key
        tangents = row_tangents(rows, fs.Ps, theta.dtype)
        carry0 = lambda ths: fs.carry0_parts(ths, theta[fs.Ps:])
        return jax.vmap(lambda t: jax.jvp(carry0, (theta[:fs.Ps],), (t,))[1])(tangents)

    return trace0


def unit_blocks(D, C: int, N: int):
    """The per-unit ``C x C`` blocks of a carry Jacobian ``D: [C*N, C*N]``. Returns ``[N, C, C]``."""
    return jnp.einsum("cjdj->jcd", D.reshape(C, N, C, N))


def compressed_core(rows: UnitRows, block: Callable | None, *, readout: Callable | None = None,
                    feedback: Callable | None = None) -> Core:
    """A core that advances the compressed influence ``[R, C*N]``.

    Args:
      rows: the layout.
      block: ``None`` for the exact element-wise update (one jvp per row, exact when the carry Jacobian is
        block-diagonal per unit); otherwise ``block(blocks [N, C, C], fs, theta, s, x) -> [N, C, C]``: the per-unit
        blocks of the carry Jacobian that the approximation keeps (SnAp-1: all of them; e-prop: the internal
        components; RFLO: a leak).
      readout: optional ``readout(params, new_carry, x) -> y`` equal to the step's output. Given it, the gradient
        is ``dl/dtheta|_readout + (dl/ds_t) J_t`` with the approximate ``J_t`` (the e-prop / RFLO form: learning
        signal at ``s_t`` times eligibility). Without it, ``(dl/ds_{t-1}) J_{t-1}`` plus the exact immediate term
        is used (any cell; SnAp, exact element-wise RTRL).
      feedback: optional ``feedback(gy [O], gs [n]) -> gs`` replacing the learning signal ``dl/ds_t`` (RFLO's
        random feedback); needs ``readout``.
    """

    def core(fs: FlatStep, theta, s, trace, x, loss_grad, key):
        del key
        f = lambda th, ss: fs.step(th, ss, x)
        if readout is None:
            (s_new, y), vjp = jax.vjp(f, theta, s)
            loss, gy = loss_grad(y)
            gth, gs = vjp((jnp.zeros_like(s_new), gy))
            grad = gth + compressed_gradient(rows, trace, gs, fs.P)
        ths, tho = theta[:fs.Ps], theta[fs.Ps:]
        s_lin, lin = jax.linearize(lambda th, ss: fs.step_parts(th, tho, ss, x)[0], ths, s)
        R = rows.idx.shape[0]
        if block is None:
            new = jax.vmap(lin)(row_tangents(rows, fs.Ps, theta.dtype), trace)
        else:
            # The immediate influence m[r, c, j] = d s[c, j] / d theta[idx[r, j]] by one vjp per carry component:
            # every parameter on the layout drives only its own unit (checked by ``check_unit_rows``), so the
            # gradient of sum_j s[c, j] holds exactly these entries. O(C) passes and O(P) memory, where R jvps
            # along [R, P] one-hot tangents would cost O(R P).
            _, pull = jax.vjp(lambda th: fs.step_parts(th, tho, s, x)[0], ths)
            comps = jnp.repeat(jnp.eye(rows.C, dtype=s.dtype), rows.N, axis=1)  # [C, C*N]
            g = jax.vmap(lambda e: pull(e)[0])(comps)  # [C, Ps]
            m = jnp.transpose(g[:, rows.idx], (1, 0, 2)).reshape(R, rows.C * rows.N)
            d_cols = jax.vmap(lambda e: lin(jnp.zeros_like(ths), e))(jnp.eye(fs.n, dtype=s.dtype))  # D^T
            blocks = block(unit_blocks(d_cols.T, rows.C, rows.N), fs, theta, s, x)
            prop = jnp.einsum("jcd,rdj->rcj", blocks, trace.reshape(R, rows.C, rows.N))
            new = prop.reshape(R, rows.C * rows.N) + m
        if readout is not None:
            s_new = s_lin  # the step's new carry, already computed by the linearisation above
            y, vjp = jax.vjp(lambda th, sn: readout(fs.params(th), fs.unravel_carry(sn), x), theta, s_new)
            loss, gy = loss_grad(y)
            gth, gs = vjp(gy)
            if feedback is not None:
                gs = feedback(gy, gs)
            grad = gth + compressed_gradient(rows, new, gs, fs.P)
        return s_new, new, loss, grad

    return core


def check_unit_structure(cell: Cell, params, x, *, key=None, atol: float = 0.0):
    """Checks at random probe points that ``cell`` is element-wise, as ``rtrl(diagonal=True)`` needs.

    Element-wise means: the carry Jacobian is block-diagonal per unit and every parameter drives only its own unit
    (:func:`~jbptt.estimators.online.unit_rows`). The Jacobians are unioned over several perturbed points around
    ``(params, x)`` (:func:`~jbptt.estimators.online.step_jacobian_support`), so that a coupling hidden at one point
    (a ReLU unit that is inactive there) is still seen. ``x`` is one example's input (e.g. ``[I]``). Raises
    ``ValueError`` naming the violation; call it eagerly (outside ``jit``).
    """
    rows = unit_rows(cell, params)
    fs = flat_step(cell, params)
    key = jax.random.key(0) if key is None else key
    M, D = jax.jit(lambda th, xx, k: step_jacobian_support(fs, th, xx, k))(fs.theta, x, key)
    C, N = rows.C, rows.N
    unit = np.arange(C * N) % N
    off = np.abs(np.asarray(D))[unit[:, None] != unit[None, :]]
    if off.size and off.max() > atol:
        raise ValueError("rtrl(diagonal=True) needs an element-wise recurrence, but the carry Jacobian couples "
                         f"different units (max |off-block entry| = {off.max():.3g}); use dense rtrl or snap1")
    allowed = np.zeros((C * N, fs.P), bool)
    for r in range(rows.idx.shape[0]):
        for j in range(N):
            allowed[unit == j, rows.idx[r, j]] = True
    bad = np.abs(np.asarray(M))[~allowed]
    if bad.size and bad.max() > atol:
        raise ValueError("rtrl(diagonal=True): some parameter drives a unit other than its own (max |entry| = "
                         f"{bad.max():.3g}); use dense rtrl or snap1")


def check_unit_rows(name: str, cell: Cell, params, x, acting=None, *, key=None, rtol: float = 1e-4):
    """Checks at a random point that every parameter the unit-wise layout (:func:`unit_rows`) puts at unit ``j``
    drives unit ``j`` only, so the compressed influence loses nothing it claims to keep.

    One jvp per row gives ``d_r[:, j] = ds/dtheta[idx[r, j]]`` if the layout is right; one more jvp along random
    weights ``z [R, N]`` on the same positions must then equal ``sum_r z[r, j] d_r[:, j]``. A parameter that drives
    another unit (e.g. a sparse cell's flat ``[nnz]`` recurrent values whose count happens to be a multiple of
    ``N``) breaks the equality. Cost: one step of the compressed core. ``x``: one example's input. Eager only.

    Raises:
      ValueError: naming ``name`` and what to use instead.
    """
    rows = unit_rows(cell, params, acting)
    if rows.idx.shape[0] == 0:
        return
    fs = flat_step(cell, params, acting)
    R, C, N = rows.idx.shape[0], rows.C, rows.N

    @jax.jit
    def residual(theta, x, key):
        k1, k2, k3 = jax.random.split(key, 3)
        theta = theta + 0.1 * jax.random.normal(k1, theta.shape, theta.dtype)
        s = jax.random.normal(k2, (fs.n,), theta.dtype)
        z = jax.random.normal(k3, rows.idx.shape, theta.dtype)
        step = lambda th: fs.step(th, s, x)[0]
        d = jax.vmap(lambda t: jax.jvp(step, (theta,), (t,))[1])(row_tangents(rows, fs.P, theta.dtype))
        u = jax.jvp(step, (theta,), (scatter_rows(rows, z, fs.P),))[1]
        want = jnp.sum(d.reshape(R, C, N) * z[:, None, :], axis=0).reshape(-1)
        return jnp.max(jnp.abs(u - want)), jnp.max(jnp.abs(u)) + jnp.max(jnp.abs(want))

    err, scale = residual(fs.theta, x, jax.random.key(1) if key is None else key)
    if float(err) > rtol * float(scale) + 1e-30:
        raise ValueError(f"{name}: the unit-wise influence needs every parameter to drive the unit of its column, but "
                         f"some parameter drives another unit (relative mismatch {float(err) / float(scale):.2g}; "
                         "e.g. a sparse cell's flat recurrent values): use rtrl, snap2 or uoro")


def hidden_readout(params, carry, x):
    """``y`` from the first carry component ``h``: ``h W + b`` when ``params`` has a ``with_readout`` readout."""
    del x
    h = jax.tree_util.tree_leaves(carry)[0]
    if isinstance(params, dict) and "readout" in params and "core" in params:
        return h @ params["readout"]["w"] + params["readout"]["b"]
    return h


def check_readout(cell: Cell, params, readout, x):
    """Raises if ``readout(params, new_carry, x)`` differs from the step's output (one example ``x``)."""
    carry = cell.initial_carry(params, ())
    carry = jax.tree.map(lambda c: c + 0.5, carry)
    def outputs(p, c):
        new, y = cell.step(p, c, x)
        return y, readout(p, new, x)

    y, y_read = jax.jit(outputs)(params, carry)
    if jnp.shape(y_read) != jnp.shape(y) or not jnp.allclose(y_read, y, rtol=1e-5, atol=1e-6):
        raise ValueError("e-prop / RFLO need the output to be a readout of the new carry's first component h "
                         "(Elman or LSTM, optionally with_readout); pass readout=... for other cells")


def eligibility_estimator(name: str, cell: Cell, loss_fn: LossFn, block_for: Callable, *, readout=hidden_readout,
                          feedback_for: Callable | None = None, stateful: bool,
                          split: bool = False) -> GradientEstimator:
    """The GradientEstimator shared by e-prop and RFLO: compressed per-unit eligibility traces.

    Args:
      name: the estimator's name, for error messages.
      block_for: ``block_for(rows) -> block``, the kept per-unit blocks of the carry Jacobian (see
        :func:`compressed_core`).
      readout: the step's output as a function of the new carry (``init`` checks it against the step).
      feedback_for: optional ``feedback_for(rows) -> feedback`` replacing the learning signal (RFLO).
      split: eligibility only for the parameters that act on the state (see
        :func:`~jbptt.estimators.online.online_estimator`).

    Returns:
      A :class:`GradientEstimator` with :class:`~jbptt.estimators.online.OnlineState` (eligibility ``[B, R, n]``);
      ``init`` needs ``inputs=`` (an example segment) for the readout check.
    """

    def parts(params, acting=None):
        rows = unit_rows(cell, params, acting)
        feedback = None if feedback_for is None else feedback_for(rows)
        return compressed_core(rows, block_for(rows), readout=readout, feedback=feedback), compressed_trace0(rows)

    def check(params, carry, inputs, acting):
        check_on_example(name, lambda p, x: check_readout(cell, p, readout, x), params, inputs)
        check_on_example(name, lambda p, x: check_unit_rows(name, cell, p, x, acting), params, inputs)

    return online_estimator(cell, loss_fn, parts, stateful=stateful, check=check, split=split)
