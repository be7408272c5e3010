"""The fused Elman / LSTM / GRU layers (jbptt.fused) against the plain per-step autodiff cells, on random inputs."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import jbptt
from jbptt import cells, fused, losses
from jbptt.unroll import unroll

B, T, I, H = 3, 9, 4, 5
TOL = {jnp.float32: 1e-5, jnp.float64: 1e-10}
KINDS = {"lstm": fused.lstm, "gru": fused.gru}
METHODS = ("hoist", "jvp", "vjp")


def _random_problem(kind, dtype, key, masks: bool):
    plain = cells.CELLS[kind](H, dtype=dtype)
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    params = plain.init(k1, I)
    # Perturb every parameter (biases start at constants) so that every gradient entry is exercised.
    leaves, tree = jax.tree.flatten(params)
    params = jax.tree.unflatten(tree, [a + 0.3 * jax.random.normal(k, a.shape, dtype)
                                       for a, k in zip(leaves, jax.random.split(k2, len(leaves)), strict=True)])
    xs = jax.random.normal(k3, (B, T, I), dtype)
    carry = jax.tree.map(lambda a: jax.random.normal(k4, a.shape, dtype), plain.initial_carry(params, (B,)))
    extra = {}
    if masks:
        extra = {"seq_lengths": jnp.array([T, 4, 7]), "resets": jax.random.bernoulli(k5, 0.25, (B, T))}
    return plain, params, xs, carry, extra


def _loss(cell, params, xs, carry, reverse, extra, reverse_mode_only=False):
    final, ys = unroll(cell, params, xs, carry, reverse=reverse, reverse_mode_only=reverse_mode_only, **extra)
    w = jnp.cos(jnp.arange(ys.size, dtype=ys.dtype)).reshape(ys.shape)  # fixed random-looking weights
    return jnp.sum(w * jnp.tanh(ys)) + sum(jnp.sum(jnp.sin(c)) for c in jax.tree.leaves(final))


def _assert_close(a, b, tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def _grads(cell, params, xs, carry, reverse, extra, reverse_mode_only=False):
    f = lambda p, x, c, e: jax.value_and_grad(_loss, argnums=(1, 2, 3))(cell, p, x, c, reverse, e, reverse_mode_only)
    return jax.jit(f)(params, xs, carry, extra)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype,masks,reverse", [(jnp.float64, False, False), (jnp.float64, True, True),
                                                 (jnp.float32, True, False)])
def test_fused_gradient_matches_plain_cell(kind, method, dtype, masks, reverse, key):
    """Loss and gradients w.r.t. params, inputs and initial carry equal the per-step cell's (float32 1e-5,
    float64 1e-10), with sequence lengths, resets and reverse."""
    plain, params, xs, carry, extra = _random_problem(kind, dtype, key, masks)
    fast = KINDS[kind](H, method=method, dtype=dtype)
    assert fast.fused is not None and plain.fused is None
    ref = _grads(plain, params, xs, carry, reverse, extra)
    got = _grads(fast, params, xs, carry, reverse, extra)
    _assert_close(got, ref, TOL[dtype])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_forward_mode_through_default_fused_layer(kind, key):
    """The default method ("auto": the custom-JVP layer outside reverse-mode-only unrolls) keeps jax.jvp working:
    tangents equal the plain cell's."""
    plain, params, xs, carry, extra = _random_problem(kind, jnp.float64, key, masks=True)
    fast = KINDS[kind](H, dtype=jnp.float64)
    tangent = jax.tree.map(lambda a: jnp.cos(a), params)

    def f(cell):
        return jax.jvp(lambda p: unroll(cell, p, xs, carry, **extra), (params,), (tangent,))

    _assert_close(f(fast), f(plain), 1e-10)


