"""The SnAp-n influence stored sparse: only the entries of ``J = d s / d theta`` on its n-step pattern are kept.

Layout (:class:`SparseLayout`, built once on the host from the measured pattern): the ``P_s`` parameters whose
pattern row is not empty (those that act on the carry) are grouped by their row (parameters that drive the same
unit share it); group ``g`` lists its ``K`` reachable carry entries ``units[g] : [K]`` (padded with the dummy index
``n``) and its ``R`` parameters ``rows[g] : [R]`` (padded with ``P``). The influence of one example is
``values [G, R, K]``: ``J[rows[g, r], units[g, a]] = values[g, r, a]``. Parameters outside ``rows`` (a readout)
have no influence and get the exact immediate gradient only.

One step, with ``D = d s_t / d s_{t-1}`` (``[n, n]``, n jvps) and the immediate influence ``M = d s_t / d theta``::

    values'[g, r, a] = sum_b D[u_a, u_b] values[g, r, b] + M[u_a, rows[g, r]]        (u = units[g])

i.e. one batched product with the ``[G, K, K]`` blocks of ``D`` (a per-parameter gather of ``D``, ``[P_s, K, K]``,
was 20x slower and as large as the dense influence). ``M`` is read without forming ``[n, P]``: the parameters are
coloured so that no two of one colour drive the same carry entry, and one jvp along each colour's indicator tangent
gives every column of its parameters at once (an Elman/LSTM/GRU, dense or sparse, needs ``max parameters per unit``
jvps). Cost per step O(G R K^2 + n^3 + C step); memory O(G R K) per example, ``G R`` being ``P_s`` plus the padding
of the groups to the largest.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jbptt.estimators.online import Core, FlatStep, step_jacobian_support

__all__ = ["SparseLayout", "snap_supports", "sparse_core", "sparse_layout", "sparse_trace0"]


class SparseLayout(NamedTuple):
    """Where the stored values of a SnAp-n influence sit (host-built arrays, kept in the estimator state).

    Attributes:
      rows: ``[G, R]`` positions in ``theta`` of the parameters that act on the carry, by group (parameters of
        equal pattern row and equal immediate / initial supports), padded with ``P``.
      units: ``[G, K]`` each group's reachable carry entries, padded with ``n``.
      drives: ``[G, Kd]`` the positions in ``units[g]`` where the immediate influence ``M`` of the group is non-zero
        (one for a weight of an Elman/GRU unit, two for an LSTM's ``(h, c)``), padded with ``K``.
      drives0: ``[G, K0]`` the same for ``J_0 = d s_0 / d theta`` (a learned initial carry), padded with ``K``.
      color: ``[G, R]`` each parameter's colour (no two parameters of one colour touch the same carry entry),
        padded with ``C``.
      members: ``[C, Rc]`` the ``theta`` positions of each colour, padded with ``P``.
    """

    rows: jax.Array
    units: jax.Array
    drives: jax.Array
    drives0: jax.Array
    color: jax.Array
    members: jax.Array


def snap_supports(fs: FlatStep, theta, x, n_steps: int, key):
    """The SnAp-n pattern and the supports it is built from, measured at random perturbations (jit-safe).

    The pattern marks the entries of ``J`` that ``n`` steps can make non-zero, starting from the immediate influence
    ``M`` and from ``J_0 = d s_0 / d theta``: ``bool(sum_{k<n} |D|^k (|M| + |J_0|))``. ``M`` and ``D`` are unioned
    over several probe points (:func:`~jbptt.estimators.online.step_jacobian_support`).

    Returns:
      ``(pattern [P, n], m_support [n, P], j0_support [n, P])`` booleans.
    """
    k1, k2 = jax.random.split(key)
    M, D = step_jacobian_support(fs, theta, x, k1)
    th = theta + 0.1 * jax.random.normal(k2, theta.shape, theta.dtype)
    m, j0 = M > 0, jnp.abs(jax.jacrev(fs.carry0)(th)) > 0
    a = (m | j0).astype(theta.dtype)
    d = (D > 0).astype(theta.dtype)
    acc = a
    for _ in range(n_steps - 1):
        a = jnp.minimum(d @ a, 1.0)
        acc = acc + a
    return (acc > 0).T, m, j0


def _colors(support: np.ndarray) -> np.ndarray:
    """A valid colouring ``[P_s]`` of parameters by their carry supports ``[P_s, n]`` (bool): parameters touching a
    common entry differ. Single-entry parameters (every Elman/LSTM/GRU weight) are coloured at once, by rank."""
    P_s, n = support.shape
    count = support.sum(1)
    color = np.zeros(P_s, np.int64)
    nxt = np.zeros(n + 1, np.int64)  # every colour used at entry u is < nxt[u]
    for p in np.flatnonzero(count > 1):  # rare: a parameter acting on several entries
        u = np.flatnonzero(support[p])
        color[p] = nxt[u].max()
        nxt[u] = color[p] + 1
    single = np.flatnonzero(count == 1)
    unit = support[single].argmax(1)
    order = np.argsort(unit, kind="stable")
    su = unit[order]
    first = np.searchsorted(su, su)
    color[single[order]] = nxt[su] + np.arange(len(su)) - first
    return color


def sparse_layout(pattern, m_support, j0_support) -> SparseLayout:
    """Builds :class:`SparseLayout` on the host from concrete ``pattern [P, n]``, ``m_support`` / ``j0_support``
    ``[n, P]`` (see :func:`snap_supports`). Not jit-safe (the sizes depend on the values)."""
    pattern, m, j0 = np.asarray(pattern, bool), np.asarray(m_support, bool).T, np.asarray(j0_support, bool).T
    P, n = pattern.shape
    rows = np.flatnonzero(pattern.any(1))
    key = np.packbits(np.concatenate([pattern[rows], m[rows], j0[rows]], axis=1), axis=1)
    uniq, group = np.unique(key, axis=0, return_inverse=True) if len(rows) else (key, np.zeros(0, np.int64))
    group = np.asarray(group).reshape(-1)
    first = np.zeros(len(uniq), np.int64)
    first[group[::-1]] = np.arange(len(rows))[::-1]  # one representative row per group
    rep = rows[first]
    K = int(pattern[rep].sum(1).max()) if len(rep) else 0
    units = np.full((len(rep), K), n, np.int64)
    for g, p in enumerate(rep):
        u = np.flatnonzero(pattern[p])
        units[g, :len(u)] = u
    def positions(support):  # [G, Kd]: where the group's support sits in its units, padded with K
        at = np.take_along_axis(np.pad(support[rep], ((0, 0), (0, 1))), units, axis=1)
        out = np.full((len(rep), max(int(at.sum(1).max()) if len(rep) else 0, 1)), K, np.int64)
        for g in range(len(rep)):
            a = np.flatnonzero(at[g])
            out[g, :len(a)] = a
        return out

    color = _colors(m[rows] | j0[rows])
    C = int(color.max()) + 1 if len(rows) else 0
    R = int(np.bincount(color).max()) if len(rows) else 0
    members = np.full((C, R), P, np.int64)
    for c in range(C):
        mem = rows[color == c]
        members[c, :len(mem)] = mem
    Rg = int(np.bincount(group).max()) if len(rows) else 0
    order = np.argsort(group, kind="stable")
    slot = group[order] * Rg + np.arange(len(rows)) - np.searchsorted(group[order], group[order])
    rows_g, color_g = np.full(len(rep) * Rg, P, np.int64), np.full(len(rep) * Rg, C, np.int64)
    rows_g[slot], color_g[slot] = rows[order], color[order]
    i32 = lambda a: jnp.asarray(a, jnp.int32).reshape(a.shape)
    return SparseLayout(i32(rows_g.reshape(-1, Rg)), i32(units), i32(positions(m)), i32(positions(j0)),
                        i32(color_g.reshape(-1, Rg)), i32(members))


def _gather2(a, i, j):
    """``a[i, j]`` through one flat index (a ``[..., 2]`` index tensor would double the temporary memory)."""
    return _take(a.reshape(-1), i * a.shape[1] + j)


def _take(a, i):
    """``a[i]`` along the first axis; the layout's indices are in bounds by construction (no clamping pass)."""
    return a.at[i].get(mode="promise_in_bounds", unique_indices=False)


def _immediate(layout: SparseLayout, f, theta, drives, chunk: int = 1):
    """``[G, R, K]``: ``d f(theta)[units[g, a]] / d theta[rows[g, r]]`` (where ``drives``), by one jvp per
    colour, ``chunk`` colours at a time (a colour's tangent can be as large as a dense weight matrix: a sparse
    cell densifies it). ``f: theta [P] -> [n]``."""
    def cols(members):  # [P+1] indicator of one colour -> the jvp [n]
        t = jnp.zeros((theta.shape[0] + 1,), theta.dtype).at[members].set(1.0)[:-1]
        return jax.jvp(f, (theta,), (t,))[1]

    m = jax.lax.map(cols, layout.members, batch_size=chunk)  # [C, n]
    m = jnp.pad(m, ((0, 1), (0, 1)))  # the padding colour and unit read zeros
    unit = jnp.take_along_axis(jnp.pad(layout.units, ((0, 0), (0, 1)), constant_values=m.shape[1] - 1), drives, 1)
    vals = _gather2(m, layout.color[:, :, None], unit[:, None, :])  # [G, R, Kd]: only where M can be non-zero
    onehot = (drives[:, :, None] == jnp.arange(layout.units.shape[1], dtype=drives.dtype)).astype(m.dtype)  # [G, Kd, K]
    return jnp.einsum("grd,gdk->grk", vals, onehot)


def sparse_trace0(layout: SparseLayout):
    """``trace0`` of the stored-sparse influence: ``J_0 = d s_0 / d theta`` on the pattern, ``[G, R, K]``."""

    def trace0(fs: FlatStep, theta, key):
        del key
        return _immediate(layout, fs.carry0, theta, layout.drives0)

    return trace0


def sparse_core(layout: SparseLayout) -> Core:
    """The :data:`~jbptt.estimators.online.Core` advancing the stored-sparse influence ``[G, R, K]``.

    The gradient of a step is the exact immediate term plus the loss cotangent of the carry entering the step
    contracted with the influence of the previous step (as the dense SnAp core does).
    """

    def core(fs: FlatStep, theta, s, J, x, loss_grad, key):
        del key
        f = lambda th, ss: fs.step(th, ss, x)
        (s_new, y), vjp = jax.vjp(f, theta, s)
        loss, gy = loss_grad(y)
        gth, gs = vjp((jnp.zeros_like(s_new), gy))
        g_inf = jnp.einsum("ga,gra->gr", _take(jnp.pad(gs, (0, 1)), layout.units), J)
        grad = gth.at[layout.rows].add(g_inf, mode="drop")  # padding rows point past theta
        D = jnp.pad(jax.jacfwd(lambda ss: f(theta, ss)[0])(s), ((0, 1), (0, 1)))  # [n+1, n+1], dummy row/col 0
        Dg = _gather2(D, layout.units[:, :, None], layout.units[:, None, :])  # [G, K, K]
        J_new = jnp.einsum("gab,grb->gra", Dg, J) + _immediate(layout, lambda th: f(th, s)[0], theta, layout.drives)
        return s_new, J_new, loss, grad

    return core
