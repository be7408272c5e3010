"""translate: numbers written out in words, one language to another — disjoint splits, determinism, vocabularies
and the token conventions of jbptt.seq2seq, bad input."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbptt.tasks import make_task, translate

pytest.importorskip("num2words")

SMALL = dict(low=0, high=299, n_val=20, n_test=30)


@pytest.fixture(scope="module")
def task():
    return make_task("translate", **SMALL)


def test_splits_are_disjoint_and_deterministic(task):
    nums = task.info["numbers"]
    assert {k: len(v) for k, v in nums.items()} == {"train": 250, "val": 20, "test": 30}
    assert not set(nums["test"]) & set(nums["train"]) and not set(nums["val"]) & set(nums["train"])
    assert not set(nums["val"]) & set(nums["test"])
    src = task.info["texts"]
    assert not set(src["test"][0]) & set(src["train"][0])  # no test sentence is seen in training
    again = make_task("translate", **SMALL)
    for k in nums:
        np.testing.assert_array_equal(nums[k], again.info["numbers"][k])
    other = make_task("translate", seed=1, **SMALL)
    assert not np.array_equal(nums["test"], other.info["numbers"]["test"])
    fewer = make_task("translate", n_train=40, **SMALL)
    assert len(fewer.info["numbers"]["train"]) == 40 and set(fewer.info["numbers"]["train"]) <= set(nums["train"])


def test_batches_follow_the_seq2seq_conventions(task, key):
    S, L = task.info["max_src_len"], task.info["max_tgt_len"]
    b = jax.jit(task.sample, static_argnums=(1, 2))(key, 6, "train")
    src, tgt = b.inputs  # the decoder's teacher-forcing input is the target itself
    assert src.shape == (6, S) and b.targets.shape == (6, L) and b.seq_lengths.shape == (6,)
    assert src.dtype == jnp.int32 and b.targets.dtype == jnp.int32 and b.mask is None
    np.testing.assert_array_equal(tgt, b.targets)
    assert (task.info["bos"], task.info["eos"], task.info["pad"]) == (translate.BOS, translate.EOS, translate.PAD)
    assert int(src.max()) < task.input_size and int(b.targets.max()) < task.output_size
    tl = translate.target_lengths(b)
    sv, tv = task.info["src_vocab"], task.info["tgt_vocab"]
    for x, n, y, m in zip(np.asarray(src), np.asarray(b.seq_lengths), np.asarray(b.targets), np.asarray(tl),
                          strict=True):
        assert np.all(x[n:] == translate.PAD) and np.all(x[:n] != translate.PAD)
        assert y[m - 1] == translate.EOS and np.all(y[m:] == translate.EOS) and np.all(y[:m - 1] >= 2)
        number = task.info["numbers"]["train"][task.info["texts"]["train"][0].index(sv.decode(x[:n]))]
        assert translate.spell([number], "fr")[0] == tv.decode(y, stop=translate.EOS)
    whole = task.sample(key, 1000, "test")  # the whole split, in order
    assert [sv.decode(r) for r in np.asarray(whole.inputs[0])] == task.info["texts"]["test"][0]


def test_vocab_round_trip(task):
    for vocab, texts in ((task.info["src_vocab"], 0), (task.info["tgt_vocab"], 1)):
        for split in ("train", "val", "test"):
            for text in task.info["texts"][split][texts]:
                assert vocab.decode(vocab.encode(text)) == text
    tv = task.info["tgt_vocab"]
    assert tv.tokens()[:2] == ("<eos>", "<bos>") and len(tv) == task.output_size
    assert "é" in tv.chars or "-" in tv.chars  # French words: accents and hyphens are characters
    with pytest.raises(ValueError, match="character '#'"):
        tv.encode("un #")


def test_digits_target_and_metrics(key):
    t = make_task("translate", src="en", tgt="digits", low=0, high=99, n_val=5, n_test=10)
    b = t.sample(key, 8, "test")
    tv = t.info["tgt_vocab"]
    whole = t.sample(key, 10, "test")
    assert [tv.decode(r, stop=translate.EOS) for r in np.asarray(whole.targets)] == [str(n) for n in
                                                                                      t.info["numbers"]["test"]]
    oracle = jax.nn.one_hot(b.targets, t.output_size, dtype=jnp.float64) * 10.0
    m = jax.jit(t.metrics)(oracle, b)
    assert float(m["exact_match"]) == 1.0 and float(m["token_accuracy"]) == 1.0
    lengths = np.asarray(translate.target_lengths(b))
    wrong = oracle.at[0, lengths[0] - 1].set(jax.nn.one_hot(5, t.output_size) * 10.0)  # row 0's EOS is wrong
    wrong = wrong.at[1, lengths[1]].set(jax.nn.one_hot(5, t.output_size) * 10.0)  # past row 1's end: ignored
    m = jax.jit(t.metrics)(wrong, b)
    assert np.isclose(m["exact_match"], 7 / 8) and np.isclose(m["token_accuracy"], 1 - 1 / lengths.sum())
    assert np.isclose(translate.seq2seq_loss.fn(wrong, b.targets, None), m["loss"], rtol=1e-12)


def test_seq2seq_loss_agrees_with_the_task_metrics(key):
    """The batch feeds jbptt.seq2seq as it is: the model's loss equals the task's loss of its logits."""
    from jbptt.cells import gru
    from jbptt.seq2seq import seq2seq

    t = make_task("translate", src="digits", tgt="fr", low=0, high=99, n_val=5, n_test=10)
    model = seq2seq(gru(6), gru(6), src_vocab=t.input_size, tgt_vocab=t.output_size, bos=t.info["bos"],
                    eos=t.info["eos"])
    params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(key))
    b = t.sample(key, 3)

    @jax.jit
    def run(params, b):
        tl = translate.target_lengths(b)
        src = b.inputs[0]
        ys = model.logits(params, src, b.targets, b.seq_lengths, tl)
        return model.loss(params, src, b.targets, b.seq_lengths, tl), t.metrics(ys, b), \
            translate.seq2seq_loss.fn(ys, b.targets, b.weights(ys.dtype))

    loss, m, whole = run(params, b)
    assert np.isfinite(loss) and np.isclose(loss, m["loss"], rtol=1e-10) and np.isclose(loss, whole, rtol=1e-10)
    with pytest.raises(ValueError, match="whole-sequence loss"):
        translate.seq2seq_loss(b.targets[:, 0], b.targets[:, 0])  # no per-step use


def test_bad_input(monkeypatch):
    with pytest.raises(ValueError, match=r"cannot draw .*n_test=300 .* \[0, 99\]"):
        make_task("translate", low=0, high=99, n_test=300)
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        make_task("translate", tgt="xx", **SMALL)
    with pytest.raises(ValueError, match="both 'en'"):
        make_task("translate", src="en", tgt="en", **SMALL)
    monkeypatch.setitem(sys.modules, "num2words", None)
    translate._spell_cached.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"pip install 'jbptt\[translate\]'"):
            make_task("translate", **SMALL)
    finally:
        translate._spell_cached.cache_clear()