def test_second_derivative_through_jvp_layer(key):
    """Hessian-vector products (forward over reverse) work through the custom-JVP layer."""
    plain, params, xs, carry, extra = _random_problem("lstm", jnp.float64, key, masks=False)
    fast = fused.lstm(H, dtype=jnp.float64)

    def hvp(cell):
        g = lambda p: jax.grad(_loss, argnums=1)(cell, p, xs, carry, False, extra)
        return jax.jvp(g, (params,), (jax.tree.map(jnp.sin, params),))[1]

    _assert_close(hvp(fast), hvp(plain), 1e-9)


def test_stack_and_readout_use_the_fused_layers(key):
    """stack / with_readout of fused cells run layer by layer and match the per-step composition."""

    def build(lib):
        layers = [lib.lstm(H, dtype=jnp.float64), lib.gru(H, dtype=jnp.float64), lib.elman(H, dtype=jnp.float64)]
        core = cells.stack(layers, residual=True)
        return cells.with_readout(core, 2)

    fused_cell, plain_cell = build(fused), build(cells)
    assert fused_cell.fused is not None and plain_cell.fused is None
    params = jax.tree.map(lambda a: a + 0.1, plain_cell.init(key, I))
    _, _, xs, _, extra = _random_problem("lstm", jnp.float64, key, masks=True)
    carry = plain_cell.initial_carry(params, (B,))
    for rmo in (False, True):  # reverse-mode-only: the LSTM's hand-written VJP and the carry-only Elman layer
        _assert_close(_grads(fused_cell, params, xs, carry, True, extra, rmo),
                      _grads(plain_cell, params, xs, carry, True, extra), 1e-10)


def test_fallbacks_scan_the_step(key):
    """A replaced step (through cells.plain), per-step keys (dropout), a plain custom scan and mixed dtypes all
    scan cell.step."""
    cell = fused.lstm(H, dtype=jnp.float64)
    params = cell.init(key, I)
    xs = jax.random.normal(key, (B, T, I))
    # A replaced step is used, not the stale fused layer.
    doubled = cells.plain(cell)._replace(step=lambda p, c, x: cell.step(p, c, 2.0 * x))
    assert doubled.fused is None
    np.testing.assert_allclose(unroll(doubled, params, xs)[1], unroll(cell, params, 2.0 * xs)[1], atol=1e-12)
    # A custom scan is called (remat schedules plug in here).
    calls = []

    def my_scan(body, init, xs_, **kw):
        calls.append(1)
        return lax.scan(body, init, xs_, **kw)

    np.testing.assert_allclose(unroll(cell, params, xs, scan=my_scan)[1], unroll(cell, params, xs)[1], atol=1e-12)
    assert calls
    # Dropout keys in a stack: the per-step path with its dropout.
    stacked = cells.stack([fused.lstm(H, dtype=jnp.float64), fused.lstm(H, dtype=jnp.float64)], dropout_rate=0.5)
    sp = stacked.init(key, I)
    with_keys = jbptt.with_step_keys(xs, jax.random.key(3))
    _, ys_drop = unroll(stacked, sp, with_keys)
    _, ys_plain = unroll(stacked, sp, xs)
    assert not np.allclose(ys_drop, ys_plain)
    # Mixed dtypes (float32 params, float64 inputs): same result as the per-step path.
    cell32 = fused.lstm(H)
    p32 = cell32.init(key, I)
    np.testing.assert_allclose(unroll(cell32, p32, xs)[1], unroll(cells.plain(cell32), p32, xs)[1],
                               atol=1e-6)


def _dots_per_scan(jaxpr):
    """Number of dot_general equations in the body of every scan in ``jaxpr`` (recursively)."""
    counts = []

    def visit(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "scan":
                body = eqn.params["jaxpr"].jaxpr
                counts.append(sum(e.primitive.name == "dot_general" for e in body.eqns))
                visit(body)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params) if eqn.primitive.name != "scan" else []:
                visit(sub)

    visit(jaxpr)
    return counts


