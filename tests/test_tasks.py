"""Task generators: shapes, dtypes, determinism, split independence and label correctness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbptt.tasks import TASKS, mackey_glass, make_task, text

SMALL = {
    "copy": dict(length=3, lag=4),
    "delayed_recall": dict(length=12, lag=3),
    "adding": dict(length=10),
    "brackets": dict(length=16),
    "digits": {},
    "chars": dict(seq_len=20),
    "mackey_glass": dict(length=30),
}


def sample(task, key, batch_size: int, split: str = "train"):
    """``task.sample`` under ``jit`` (one compilation instead of one per operation)."""
    return jax.jit(task.sample, static_argnums=(1, 2))(key, batch_size, split)


def metrics(task, ys, batch):
    """``task.metrics`` under ``jit``."""
    return jax.jit(task.metrics)(ys, batch)


@pytest.mark.parametrize("name", sorted(set(TASKS) - {"speech_digits", "translate"}))  # CTC / seq2seq: own files
def test_shapes_determinism_and_splits(name, key):
    task = make_task(name, **SMALL[name])
    b = task.sample(key, 5)
    B, T, I = b.inputs.shape
    assert (B, I) == (5, task.input_size) and b.inputs.dtype == jnp.float32
    assert b.mask.shape == (B, T) and float(b.mask.sum()) > 0
    if task.loss == "cross_entropy":
        assert b.targets.shape == (B, T) and b.targets.dtype == jnp.int32
        assert int(b.targets.min()) >= 0 and int(b.targets.max()) < task.output_size
    else:
        assert b.targets.shape == (B, T, task.output_size)
    sample = jax.jit(task.sample, static_argnums=(1, 2))
    again = sample(key, 5, "train")  # the same key gives the same batch, eagerly and under jit
    for x, y in zip(b, again, strict=True):
        if x is not None:
            np.testing.assert_array_equal(x, y)
    other = sample(jax.random.key(1), 5, "train")
    assert not np.array_equal(b.inputs, other.inputs)
    val = task.sample(key, 5, "val")  # eagerly: the operations compiled for the first batch serve it
    assert not np.array_equal(b.inputs, val.inputs)
    ys = jnp.zeros((B, T, task.output_size))
    m = metrics(task, ys, b)
    assert task.metric in m and all(jnp.shape(v) == () for v in m.values())


def test_bad_names_and_options():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_task("nope")
    with pytest.raises(ValueError, match="no option"):
        make_task("adding", lenght=3)
    with pytest.raises(ValueError, match="lag < length"):
        make_task("delayed_recall", length=5, lag=5)
    with pytest.raises(ValueError, match="split"):
        make_task("adding").sample(jax.random.key(0), 2, "dev")


def test_adding_labels(key):
    task = make_task("adding", length=20)
    b = sample(task, key, 64)
    values, marks = np.asarray(b.inputs[..., 0]), np.asarray(b.inputs[..., 1])
    assert (marks.sum(1) == 2).all() and (marks[:, :10].sum(1) == 1).all()
    np.testing.assert_allclose(b.targets[:, -1, 0], (values * marks).sum(1), rtol=1e-6)
    assert (np.asarray(b.mask)[:, -1] == 1).all() and np.asarray(b.mask)[:, :-1].sum() == 0
    # The constant-1 guess scores about 1/6.
    mse = metrics(task, jnp.ones((64, 20, 1)), b)["mse"]
    assert 0.08 < float(mse) < 0.3


def test_copy_and_delayed_recall_labels(key):
    b = sample(make_task("copy", length=4, lag=3, n_symbols=5), key, 3)
    ids = np.argmax(np.asarray(b.inputs[:, :4, :5]), -1)
    np.testing.assert_array_equal(np.asarray(b.targets[:, 8:]), ids)
    assert np.asarray(b.inputs[:, 7, 5]).tolist() == [1, 1, 1] and np.asarray(b.mask[:, :8]).sum() == 0
    task = make_task("delayed_recall", length=10, lag=3)
    b = sample(task, key, 4)
    ids = np.argmax(np.asarray(b.inputs), -1)
    np.testing.assert_array_equal(np.asarray(b.targets[:, 3:]), ids[:, :7])
    np.testing.assert_array_equal(np.asarray(b.mask[0]), [0] * 3 + [1] * 7)
    # A perfect predictor has accuracy 1.
    logits = 10.0 * jax.nn.one_hot(b.targets, 4)
    assert float(metrics(task, logits, b)["accuracy"]) == 1.0


def test_bracket_depths(key):
    b = sample(make_task("brackets", length=30, max_depth=3), key, 8)
    toks = np.argmax(np.asarray(b.inputs), -1)
    depth = np.zeros(8, int)
    for t in range(30):
        depth = depth + (toks[:, t] == 0) - (toks[:, t] == 1)
        assert (depth >= 0).all() and (depth <= 3).all()
        np.testing.assert_array_equal(np.asarray(b.targets[:, t]), depth)


def test_digits_splits_and_labels(key):
    task = make_task("digits", mode="pixels")
    sizes = task.info["split_sizes"]
    assert sum(sizes.values()) == 1797
    whole = task.sample(key, 10_000, "test")
    assert whole.inputs.shape == (sizes["test"], 64, 1) and float(whole.inputs.max()) <= 1.0
    from sklearn.datasets import load_digits

    d = load_digits()
    row = np.asarray(whole.inputs[0, :, 0]) * 16.0
    match = np.where((np.abs(d.images.reshape(-1, 64) - row) < 1e-4).all(1))[0]
    assert int(d.target[match[0]]) == int(whole.targets[0, -1])


def test_text_roundtrip_and_shift(key):
    s = "def f(x):\n    return x  # ok"
    assert text.decode(text.encode(s)) == s and text.decode(text.encode("é")) == "?"
    b = sample(make_task("chars", seq_len=16), key, 3)
    ids = np.argmax(np.asarray(b.inputs), -1)
    np.testing.assert_array_equal(ids[:, 1:], np.asarray(b.targets[:, :-1]))
    segs = list(text.text_stream(2, 50, "test"))
    assert len(segs) > 10
    first = np.argmax(np.asarray(segs[1].inputs[:, 0]), -1)
    np.testing.assert_array_equal(first, np.asarray(segs[0].targets[:, -1]))


def test_mackey_glass_series_and_targets(key):
    x = mackey_glass.mackey_glass_series()
    assert x.shape == (12000,) and 0.2 < x.min() < x.max() < 1.5  # the chaotic attractor's range
    b = sample(make_task("mackey_glass", length=30, horizon=2, washout=5), key, 4)
    np.testing.assert_array_equal(np.asarray(b.inputs[:, 2:]), np.asarray(b.targets[:, :-2]))
    np.testing.assert_array_equal(np.asarray(b.mask[0]), [0] * 5 + [1] * 25)
