"""Shared fixtures for the test suite."""

import jax
import pytest


@pytest.fixture
def x64():
    """Runs the test with 64-bit floats enabled."""
    with jax.enable_x64(True):
        yield
