"""TBPTT(k1, k2) and ARTBP against plain references built from ``jax.grad`` over ``unroll`` (float64, random inputs).

Loss normalisation (see :mod:`~jbptt.estimators.tbptt`): ``update`` returns the truncated gradient of the
segment's weighted mean loss, i.e. ``sum over chunks of grad(chunk's summed weighted loss) / segment's total
weight``. References and estimators are compiled with the cheap code generation tests/conftest.py asks XLA for,
since compilation dominates these tests.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import jbptt
from jbptt import cells, losses
from jbptt.batch import Batch, pad_chunk, split_chunks
from jbptt.estimators.bptt import reference_gradient
from jbptt.estimators.tbptt import tbptt
from jbptt.testing import random_problem
from jbptt.train import init_train_state, make_sequence_train_step, make_train_step, train_stream
from jbptt.unroll import unroll, with_step_keys

B, T, I, O = 3, 9, 2, 2

CELLS = {
    "elman": lambda: cells.elman(4),
    "lstm": lambda: cells.learned_initial_carry(cells.lstm(3)),
    "gru": lambda: cells.gru(3),
}


@functools.cache
def make_problem(name, *, T=T, lengths=True, resets=True):
    """A float64 problem with a sparse loss mask, one example padded from step 3 on (so whole chunks are padding)
    and random resets."""
    cell, params, batch = random_problem(CELLS[name](), jax.random.key(0), B=B, T=T, input_size=I, output_size=O,
                                         resets=resets, mask=True)
    return cell, params, batch._replace(seq_lengths=jnp.array([T, T - 4, 3]) if lengths else None)


def max_diff(a, b):
    """Largest absolute difference between two pytrees (on the host: no eager ops to compile)."""
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def finite(tree):
    return all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(tree))


def segment_update(cell, params, batch, **options):
    est = tbptt(cell, losses.mse, **options)
    state = est.init(params, cell.initial_carry(params, (B,)), inputs=batch.inputs)
    return jax.jit(est.update)(params, state, batch)


@functools.cache
def reference(name):
    cell, params, batch = make_problem(name)
    return jax.jit(lambda p, b: reference_gradient(cell, losses.mse, p, b))(params, batch)


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


@functools.cache
def brute_force_tbptt(name, k1, k2):
    """For each chunk [s, s + k1) re-run steps [max(0, s + k1 - k2), s + k1) from the stored carry and take the
    gradient of the chunk's summed weighted loss; sum over chunks and divide by the total weight."""
    cell, params, batch = make_problem(name)

    def run(params, batch):
        weights = batch.weights(jnp.float64)
        total_loss, total_grads = 0.0, jax.tree.map(jnp.zeros_like, params)
        for s in range(0, T, k1):
            end_pad = s + k1
            w, e = max(0, end_pad - k2), min(T, end_pad)

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

    return jax.jit(run)(params, batch)


@functools.cache
def chunked_bptt_reference(name, k):
    """TBPTT(k, k) written the plain way: BPTT on each chunk, carry stopped at every chunk boundary."""
    cell, params, batch = make_problem(name)

    def loss(p):
        weights = batch.weights(jnp.float64)
        total, carry = 0.0, cell.initial_carry(p, (B,))
        for s in range(0, T, k):
            xs, lengths, resets = _slice(batch, s, s + k)
            carry, ys = unroll(cell, p, xs, carry, seq_lengths=lengths, resets=resets)
            total += jnp.sum(weights[:, s:s + k] * losses.mse(ys, batch.targets[:, s:s + k]))
            carry = lax.stop_gradient(carry)
        return total / jnp.sum(weights)

    return jax.jit(jax.value_and_grad(loss))(params)


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["elman", "lstm"])  # (the GRU is covered by the chunked tests)
def test_full_window_equals_bptt(name):
    cell, params, batch = make_problem(name)
    ref_loss, ref_grads = reference(name)
    loss, grads, _ = segment_update(cell, params, batch, k1=T)
    assert abs(float(loss - ref_loss)) < 1e-10
    assert max_diff(grads, ref_grads) < 1e-10
    assert max_diff(grads, jax.tree.map(np.zeros_like, grads)) > 1e-3  # not vacuous


@pytest.mark.parametrize("name,k", [("elman", 1), ("gru", 4)])
def test_kk_equals_sum_of_chunk_bptt(name, k):
    cell, params, batch = make_problem(name)
    ref_loss, ref_grads = chunked_bptt_reference(name, k)
    loss, grads, _ = segment_update(cell, params, batch, k1=k)
    assert abs(float(loss - ref_loss)) < 1e-10
    assert max_diff(grads, ref_grads) < 1e-10
    full = reference(name)[1]
    assert max_diff(grads, full) > 1e-4  # truncation changes the gradient: the test can fail


@pytest.mark.parametrize("name,k1,k2", [("elman", 3, 5), pytest.param("lstm", 2, 5, marks=pytest.mark.slow),
                                        ("elman", 4, 9)])
