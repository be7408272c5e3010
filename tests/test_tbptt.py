"""TBPTT(k1, k2) and ARTBP against plain references built from ``jax.grad`` over ``unroll`` (float64, random inputs).

Loss normalisation (see :mod:`~jbptt.estimators.tbptt`): ``update`` returns the truncated gradient of the
segment's weighted
mean loss, i.e. ``sum over chunks of grad(chunk's summed weighted loss) / segment's total weight``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import jbptt
from jbptt import cells, losses
from jbptt.batch import Batch
from jbptt.estimators.bptt import reference_gradient
from jbptt.estimators.tbptt import make_sequence_train_step, pad_chunk, prime_state, split_chunks, tbptt, train_stream
from jbptt.train import init_train_state, make_train_step
from jbptt.unroll import unroll

B, T, I, O = 3, 9, 2, 2

CELLS = {
    "elman": lambda: cells.with_readout(cells.elman(4, dtype=jnp.float64), O),
    "lstm": lambda: cells.with_readout(cells.learned_initial_carry(cells.lstm(3, dtype=jnp.float64)), O),
    "gru": lambda: cells.with_readout(cells.gru(3, dtype=jnp.float64), O),
}


def make_problem(name, key, *, T=T, sparse=True, lengths=True, resets=True):
    cell = CELLS[name]()
    k = jax.random.split(key, 6)
    params = cell.init(k[0], I)
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(k[1], a.shape, a.dtype), params)  # non-zero biases
    xs = jax.random.normal(k[2], (B, T, I))
    targets = jax.random.normal(k[3], (B, T, O))
    mask = (jax.random.uniform(k[4], (B, T)) < 0.6).astype(jnp.float64) if sparse else None
    seq_lengths = jnp.array([T, T - 4, 3]) if lengths else None
    rs = (jax.random.uniform(k[5], (B, T)) < 0.15) if resets else None
    return cell, params, Batch(xs, targets, mask, seq_lengths, rs)


def max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def segment_update(cell, params, batch, **options):
    est = tbptt(cell, losses.mse, **options)
    state = est.init(params, cell.initial_carry(params, (B,)))
    return jax.jit(est.update)(params, state, batch)


# ---------------------------------------------------------------------------------------------------------------
# Plain references: one jax.grad per chunk over jbptt.unroll on slices of the sequence.


def _slice(batch, lo, hi):
    lengths = None if batch.seq_lengths is None else jnp.clip(batch.seq_lengths - lo, 0, hi - lo)
    resets = None if batch.resets is None else batch.resets[:, lo:hi]
    return batch.inputs[:, lo:hi], lengths, resets


def _carry_at(cell, params, batch, t):
    """The forward carry entering step ``t`` (gradient stopped)."""
    if t == 0:
        return cell.initial_carry(params, (B,))
    xs, lengths, resets = _slice(batch, 0, t)
    return lax.stop_gradient(unroll(cell, params, xs, seq_lengths=lengths, resets=resets)[0])


@jax.jit(static_argnums=(0, 3, 4))
def brute_force_tbptt(cell, params, batch, k1, k2):
    """For each chunk [s, s + k1) re-run steps [max(0, s + k1 - k2), s + k1) from the stored carry and take the
    gradient of the chunk's summed weighted loss; sum over chunks and divide by the total weight."""
    weights = batch.weights(jnp.float64)
    T_ = batch.inputs.shape[1]
    total_loss, total_grads = 0.0, jax.tree.map(jnp.zeros_like, params)
    for s in range(0, T_, k1):
        end_pad = s + k1
        w, e = max(0, end_pad - k2), min(T_, end_pad)

        def chunk_loss(p, w=w, e=e, s=s):
            carry = cell.initial_carry(p, (B,)) if w == 0 else _carry_at(cell, p, batch, w)
            xs, lengths, resets = _slice(batch, w, e)
            _, ys = unroll(cell, p, xs, carry, seq_lengths=lengths, resets=resets)
            return jnp.sum(weights[:, s:e] * losses.mse(ys[:, s - w:], batch.targets[:, s:e]))

        value, grads = jax.value_and_grad(chunk_loss)(params)
        total_loss += value
        total_grads = jax.tree.map(jnp.add, total_grads, grads)
    W = jnp.sum(weights)
    return total_loss / W, jax.tree.map(lambda g: g / W, total_grads)


