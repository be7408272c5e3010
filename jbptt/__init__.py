"""jbptt: a JAX functional research toolkit for backpropagation through time and its alternatives."""

from jbptt import bptt, cells, diagnostics, estimator, losses, remat, rtrl, tbptt, train, unroll
from jbptt.bptt import BPTTState, reference_gradient
from jbptt.cells import Cell, from_flax, learned_initial_carry, stack, trainable_mask, with_readout
from jbptt.estimator import Batch, GradientEstimator, make_estimator, register_estimator
from jbptt.unroll import bidirectional, with_step_keys

__version__ = "0.1.0"

__all__ = [
    "Batch", "BPTTState", "Cell", "GradientEstimator", "bidirectional", "bptt", "cells", "diagnostics",
    "estimator", "from_flax", "learned_initial_carry", "losses", "make_estimator", "reference_gradient",
    "register_estimator", "remat", "rtrl", "stack", "tbptt", "train", "trainable_mask", "unroll", "with_readout",
    "with_step_keys",
]
