"""A cache folder for generated data sets: parameter-hashed folders, atomic writes, a manifest with content
hashes, and a progress bar.

Layout: ``<root>/<name>/<hash of the parameters>/`` holds one ``<part>.npz`` per generated part (e.g. a split)
and ``manifest.json`` (the parameters, counts and a SHA-256 content hash of every part's arrays). Every file is
written to a temporary file in the same folder and renamed into place, so a reader never sees half a file; the
manifest is rewritten after each part. ``root`` is the ``cache_dir`` option, else ``$JBPTT_CACHE``, else
``~/.cache/jbptt``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$JBPTT_CACHE``, else ``~/.cache/jbptt`` (``~`` expanded)."""
    root = cache_dir if cache_dir is not None else os.environ.get("JBPTT_CACHE") or "~/.cache/jbptt"
    return Path(root).expanduser()


def params_hash(params: dict[str, Any]) -> str:
    """First 16 hex digits of the SHA-256 of ``params`` as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def dataset_dir(name: str, params: dict[str, Any], cache_dir=None) -> Path:
    """The folder of data set ``name`` generated with ``params`` (not created)."""
    return cache_root(cache_dir) / name / params_hash(params)


def content_hash(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the arrays' names, dtypes, shapes and bytes (in name order)."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    """Calls ``write(file)`` on a temporary file next to ``path``, then renames it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # as an ordinary file (mkstemp makes it private)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> str:
    """Writes ``arrays`` to ``path`` (``.npz``, atomically). Returns their :func:`content_hash`."""
    _atomic_write(path, lambda f: np.savez(f, **arrays))
    return content_hash(arrays)


def load_arrays(path: Path, expected_hash: str) -> dict[str, np.ndarray] | None:
    """The arrays of ``path``, or None when it is missing, unreadable or its content hash is not
    ``expected_hash``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception:  # noqa: BLE001 - any failure to read means the file is corrupt
        return None
    return arrays if content_hash(arrays) == expected_hash else None


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest, or None when it is missing or not valid JSON."""
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Writes ``manifest`` as ``manifest.json`` in ``folder`` (atomically)."""
    text = json.dumps(manifest, indent=2, sort_keys=True).encode()
    _atomic_write(folder / MANIFEST, lambda f: f.write(text))


class Progress:
    """A progress bar on ``stream`` (default stderr): one redrawn line on a terminal, plain lines at every 10%
    otherwise; ``enabled=False`` draws nothing. Call :meth:`update` with the work done since the last call."""

    def __init__(self, total: int, label: str, *, enabled: bool = True, stream=None):
        self.total, self.label, self.enabled, self.done = total, label, enabled, 0
        self.stream = sys.stderr if stream is None else stream
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start, self.next_mark = time.perf_counter(), 0.0

    def update(self, n: int = 1) -> None:
        """Adds ``n`` units of work and redraws when due."""
        self.done += n
        frac = self.done / self.total if self.total else 1.0
        if not self.enabled or not (self.tty or self.done >= self.total or frac >= self.next_mark):
            return
        self.next_mark = frac + 0.1
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        end = "" if self.tty and self.done < self.total else "\n"
        self.stream.write(f"{chr(13) if self.tty else ''}{self.label} [{bar}] {self.done}/{self.total} "
                          f"({rate:.0f}/s){end}")
        self.stream.flush()
