"""Test configuration: float64 everywhere (the references are float64), keys as fixtures."""

import jax
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture
def key():
    return jax.random.key(0)