@jax.jit(static_argnums=(0, 3))
def chunked_bptt_reference(cell, params, batch, k):
    """TBPTT(k, k) written the plain way: BPTT on each chunk, carry stopped at every chunk boundary."""
    weights = batch.weights(jnp.float64)
    T_ = batch.inputs.shape[1]

    def loss(p):
        total, carry = 0.0, cell.initial_carry(p, (B,))
        for s in range(0, T_, k):
            xs, lengths, resets = _slice(batch, s, s + k)
            carry, ys = unroll(cell, p, xs, carry, seq_lengths=lengths, resets=resets)
            total += jnp.sum(weights[:, s:s + k] * losses.mse(ys, batch.targets[:, s:s + k]))
            carry = lax.stop_gradient(carry)
        return total / jnp.sum(weights)

    return jax.value_and_grad(loss)(params)


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["elman", "lstm"])  # (the GRU is covered by the chunked tests)
def test_full_window_equals_bptt(name, key):
    cell, params, batch = make_problem(name, key)
    ref_loss, ref_grads = reference_gradient(cell, losses.mse, params, batch)
    loss, grads, _ = segment_update(cell, params, batch, k1=T)
    assert abs(float(loss - ref_loss)) < 1e-10
    assert max_diff(grads, ref_grads) < 1e-10
    assert max_diff(grads, jax.tree.map(jnp.zeros_like, grads)) > 1e-3  # not vacuous


@pytest.mark.parametrize("name,k", [("elman", 1), ("gru", 4)])
def test_kk_equals_sum_of_chunk_bptt(name, k, key):
    cell, params, batch = make_problem(name, key)
    ref_loss, ref_grads = chunked_bptt_reference(cell, params, batch, k)
    loss, grads, _ = segment_update(cell, params, batch, k1=k)
    assert abs(float(loss - ref_loss)) < 1e-10
    assert max_diff(grads, ref_grads) < 1e-10
    full = reference_gradient(cell, losses.mse, params, batch)[1]
    assert max_diff(grads, full) > 1e-4  # truncation changes the gradient: the test can fail


@pytest.mark.parametrize("name,k1,k2", [("elman", 3, 5), ("lstm", 2, 5), ("elman", 4, 9)])
def test_overlapping_windows_equal_brute_force(name, k1, k2, key):
    cell, params, batch = make_problem(name, key)
    ref_loss, ref_grads = brute_force_tbptt(cell, params, batch, k1, k2)
    loss, grads, _ = segment_update(cell, params, batch, k1=k1, k2=k2)
    assert abs(float(loss - ref_loss)) < 1e-10
    assert max_diff(grads, ref_grads) < 1e-10
    assert max_diff(grads, chunked_bptt_reference(cell, params, batch, k1)[1]) > 1e-5  # k2 matters


def test_scan_option_is_used_inside_chunks(key):
    """A remat schedule from jbptt.remat runs inside every chunk and leaves the gradient unchanged."""
    from jbptt import remat

    cell, params, batch = make_problem("elman", key)
    calls, checkpointed = [], remat.sqrt()

    def counting_scan(body, init, xs, **kw):
        calls.append(1)
        return checkpointed(body, init, xs, **kw)

    loss, grads, _ = segment_update(cell, params, batch, k1=3, k2=5, scan=counting_scan)
    ref = brute_force_tbptt(cell, params, batch, 3, 5)[1]
    assert calls and max_diff(grads, ref) < 1e-10


