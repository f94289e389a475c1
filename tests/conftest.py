"""Test settings: strict rank and dtype promotion, so that fnn never relies on implicit
broadcasting or mixed-dtype arithmetic; 8 simulated CPU devices, so that data-parallel code
(pmap, sharding) runs on any machine. Ordinary computations still run on the first device."""

import jax
import pytest

# before anything touches a backend: the device count is fixed when the backend starts
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def key():
    return jax.random.key(0)