def test_overlapping_windows_equal_brute_force(name, k1, k2):
    cell, params, batch = make_problem(name)
    ref_loss, ref_grads = brute_force_tbptt(name, k1, k2)
    loss, grads, _ = segment_update(cell, params, batch, k1=k1, k2=k2)
    assert abs(float(loss - ref_loss)) < 1e-10
    assert max_diff(grads, ref_grads) < 1e-10
    assert max_diff(grads, chunked_bptt_reference(name, k1)[1]) > 1e-5  # k2 matters


def test_scan_option_is_used_inside_chunks():
    """A remat schedule from jbptt.remat runs inside every chunk and leaves the gradient unchanged."""
    from jbptt import remat

    cell, params, batch = make_problem("elman")
    calls, checkpointed = [], remat.sqrt()

    def counting_scan(body, init, xs, **kw):
        calls.append(1)
        return checkpointed(body, init, xs, **kw)

    loss, grads, _ = segment_update(cell, params, batch, k1=3, k2=5, scan=counting_scan)
    assert calls and max_diff(grads, brute_force_tbptt("elman", 3, 5)[1]) < 1e-10


def test_stateful_window_needs_example_inputs():
    cell, params, batch = make_problem("elman")
    carry = cell.initial_carry(params, (B,))
    with pytest.raises(ValueError, match="inputs="):
        tbptt(cell, losses.mse, k1=3, k2=5, stateful=True).init(params, carry)
    tbptt(cell, losses.mse, k1=3, stateful=True).init(params, carry)  # no window: nothing to allocate
    tbptt(cell, losses.mse, k1=3, k2=5).init(params, carry)  # not stateful: no window crosses updates


def test_stream_equals_batch_gradients(k1=3, k2=8):
    """Feeding the sequence chunk by chunk (stateful) gives the same per-chunk gradients as one segment."""
    cell, params, batch = make_problem("lstm", T=20)  # 7 chunks, the last one short
    batch = batch._replace(resets=batch.resets.at[:, 0].set(True))  # the stream starts at an episode start
    _, seg_grads, _ = segment_update(cell, params, batch, k1=k1, k2=k2)
    est = tbptt(cell, losses.mse, k1=k1, k2=k2, stateful=True)
    chunks = split_chunks(batch, k1)
    state = est.init(params, cell.initial_carry(params, (B,)), inputs=batch.inputs)

    @jax.jit
    def stream(state):
        def body(state, chunk):
            _, g, state = est.update(params, state, chunk)
            return state, jax.tree.map(lambda a: jnp.sum(chunk.weights(jnp.float64)) * a, g)  # undo the chunk's norm

        state, grads = lax.scan(body, state, chunks)
        return state, jax.tree.map(lambda a: jnp.sum(a, 0) / jnp.sum(batch.weights(jnp.float64)), grads)

    state, acc = stream(state)
    assert max_diff(acc, seg_grads) < 1e-10
    final = jax.jit(lambda p, b: unroll(cell, p, b.inputs, seq_lengths=b.seq_lengths, resets=b.resets)[0])(
        params, batch)
    assert max_diff(state.carry, final) < 1e-12


def test_stream_training_equals_sequence_training(k1=3, k2=7):
    """train_stream over an iterator of chunks (short last chunk padded) = make_sequence_train_step on the whole
    sequence: one optimizer step per chunk in both, one compilation for every chunk of the stream."""
    T = 20  # 7 chunks, the last one short
    cell, params, batch = make_problem("gru", T=T, lengths=False)
    est = tbptt(cell, losses.mse, k1=k1, k2=k2, stateful=True)
    opt = optax.sgd(0.3)
    start = init_train_state(est, opt, params, cell.initial_carry(params, (B,)), inputs=batch.inputs)

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


def test_chunk_without_targets_gives_zero_loss_and_gradient():
    cell, params, batch = make_problem("elman", lengths=False, resets=False)
    est = tbptt(cell, losses.mse, k1=4, k2=6, stateful=True)
    state = est.init(params, cell.initial_carry(params, (B,)), inputs=batch.inputs)
    chunk = Batch(batch.inputs[:, :4], batch.targets[:, :4], mask=jnp.zeros((B, 4)))
    loss, grads, state2 = jax.jit(est.update)(params, state, chunk)
    assert float(loss) == 0.0 and max_diff(grads, jax.tree.map(np.zeros_like, grads)) == 0.0
    assert max_diff(state2.carry, state.carry) > 1e-3  # the stream still moved on


def test_pad_chunk_masks_the_tail():
    _, _, batch = make_problem("elman", lengths=False)
    short = Batch(batch.inputs[:, :3], batch.targets[:, :3], batch.mask[:, :3], None, batch.resets[:, :3])
    padded = pad_chunk(short, 5)
    assert padded.inputs.shape == (B, 5, I) and padded.resets.shape == (B, 5)
    np.testing.assert_array_equal(padded.weights()[:, 3:], 0.0)
    np.testing.assert_array_equal(np.array(padded.seq_lengths), [3, 3, 3])
    with pytest.raises(ValueError, match="more than the chunk length"):
        pad_chunk(batch, 5)


