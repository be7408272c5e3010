"""Test configuration: float64 everywhere (the references are float64), keys as fixtures, cheap compiles.

Compilation dominates these tests (small programs, many of them), so XLA's CPU backend is asked for its cheapest
code generation: the same HLO programs and buffer assignment (memory checks are unaffected), less optimised
machine code. Set ``JBPTT_TEST_FULL_OPT=1`` to test with the default compiler settings instead.
"""

import os

if not os.environ.get("JBPTT_TEST_FULL_OPT"):
    os.environ["XLA_FLAGS"] = " ".join([
        os.environ.get("XLA_FLAGS", ""),
        "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
        "--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1",
    ]).strip()

import jax  # noqa: E402  (after XLA_FLAGS: the CPU backend reads them when it starts)
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)


@pytest.fixture
def key():
    return jax.random.key(0)
