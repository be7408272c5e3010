"""jbptt: a JAX functional research toolkit for backpropagation through time and its alternatives.

The package root is lazy (PEP 562): ``import jbptt`` loads nothing, and the first public name touched
(``jbptt.rtrl``, ``from jbptt import cells``) loads the library as an eager import used to (every estimator
registered). Importing a submodule directly (``import jbptt.experiment.config``) loads only what that module
imports, which keeps ``jbptt --help`` and config errors free of JAX.
"""

import importlib as _importlib

__version__ = "0.1.0"

__all__ = [
    "Batch", "BPTTState", "Cell", "GradientEstimator", "batch", "bidirectional", "bptt", "cells", "diagnostics",
    "estimator", "estimators", "from_flax", "learned_initial_carry", "losses", "make_estimator",
    "reference_gradient", "register_estimator", "remat", "rtrl", "stack", "tbptt", "train", "trainable_mask",
    "unroll", "with_readout", "with_step_keys",
]

# name -> (module, attribute or None for the module itself); the order is the import order.
_EXPORTS = {
    "batch": ("jbptt.batch", None),
    "cells": ("jbptt.cells", None),
    "diagnostics": ("jbptt.diagnostics", None),
    "estimator": ("jbptt.estimator", None),
    "estimators": ("jbptt.estimators", None),  # importing it registers every estimator
    "losses": ("jbptt.losses", None),
    "remat": ("jbptt.remat", None),
    "train": ("jbptt.train", None),
    "unroll": ("jbptt.unroll", None),
    "Batch": ("jbptt.batch", "Batch"),
    "Cell": ("jbptt.cells", "Cell"),
    "from_flax": ("jbptt.cells", "from_flax"),
    "learned_initial_carry": ("jbptt.cells", "learned_initial_carry"),
    "stack": ("jbptt.cells", "stack"),
    "trainable_mask": ("jbptt.cells", "trainable_mask"),
    "with_readout": ("jbptt.cells", "with_readout"),
    "GradientEstimator": ("jbptt.estimator", "GradientEstimator"),
    "make_estimator": ("jbptt.estimator", "make_estimator"),
    "register_estimator": ("jbptt.estimator", "register_estimator"),
    "bptt": ("jbptt.estimators.bptt", None),
    "rtrl": ("jbptt.estimators.rtrl", None),
    "tbptt": ("jbptt.estimators.tbptt", None),
    "BPTTState": ("jbptt.estimators.bptt", "BPTTState"),
    "reference_gradient": ("jbptt.estimators.bptt", "reference_gradient"),
    "bidirectional": ("jbptt.unroll", "bidirectional"),
    "with_step_keys": ("jbptt.unroll", "with_step_keys"),
}


def _load() -> None:
    """Imports the library and binds every public name (what ``import jbptt`` did eagerly before)."""
    g = globals()
    for name, (module, attr) in _EXPORTS.items():
        mod = _importlib.import_module(module)
        g[name] = mod if attr is None else getattr(mod, attr)


def __getattr__(name: str):
    if name in _EXPORTS:
        _load()
        return globals()[name]
    raise AttributeError(f"module 'jbptt' has no attribute {name!r}")


def __dir__():
    hidden = {"__getattr__", "__dir__"}
    return sorted(set(__all__) | {n for n in globals() if n not in hidden and (n.startswith("__") or n[0] != "_")})
