"""Checkpoints: pytrees written with flax's msgpack serialization (no pickle), atomically.

``save(path, tree)`` writes to a temporary file in the same folder, flushes it to disk and renames it over
``path``, so a reader (or a run killed mid-write) sees either the old or the new checkpoint, never half of
one.
``load(path, target)`` restores into the structure of ``target`` and checks every leaf's shape and dtype, so a
corrupt file or a checkpoint of another model gives one clear :class:`CheckpointError`.
Typed PRNG keys (``jax.random.key``) are stored as their raw key data and rebuilt on load.

A file written by :func:`save` is a header line ``JBPTT-CKPT sha256 <hex digest>`` and the msgpack bytes; :func:`load`
verifies the digest, so bytes overwritten anywhere in the file (which msgpack may well read without complaint) give
a :class:`CheckpointError`. Files without the header (written before it existed) load unverified.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import jax
import numpy as np
from flax import serialization


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not match the run's model/optimizer/estimator."""


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, data: bytes | str) -> None:
    """Writes ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def to_bytes(tree) -> bytes:
    """msgpack bytes of a pytree of arrays (NamedTuples, dicts, tuples, None; typed keys as key data)."""
    return serialization.to_bytes(jax.device_get(_keys_to_data(tree)))


def from_bytes(target, data: bytes, *, name: str = "checkpoint"):
    """Restores bytes from :func:`to_bytes` into the structure of ``target`` (checked leaf by leaf)."""
    template = _keys_to_data(target)
    try:
        restored = serialization.from_bytes(template, data)
    except Exception as e:  # msgpack errors for corrupt files, ValueError/KeyError for structure mismatches
        raise CheckpointError(
            f"{name} is corrupt or does not match this run: {type(e).__name__}: {e}"
        ) from None
    want, treedef = jax.tree_util.tree_flatten_with_path(template)
    got = jax.tree_util.tree_leaves(restored)
    if len(got) != len(want):
        raise CheckpointError(f"{name} has {len(got)} arrays where this run has {len(want)}")
    for (path, w), g in zip(want, got, strict=True):
        ws, gs = np.shape(w), np.shape(g)
        wd, gd = np.asarray(w).dtype, np.asarray(g).dtype
        if ws != gs or wd != gd:
            raise CheckpointError(
                f"{name} does not match this run at {jax.tree_util.keystr(path)}: "
                f"stored {gd}{list(gs)}, expected {wd}{list(ws)}"
            )
    leaves = [
        jax.random.wrap_key_data(np.asarray(g), impl=jax.random.key_impl(t)) if _is_key(t) else g
        for t, g in zip(jax.tree_util.tree_leaves(target), got, strict=True)
    ]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), leaves)


MAGIC = b"JBPTT-CKPT sha256 "


def save(path: str, tree) -> None:
    """Writes ``tree`` to ``path`` atomically, with the SHA-256 of its bytes in a header line."""
    data = to_bytes(tree)
    atomic_write(path, MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n" + data)


def _verified(data: bytes, name: str) -> bytes:
    """The msgpack bytes of a checkpoint file, its checksum verified (files without a header: as they are)."""
    if not data.startswith(MAGIC):
        return data
    digest, sep, payload = data[len(MAGIC):].partition(b"\n")
    if not sep or hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CheckpointError(f"{name} is corrupt: its SHA-256 checksum does not match its contents")
    return payload


def load(path: str, target):
    """Reads the checkpoint at ``path`` into the structure of ``target``; clear errors for every failure."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    name = f"checkpoint {path}"
    return from_bytes(target, _verified(data, name), name=name)
