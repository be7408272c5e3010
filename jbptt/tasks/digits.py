"""Sequential handwritten digits: the 8x8 digits data set shipped with scikit-learn, read row by row or
pixel by pixel (needs the optional ``scikit-learn`` extra: ``pip install 'jbptt[digits]'``)."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from jbptt.batch import Batch
from jbptt.losses import final_step_weights
from jbptt.tasks import Task, check_split, classification_metrics, register_task, take_rows


@functools.lru_cache(maxsize=1)
def load_digits_splits(val_fraction: float = 0.15, test_fraction: float = 0.15):
    """The 1797 digit images scaled to [0, 1] as ``{split: (images [N, 8, 8] float32, labels [N] int32)}``.

    The split is a fixed permutation (numpy seed 0), so it is the same on every machine.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits task needs scikit-learn: pip install 'jbptt[digits]'") from None
    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)
    labels = data.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(labels))
    n_val, n_test = int(len(order) * val_fraction), int(len(order) * test_fraction)
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return {k: (images[np.sort(v)], labels[np.sort(v)]) for k, v in parts.items()}


@register_task("digits")
def digits(mode: str = "rows", dtype: str = "float32") -> Task:
    """Classify 8x8 digit images fed as a sequence; the label is predicted at the last step.

    Args:
      mode: ``"rows"`` (``T = 8`` steps of 8 pixels) or ``"pixels"`` (``T = 64`` steps of 1 pixel).

    Batches: inputs ``[B, T, I]``, targets ``[B, T]`` (the label repeated), ``mask`` one-hot at the last step.
    Splits of 1259 / 269 / 269 images; ``sample`` returns the whole split when ``batch_size`` reaches its
    size.
    Loss ``cross_entropy``; headline metric ``accuracy`` (10 classes, chance 0.1).
    """
    if mode not in ("rows", "pixels"):
        raise ValueError(f"digits mode must be 'rows' or 'pixels', got {mode!r}")
    splits = load_digits_splits()
    T, I = (8, 8) if mode == "rows" else (64, 1)
    data = {k: (jnp.asarray(x.reshape(len(x), T, I), dtype), jnp.asarray(y)) for k, (x, y) in splits.items()}

    def sample(key, batch_size: int, split: str = "train"):
        check_split(split)
        x, y = data[split]
        rows = take_rows(key, len(y), batch_size)
        labels = y[rows]
        B = labels.shape[0]
        targets = jnp.broadcast_to(labels[:, None], (B, T))
        return Batch(x[rows], targets, final_step_weights(B, T, dtype=dtype))

    sizes = {k: len(v[1]) for k, v in splits.items()}
    return Task(
        "digits",
        I,
        10,
        "cross_entropy",
        sample,
        classification_metrics,
        "accuracy",
        True,
        {"seq_len": T, "split_sizes": sizes},
    )
