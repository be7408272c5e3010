"""jbptt: a JAX functional research toolkit for backpropagation through time and its alternatives."""

from jbptt import batch, cells, diagnostics, estimator, estimators, losses, remat, train, unroll
from jbptt.batch import Batch
from jbptt.cells import Cell, from_flax, learned_initial_carry, stack, trainable_mask, with_readout
from jbptt.estimator import GradientEstimator, make_estimator, register_estimator
from jbptt.estimators import bptt, rtrl, tbptt
from jbptt.estimators.bptt import BPTTState, reference_gradient
from jbptt.unroll import bidirectional, with_step_keys

__version__ = "0.1.0"

__all__ = [
    "Batch", "BPTTState", "Cell", "GradientEstimator", "batch", "bidirectional", "bptt", "cells", "diagnostics",
    "estimator", "estimators", "from_flax", "learned_initial_carry", "losses", "make_estimator",
    "reference_gradient", "register_estimator", "remat", "rtrl", "stack", "tbptt", "train", "trainable_mask",
    "unroll", "with_readout", "with_step_keys",
]