@pytest.mark.parametrize("method", ["jvp", "vjp"])
def test_fused_backward_has_one_product_per_step(method, key):
    """The structure the speed comes from: each loop of the gradient does exactly one matrix product per step
    (the weight gradients are taken outside the loop), where plain autodiff does more."""
    plain, params, xs, carry, _ = _random_problem("lstm", jnp.float32, key, masks=False)
    fast = fused.lstm(H, method=method)

    def grad_jaxpr(cell):
        return jax.make_jaxpr(jax.grad(lambda p: _loss(cell, p, xs, carry, False, {})))(params).jaxpr

    assert _dots_per_scan(grad_jaxpr(fast)) == [1, 1]
    assert max(_dots_per_scan(grad_jaxpr(plain))) > 1


def test_bptt_training_step_matches_plain(key):
    """The estimator + optimizer path (what bench_throughput.py times) gives the same update with and without
    the fused layer, stateful across two segments."""
    results = []
    for lib in (fused, cells):
        cell = cells.with_readout(lib.gru(H, dtype=jnp.float64), 2)
        params = cell.init(key, I)
        est = jbptt.make_estimator("bptt", cell, losses.mse, stateful=True)
        opt = optax.adam(1e-2)
        state = jbptt.train.init_train_state(est, opt, params, cell.initial_carry(params, (B,)))
        step = jbptt.train.make_train_step(est, opt)
        for s in range(2):
            batch = jbptt.Batch(jax.random.normal(jax.random.fold_in(key, s), (B, T, I)),
                                jnp.ones((B, T, 2)), seq_lengths=jnp.array([T, 5, 2]))
            state, metrics = step(state, batch)
        results.append((state.params, metrics))
    _assert_close(results[0], results[1], 1e-10)


def test_vmap_over_parameter_sets(key):
    """vmap over a leading axis of parameter sets equals looping (the fused layer is batch-polymorphic)."""
    cell = fused.lstm(H, dtype=jnp.float64)
    ps = jax.vmap(lambda k: cell.init(k, I))(jax.random.split(key, 2))
    xs = jax.random.normal(key, (B, T, I))
    got = jax.vmap(lambda p: unroll(cell, p, xs)[1])(ps)
    plain = cells.plain(cell)
    want = jnp.stack([unroll(plain, jax.tree.map(lambda a, i=i: a[i], ps), xs)[1] for i in range(2)])
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_unknown_method_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown fused method"):
        fused.lstm(4, method="cudnn")


# ----------------------------------------------------------------------------------------------------------------
# The Elman layer (custom VJP that stores only the carries).


def _elman_problem(activation, dtype, key, masks):
    plain = cells.elman(H, activation=activation, dtype=dtype)
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(k2, a.shape, dtype), plain.init(k1, I))
    xs = jax.random.normal(k3, (B, T, I), dtype)
    carry = jax.random.normal(k4, (B, H), dtype)
    extra = {"seq_lengths": jnp.array([T, 4, 7]), "resets": jax.random.bernoulli(k5, 0.25, (B, T))} if masks else {}
    return plain, params, xs, carry, extra


@pytest.mark.parametrize("activation", fused.ELMAN_ACTIVATIONS)
@pytest.mark.parametrize("dtype,masks,reverse", [(jnp.float64, False, False), (jnp.float64, True, True),
                                                 (jnp.float32, True, False)])
def test_elman_layer_gradient_matches_plain_cell(activation, dtype, masks, reverse, key):
    """Under a reverse-mode-only unroll the fused Elman cell runs the carry-only custom VJP and gives the per-step
    cell's loss and gradients w.r.t. params, inputs and initial carry (float32 1e-5, float64 1e-10), with sequence
    lengths, resets and reverse; a plain unroll of it runs JAX's own autodiff of the same loop."""
    plain, params, xs, carry, extra = _elman_problem(activation, dtype, key, masks)
    fast = fused.elman(H, activation=activation, dtype=dtype)
    loss = lambda flag: lambda p: _loss(fast, p, xs, carry, reverse, extra, flag)
    assert "custom_vjp_call" in str(jax.make_jaxpr(loss(True))(params))
    assert "custom_vjp_call" not in str(jax.make_jaxpr(loss(False))(params))
    ref = _grads(plain, params, xs, carry, reverse, extra)
    for rmo in (True, False):
        _assert_close(_grads(fast, params, xs, carry, reverse, extra, rmo), ref, TOL[dtype])


