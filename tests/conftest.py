"""Test settings: strict rank and dtype promotion, so that fnn never relies on implicit
broadcasting or mixed-dtype arithmetic; 8 simulated CPU devices, so that data-parallel code
(pmap, sharding) runs on any machine (ordinary computations still run on the first device); and
a compilation cache on disk shared by the workers and every process the tests start (the CLI,
notebooks, benchmarks), so that a program compiled once is not compiled again.

The cache (``.jax-cache/`` in the repository, one entry per program; its keys include the JAX
version and the program, so entries are never reused for another) changes no result: XLA
compiles deterministically, and a cached executable is the one a compilation would give."""

import os
from pathlib import Path

# environment variables, read when JAX is imported here and in the processes tests start
for name, value in (("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).parents[1] / ".jax-cache")),
                    ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"),
                    ("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")):
    os.environ.setdefault(name, value)

import jax  # noqa: E402 - after the cache settings
import pytest  # noqa: E402

# before anything touches a backend: the device count is fixed when the backend starts
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def key():
    return jax.random.key(0)