def test_stream_equals_batch_gradients(key, k1=3, k2=8):
    """Feeding the sequence chunk by chunk (stateful) gives the same per-chunk gradients as one segment."""
    cell, params, batch = make_problem("lstm", key, T=26)  # 9 chunks, the last one short
    batch = batch._replace(resets=batch.resets.at[:, 0].set(True))  # the stream starts at an episode start
    _, seg_grads, _ = segment_update(cell, params, batch, k1=k1, k2=k2)
    est = tbptt(cell, losses.mse, k1=k1, k2=k2, stateful=True)
    update = jax.jit(est.update)
    state = est.init(params, cell.initial_carry(params, (B,)))
    acc = jax.tree.map(jnp.zeros_like, params)
    chunks = split_chunks(batch, k1)
    for c in range(chunks.inputs.shape[0]):
        chunk = jax.tree.map(lambda a, c=c: a[c], chunks)
        _, g, state = update(params, state, chunk)
        weight = jnp.sum(chunk.weights(jnp.float64))  # per-chunk normalisation, undone here
        acc = jax.tree.map(lambda a, g, w=weight: a + w * g, acc, g)
    acc = jax.tree.map(lambda a: a / jnp.sum(batch.weights(jnp.float64)), acc)
    assert max_diff(acc, seg_grads) < 1e-10
    final = unroll(cell, params, batch.inputs, seq_lengths=batch.seq_lengths, resets=batch.resets)[0]
    assert max_diff(state.carry, final) < 1e-12


def test_stream_training_equals_sequence_training(key, k1=3, k2=7):
    """train_stream over an iterator of chunks (short last chunk padded) = make_sequence_train_step on the whole
    sequence: one optimizer step per chunk in both, one compilation for every chunk of the stream."""
    T = 26  # 9 chunks, the last one short
    cell, params, batch = make_problem("gru", key, T=T, lengths=False)
    est = tbptt(cell, losses.mse, k1=k1, k2=k2, stateful=True)
    opt = optax.sgd(0.3)
    start = init_train_state(est, opt, params, cell.initial_carry(params, (B,)))
    start = start._replace(est_state=prime_state(start.est_state, batch.inputs))

    seq_state, seq_metrics = jax.jit(make_sequence_train_step(est, opt, k1))(start, batch)

    traces = []

    def step(state, chunk):
        traces.append(1)
        return make_train_step(est, opt)(state, chunk)

    resets = batch.resets.at[:, 0].set(True)
    chunks = (Batch(batch.inputs[:, s:s + k1], batch.targets[:, s:s + k1], batch.mask[:, s:s + k1], None,
                    resets[:, s:s + k1]) for s in range(0, T, k1))
    losses_seen = []
    stream_state, n = train_stream(jax.jit(step), start, chunks, k1,
                                   on_metrics=lambda i, m: losses_seen.append(m["loss"]))
    assert n == -(-T // k1) and len(traces) == 1
    assert max_diff(stream_state.params, seq_state.params) < 1e-10
    assert max_diff(stream_state.est_state.carry, seq_state.est_state.carry) < 1e-10
    np.testing.assert_allclose(np.array(losses_seen), np.array(seq_metrics["loss"]), atol=1e-12)
    assert max_diff(stream_state.params, params) > 1e-3


def test_chunk_without_targets_gives_zero_loss_and_gradient(key):
    cell, params, batch = make_problem("elman", key, lengths=False, resets=False)
    est = tbptt(cell, losses.mse, k1=4, k2=6, stateful=True)
    state = est.init(params, cell.initial_carry(params, (B,)))
    chunk = Batch(batch.inputs[:, :4], batch.targets[:, :4], mask=jnp.zeros((B, 4)))
    loss, grads, state2 = jax.jit(est.update)(params, state, chunk)
    assert float(loss) == 0.0 and max_diff(grads, jax.tree.map(jnp.zeros_like, grads)) == 0.0
    assert max_diff(state2.carry, state.carry) > 1e-3  # the stream still moved on


def test_pad_chunk_masks_the_tail(key):
    _, _, batch = make_problem("elman", key, lengths=False)
    short = Batch(batch.inputs[:, :3], batch.targets[:, :3], batch.mask[:, :3], None, batch.resets[:, :3])
    padded = pad_chunk(short, 5)
    assert padded.inputs.shape == (B, 5, I) and padded.resets.shape == (B, 5)
    np.testing.assert_array_equal(padded.weights()[:, 3:], 0.0)
    np.testing.assert_array_equal(np.array(padded.seq_lengths), [3, 3, 3])
    with pytest.raises(ValueError, match="more than the chunk length"):
        pad_chunk(batch, 5)


# ---------------------------------------------------------------------------------------------------------------
# ARTBP


def _artbp_estimates(cell, params, batch, n, **options):
    est = tbptt(cell, losses.mse, **options)
    state = est.init(params, cell.initial_carry(params, (B,)))

    def one(key):
        return est.update(params, state._replace(key=key), batch)[1]

    keys = jax.random.split(jax.random.key(1), n)
    grads = jax.jit(jax.vmap(one))(keys)
    return jnp.concatenate([jnp.reshape(g, (n, -1)) for g in jax.tree.leaves(grads)], axis=1)


def _flat(tree):
    return jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(tree)])