@pytest.mark.parametrize("masks", [False, True])
def test_elman_layer_with_readout_inside_the_loop(masks, key):
    """elman_layer(readout=...) (used by with_readout in remat segments) equals the per-step readout cell."""
    plain_core, core_params, xs, carry, extra = _elman_problem("tanh", jnp.float64, key, masks)
    plain = cells.with_readout(plain_core, 2)
    params = {"core": core_params, "readout": jax.tree.map(lambda a: a + 0.2, plain.init(key, I)["readout"])}
    valid = None if not masks else (jnp.arange(T)[:, None] < extra["seq_lengths"][None, :])
    reset = None if not masks else extra["resets"].T

    def layer_loss(p, xs, carry):
        final, ys = fused.elman_layer(p["core"], jnp.swapaxes(xs, 0, 1), carry, valid, reset, readout=p["readout"])
        ys = jnp.swapaxes(ys, 0, 1)
        w = jnp.cos(jnp.arange(ys.size, dtype=ys.dtype)).reshape(ys.shape)  # as in _loss
        return jnp.sum(w * jnp.tanh(ys)) + jnp.sum(jnp.sin(final))

    got = jax.value_and_grad(layer_loss, argnums=(0, 1, 2))(params, xs, carry)
    ref = _grads(plain, params, xs, carry, False, extra)
    _assert_close(got, ref, 1e-10)


def test_elman_layer_stores_one_carry_per_step(key):
    """The point of the layer: its backward pass keeps the carries and nothing else. With a readout to one output,
    the gradient's temp memory is the T stored carries plus the readout's [T, B, H] output cotangent (2 carry
    sequences), against 3 for JAX's rule on the per-step cell (a tanh step keeps its input carry, its output and
    1 - tanh^2)."""
    Bm, Tm, Hm = 32, 256, 64
    xs = jax.random.normal(key, (Bm, Tm, 2), jnp.float32)

    def temp(core):
        cell = cells.with_readout(core, 1)
        params = cell.init(key, 2)
        f = jax.jit(jax.grad(lambda p: jnp.sum(unroll(cell, p, xs, reverse_mode_only=True)[1] ** 2)))
        return f.lower(params).compile().memory_analysis().temp_size_in_bytes

    carries = Tm * Bm * Hm * 4
    fast, plain = temp(fused.elman(Hm)), temp(cells.elman(Hm))
    assert plain > 2.9 * carries
    assert fast < 2.2 * carries


def test_bptt_estimator_runs_the_reverse_mode_layer(key, monkeypatch):
    """The BPTT estimator unrolls with reverse_mode_only=True: a fused LSTM (and stacks / readouts of it) then
    runs the hand-written VJP layer, with the plain cell's gradient (float64, 1e-10, lengths and resets); a plain
    unroll keeps the custom-JVP layer, so jax.jvp through it still works."""
    import sys

    from jbptt.batch import Batch
    from jbptt.estimators.bptt import bptt, loss_and_outputs, reference_gradient

    lstm_module = sys.modules["jbptt.fused._lstm"]
    methods, lstm_layer = [], lstm_module.lstm_layer

    def recording(*args, method, **kw):
        methods.append(method)
        return lstm_layer(*args, method=method, **kw)

    monkeypatch.setattr(lstm_module, "lstm_layer", recording)

    def check(cell, plain):
        assert cell.fused is not None and plain.fused is None
        params = jax.tree.map(lambda a: a + 0.1, plain.init(key, I))
        _, _, xs, _, extra = _random_problem("lstm", jnp.float64, key, masks=True)
        batch = Batch(xs, jnp.sin(jnp.arange(B * T * 2.0)).reshape(B, T, 2), seq_lengths=extra["seq_lengths"],
                      resets=extra["resets"])
        est = bptt(cell, losses.mse)

        def update(p):
            return est.update(p, est.init(p, None), batch)[:2]

        def forward_jaxpr(flag):
            loss = lambda p: loss_and_outputs(cell, losses.mse, p, batch, reverse_mode_only=flag)[0]
            return str(jax.make_jaxpr(loss)(params))

        assert "custom_vjp_call" in forward_jaxpr(True) and "custom_vjp_call" not in forward_jaxpr(False)
        methods.clear()
        jax.make_jaxpr(update)(params)
        assert methods == ["vjp"]  # the estimator's gradient runs the custom-VJP LSTM layer
        _assert_close(jax.jit(update)(params), reference_gradient(plain, losses.mse, params, batch), 1e-10)
        _assert_close(reference_gradient(cell, losses.mse, params, batch),
                      reference_gradient(plain, losses.mse, params, batch), 0.0)

    single = lambda lib: cells.with_readout(lib.lstm(H, dtype=jnp.float64), 2)
    stacked = lambda lib: cells.with_readout(cells.stack([lib.gru(H, dtype=jnp.float64),
                                                          lib.lstm(H, dtype=jnp.float64)]), 2)
    for build in (single, stacked):
        check(build(fused), build(cells))