def test_dropout_inputs_with_keys():
    """Inputs ``(x, keys)`` with typed PRNG keys (dropout in a stack): chunk padding and the replay window hold
    valid keys, TBPTT(T, T) equals the plain reference (same keys, same dropout masks) and a stream runs."""
    cell = cells.with_readout(cells.stack([cells.elman(3), cells.elman(3)], dropout_rate=0.3), O)
    _, params, batch = random_problem(cell, jax.random.key(1), B=B, T=8, input_size=I, output_size=O, mask=True)
    batch = batch._replace(inputs=with_step_keys(batch.inputs, jax.random.key(2)))
    padded = pad_chunk(batch._replace(inputs=jax.tree.map(lambda a: a[:, :3], batch.inputs),
                                      targets=batch.targets[:, :3], mask=batch.mask[:, :3]), 5)
    assert jnp.issubdtype(padded.inputs[1].dtype, jax.dtypes.prng_key) and padded.inputs[1].shape == (B, 5)
    ref_loss, ref_grads = jax.jit(lambda p, b: reference_gradient(cell, losses.mse, p, b))(params, batch)
    loss, grads, _ = segment_update(cell, params, batch, k1=8)
    assert abs(float(loss - ref_loss)) < 1e-10 and max_diff(grads, ref_grads) < 1e-10
    est = tbptt(cell, losses.mse, k1=3, k2=5, stateful=True)  # 8 = 3 + 3 + 2: the last chunk is padded
    state = est.init(params, cell.initial_carry(params, (B,)), inputs=batch.inputs)
    loss, grads, state = jax.jit(est.update)(params, state, batch)
    assert jnp.issubdtype(state.window.inputs[1].dtype, jax.dtypes.prng_key)
    assert finite(grads)


# ---------------------------------------------------------------------------------------------------------------
# ARTBP


def _flat(tree):
    return jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(tree)])


def _flat_host(tree):
    return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree.leaves(tree)])


def test_artbp_is_unbiased():
    """The mean of N estimates is within 4 standard errors (from the estimates' own variance) of full BPTT,
    while the bias of a deterministic truncation of comparable length is far outside that bound. The truncation
    probability follows a schedule of the steps since the last truncation (a constant is the special case); the
    estimates differ only by the key given to ``init``."""
    artbp = lambda since: jnp.where(since < 2, 0.05, 0.4)
    cell, params, batch = make_problem("elman", T=10)
    ref = _flat_host(jax.jit(lambda p, b: reference_gradient(cell, losses.mse, p, b))(params, batch)[1])
    n = 4000
    est = tbptt(cell, losses.mse, k1=10, artbp=artbp)
    carry = cell.initial_carry(params, (B,))
    one = lambda key: _flat(est.update(params, est.init(params, carry, key=key), batch)[1])
    samples = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(1), n)))
    mean = np.mean(samples, axis=0)
    standard_error = np.sqrt(np.sum(np.var(samples, axis=0, ddof=1)) / n)
    error = float(np.linalg.norm(mean - ref))
    assert float(standard_error) > 1e-4  # estimates really are random
    assert error < 4 * float(standard_error), (error, float(standard_error))
    truncated = _flat_host(segment_update(cell, params, batch, k1=3)[1])
    assert float(np.linalg.norm(truncated - ref)) > 10 * float(standard_error)  # the test can detect bias


def test_artbp_without_truncation_is_bptt_and_stream_runs():
    cell, params, batch = make_problem("elman")
    assert max_diff(segment_update(cell, params, batch, k1=T, artbp=0.0)[1], reference("elman")[1]) < 1e-10
    est = tbptt(cell, losses.mse, k1=4, k2=8, stateful=True, artbp=0.2)
    state = est.init(params, cell.initial_carry(params, (B,)), key=jax.random.key(3), inputs=batch.inputs)
    update = jax.jit(est.update)
    for s in range(0, 8, 4):
        loss, grads, state = update(params, state, Batch(batch.inputs[:, s:s + 4], batch.targets[:, s:s + 4]))
        assert finite((loss, grads))
    assert state.window.gates.shape == (B, 4)


def test_registered_and_bad_options():
    cell, _, _ = make_problem("elman")
    assert isinstance(jbptt.make_estimator("tbptt", cell, losses.mse, k1=4, k2=6), jbptt.GradientEstimator)
    for bad, match in [(dict(k1=0), "k1 must be a positive int"), (dict(k1=4, k2=3), "k2 must be an int >= k1"),
                       (dict(k1=4, artbp=1.0), "artbp truncation probability"),
                       (dict(k1=2, scan=3), "scan must be a callable")]:
        with pytest.raises(ValueError, match=match):
            tbptt(cell, losses.mse, **bad)
