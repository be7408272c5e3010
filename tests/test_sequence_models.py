"""Whole-sequence models and losses: bidirectional stacks, CTC through ``bptt``, truncated gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbptt import cells, ctc, losses
from jbptt.batch import Batch
from jbptt.estimator import make_estimator
from jbptt.estimators.bptt import bptt
from jbptt.unroll import bidirectional, sequence_stack, unroll

B, T, I, H, C = 3, 9, 4, 5, 4


def _bilstm(readout=C, layers=2):
    return sequence_stack([bidirectional(cells.lstm(H), cells.gru(H)) for _ in range(layers)], readout)


def _data(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    xs = jax.random.normal(k1, (B, T, I), jnp.float64)
    lengths = jnp.array([T, 5, 2])
    labels = jnp.array([[1, 2, 2], [3, 1, 0], [2, 0, 0]])
    return xs, lengths, ctc.Labels(labels, jnp.array([3, 2, 1]))


def test_bidirectional_stack_padded_batch_equals_each_sequence_alone():
    model = _bilstm()
    params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(1), I))
    xs, lengths, _ = _data()
    # garbage in the padding must not leak into the valid outputs (the backward direction starts at each length)
    xs = jnp.where(jnp.arange(T)[None, :, None] < lengths[:, None, None], xs, 1e3)

    def loss_alone(p, x):
        _, y = unroll(model, p, x)
        return jnp.sum(jnp.tanh(y)), y

    def loss_padded(p, b):
        _, y = unroll(model, p, xs, seq_lengths=lengths)
        return jnp.sum(jnp.tanh(y[b])), y

    alone_fn = jax.jit(jax.grad(loss_alone, has_aux=True))  # one compilation per length
    g_pad, ys = jax.jit(jax.vmap(jax.grad(loss_padded, has_aux=True), in_axes=(None, 0)))(params, jnp.arange(B))
    ys = ys[0]
    assert ys.shape == (B, T, C)
    for b in range(B):
        n = int(lengths[b])
        g_alone, alone = alone_fn(params, xs[b:b + 1, :n])
        np.testing.assert_allclose(ys[b, :n], alone[0], rtol=1e-10, atol=1e-10)
        np.testing.assert_array_equal(ys[b, n:], 0.0)
        for a, p in zip(jax.tree.leaves(g_alone), jax.tree.leaves(jax.tree.map(lambda v, b=b: v[b], g_pad)),
                        strict=True):
            np.testing.assert_allclose(p, a, rtol=1e-10, atol=1e-12)


def test_ctc_trains_through_bptt_with_a_bidirectional_model():
    model = _bilstm()
    params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(2), I))
    xs, lengths, labels = _data(1)
    loss_fn = ctc.ctc_sequence_loss()
    est = make_estimator("bptt", model, loss_fn)
    batch = Batch(xs, labels, seq_lengths=lengths)
    loss, grads, _ = jax.jit(est.update)(params, est.init(params, ()), batch)

    @jax.jit
    def direct(p):
        _, ys = unroll(model, p, xs, seq_lengths=lengths)
        return jnp.sum(ctc.ctc_loss(ys, labels.labels, labels.lengths, lengths).per_example) / jnp.sum(lengths)

    np.testing.assert_allclose(loss, direct(params), rtol=1e-12)
    # central finite differences along two random directions (float64)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    g = jax.flatten_util.ravel_pytree(grads)[0]
    for seed in (0, 1):
        v = jax.random.normal(jax.random.key(seed), flat.shape, flat.dtype)
        eps = 1e-5
        fd = (direct(unravel(flat + eps * v)) - direct(unravel(flat - eps * v))) / (2 * eps)
        np.testing.assert_allclose(g @ v, fd, rtol=1e-6)


def test_truncated_gradient_equals_the_sum_of_chunk_gradients():
    cell = cells.with_readout(cells.lstm(H), 2)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), cell.init(jax.random.key(3), I))
    xs = jax.random.normal(jax.random.key(4), (B, 10, I), jnp.float64)
    ys_t = jax.random.normal(jax.random.key(5), (B, 10, 2), jnp.float64)
    batch = Batch(xs, ys_t)
    k = 3
    est = bptt(cell, losses.mse, truncation=k)
    loss, grads, _ = est.update(params, est.init(params, None), batch)

    def chunk_loss(p, carry, t0):  # one chunk's share of the batch loss, from a fixed incoming carry
        final, y = unroll(cell, p, xs[:, t0:t0 + k], jax.lax.stop_gradient(carry))
        return jnp.sum(losses.mse(y, ys_t[:, t0:t0 + k])) / (B * 10), final

    total, carry = jax.tree.map(jnp.zeros_like, params), cell.initial_carry(params, (B,))
    chunk_grad = jax.jit(jax.grad(chunk_loss, has_aux=True), static_argnums=2)
    for t0 in range(0, 10, k):
        g, carry = chunk_grad(params, carry, t0)
        total = jax.tree.map(jnp.add, total, g)
    for a, b in zip(jax.tree.leaves(total), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12)
    full = bptt(cell, losses.mse).update(params, est.init(params, None), batch)
    np.testing.assert_allclose(full[0], loss, rtol=1e-12)  # values unchanged
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(full[1]), jax.tree.leaves(grads),
                                                                  strict=True))
    assert diff > 1e-6  # the truncation does cut something


def test_reverse_truncation_keeps_values():
    cell = cells.gru(H)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), cell.init(jax.random.key(6), I))
    xs = jax.random.normal(jax.random.key(7), (B, T, I), jnp.float64)
    a = unroll(cell, params, xs, reverse=True, seq_lengths=jnp.array([T, 4, 1]))
    b = unroll(cell, params, xs, reverse=True, seq_lengths=jnp.array([T, 4, 1]), truncate=2)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-12)


def test_per_step_estimators_refuse_whole_sequence_losses_and_models():
    cell = cells.with_readout(cells.elman(H), C)
    loss_fn = ctc.ctc_sequence_loss()
    for name in ("rtrl", "snap1", "uoro", "tbptt", "eprop"):
        with pytest.raises(ValueError, match="per-step loss"):
            make_estimator(name, cell, loss_fn)
        with pytest.raises(ValueError, match="bidirectional"):
            make_estimator(name, _bilstm(), losses.mse)
    # used as a per-step loss, the loss itself says what is wrong
    _, _, labels = _data()
    with pytest.raises(ValueError, match="whole-sequence loss"):
        loss_fn(jnp.zeros((B, C)), labels)
    with pytest.raises(ValueError, match="stateful"):
        bptt(_bilstm(), losses.mse, stateful=True)


def test_ctc_bad_labels_through_bptt_name_the_item():
    model = _bilstm()
    params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(2), I))
    xs, lengths, _ = _data()
    too_long = ctc.Labels(jnp.array([[1, 2, 2], [3, 1, 0], [2, 2, 0]]), jnp.array([3, 2, 2]))  # item 2: 2 frames
    est = bptt(model, ctc.ctc_sequence_loss())
    with pytest.raises(ValueError, match="example 2|item 2|\\b2\\b"):
        est.update(params, est.init(params, ()), Batch(xs, too_long, seq_lengths=lengths))


def test_config_builds_bidirectional_stacks_and_refuses_what_they_cannot_do():
    from jbptt.experiment.build import build, build_cell
    from jbptt.experiment.config import ConfigError, load_config
    from jbptt.unroll import SequenceModel

    cfg = load_config("configs/quickstart.yaml", ["model.layers=2", "model.bidirectional=[true, false]"])
    model = build_cell(cfg, 1)
    assert isinstance(model, SequenceModel) and model.output_size == 1
    params = model.init(jax.random.key(0), 2)
    assert params["layers"][0]["fwd"]["w_h"].shape == params["layers"][0]["bwd"]["w_h"].shape == (32, 4 * 32)
    assert params["layers"][1]["w_x"].shape == (2 * 32, 4 * 32)  # the second layer reads both directions
    for override, key in (("model.dropout=0.1", "model.dropout"), ("estimator.name=rtrl", "estimator"),
                          ("model.learned_initial_carry=true", "model.learned_initial_carry")):
        with pytest.raises(ConfigError, match=key):
            build(load_config("configs/quickstart.yaml", ["model.bidirectional=true", override]))


def test_whole_sequence_models_refuse_a_remat_scan():
    from jbptt.experiment.build import build
    from jbptt.experiment.config import ConfigError, load_config

    model = _bilstm(layers=1)
    params = model.init(jax.random.key(0), I)
    xs, lengths, _ = _data()
    with pytest.raises(ValueError, match="remat"):
        unroll(model, params, xs, seq_lengths=lengths, scan=jax.lax.scan)
    with pytest.raises(ConfigError, match="remat.policy"):
        build(load_config("configs/quickstart.yaml", ["model.bidirectional=true", "remat.policy=sqrt"]))