def test_bptt_estimator_runs_the_elman_layer_with_the_readout_in_its_loop(key):
    """A fused Elman cell under the BPTT estimator runs the carry-only layer with with_readout's readout inside
    its loops: the plain cell's gradient (float64, 1e-10; lengths, resets, a stateful carry) at about one stored
    carry per step (JAX's rule on the per-step cell keeps three)."""
    from jbptt.batch import Batch
    from jbptt.estimators.bptt import bptt, reference_gradient

    cell, plain = (cells.with_readout(lib.elman(H, dtype=jnp.float64), 2) for lib in (fused, cells))
    params = jax.tree.map(lambda a: a + 0.1, plain.init(key, I))
    _, _, xs, carry, extra = _elman_problem("tanh", jnp.float64, key, masks=True)
    batch = Batch(xs, jnp.sin(jnp.arange(B * T * 2.0)).reshape(B, T, 2), seq_lengths=extra["seq_lengths"],
                  resets=extra["resets"])
    est = bptt(cell, losses.mse, stateful=True)
    got = jax.jit(lambda p: est.update(p, est.init(p, carry), batch)[:2])(params)
    _assert_close(got, reference_gradient(plain, losses.mse, params, batch, carry), 1e-10)

    Bm, Tm, Hm = 32, 256, 64
    big = Batch(jax.random.normal(key, (Bm, Tm, 2), jnp.float32), jnp.zeros((Bm, Tm, 1), jnp.float32))

    def temp(lib):
        c = cells.with_readout(lib.elman(Hm), 1)
        e, p = bptt(c, losses.mse), c.init(key, 2)
        f = jax.jit(lambda p: e.update(p, e.init(p, None), big)[:2])
        return f.lower(p).compile().memory_analysis().temp_size_in_bytes

    carries = Tm * Bm * Hm * 4
    assert temp(cells) > 2.9 * carries
    assert temp(fused) < 1.3 * carries


def test_reference_gradient_runs_the_plain_step(key):
    """reference_gradient of a fused cell traces exactly the program of a hand-built cell holding only init,
    initial_carry and step: the reference never rests on jbptt.fused."""
    from jbptt.batch import Batch
    from jbptt.estimators.bptt import reference_gradient

    fast = cells.with_readout(cells.stack([fused.lstm(H, dtype=jnp.float64), fused.elman(H, dtype=jnp.float64)]), 2)
    bare = cells.Cell(fast.init, fast.initial_carry, fast.step, fast.hidden_size, fast.output_size)
    params = fast.init(key, I)
    batch = Batch(jax.random.normal(key, (B, T, I)), jnp.ones((B, T, 2)), seq_lengths=jnp.array([T, 4, 7]))
    jaxpr = lambda c: str(jax.make_jaxpr(lambda p: reference_gradient(c, losses.mse, p, batch))(params))
    assert jaxpr(fast) == jaxpr(bare)
    assert "custom" not in jaxpr(fast)