def test_artbp_is_unbiased(key):
    """The mean of N estimates is within 4 standard errors (from the estimates' own variance) of full BPTT,
    while the bias of a deterministic truncation of comparable length is far outside that bound. The truncation
    probability follows a schedule of the steps since the last truncation (a constant is the special case)."""
    artbp = lambda since: jnp.where(since < 2, 0.05, 0.4)
    cell, params, batch = make_problem("elman", key, T=10)
    _, ref = reference_gradient(cell, losses.mse, params, batch)
    ref = _flat(ref)
    n = 4000
    samples = _artbp_estimates(cell, params, batch, n, k1=10, artbp=artbp)
    mean = jnp.mean(samples, axis=0)
    standard_error = jnp.sqrt(jnp.sum(jnp.var(samples, axis=0, ddof=1)) / n)
    error = float(jnp.linalg.norm(mean - ref))
    assert float(standard_error) > 1e-4  # estimates really are random
    assert error < 4 * float(standard_error), (error, float(standard_error))
    truncated = _flat(segment_update(cell, params, batch, k1=3)[1])
    assert float(jnp.linalg.norm(truncated - ref)) > 10 * float(standard_error)  # the test can detect bias


def test_artbp_without_truncation_is_bptt_and_stream_runs(key):
    cell, params, batch = make_problem("elman", key)
    ref = reference_gradient(cell, losses.mse, params, batch)[1]
    assert max_diff(segment_update(cell, params, batch, k1=T, artbp=0.0)[1], ref) < 1e-10
    est = tbptt(cell, losses.mse, k1=4, k2=8, stateful=True, artbp=0.2)
    state = est.init(params, cell.initial_carry(params, (B,)))
    update = jax.jit(est.update)
    for s in range(0, 8, 4):
        loss, grads, state = update(params, state, Batch(batch.inputs[:, s:s + 4], batch.targets[:, s:s + 4]))
        assert jnp.isfinite(loss) and all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert state.window.gates.shape == (B, 4)


def test_registered_and_bad_options(key):
    cell, params, batch = make_problem("elman", key)
    assert isinstance(jbptt.make_estimator("tbptt", cell, losses.mse, k1=4, k2=6), jbptt.GradientEstimator)
    for bad, match in [(dict(k1=0), "k1 must be a positive int"), (dict(k1=4, k2=3), "k2 must be an int >= k1"),
                       (dict(k1=4, artbp=1.0), "artbp truncation probability"),
                       (dict(k1=2, scan=3), "scan must be a callable")]:
        with pytest.raises(ValueError, match=match):
            tbptt(cell, losses.mse, **bad)
