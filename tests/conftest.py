"""Test settings: strict rank and dtype promotion, so that fnn never relies on implicit
broadcasting or mixed-dtype arithmetic."""

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def key():
    return jax.random.key(0)
