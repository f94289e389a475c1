"""Shared helpers of the reference tests: random inputs, jitted calls and random params."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr


def rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def f64(a):
    return np.asarray(a, np.float64)


@functools.lru_cache(maxsize=None)
def _jitted(layer, train):
    return jax.jit(lambda p, s, x, k: layer.apply(p, s, x, key=k, train=train))


def run(layer, params, x, state=None, *, key=None, train=False):
    """``layer.apply`` under ``jit`` (one compilation per layer); returns ``(y, state)``."""
    return _jitted(layer, train)(params, {} if state is None else state, x, key)


def make_params(layer, x, seed=100, scale=0.5):
    """Random numpy-drawn params with exactly the names and shapes ``layer.init`` creates (so
    that unit scales and zero biases cannot hide mistakes)."""
    spec, _ = jax.eval_shape(layer.init, jax.random.key(0), x)
    leaves, treedef = jax.tree.flatten(spec)
    return jax.tree.unflatten(treedef, [jnp.asarray(scale * rand(leaf.shape, seed + i))
                                        for i, leaf in enumerate(leaves)])


def walk(jaxpr):
    """Every equation of a jaxpr, sub-jaxprs (scan bodies, custom_jvp calls, pjit, ...)
    included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, ClosedJaxpr):
                    yield from walk(sub.jaxpr)
                elif isinstance(sub, Jaxpr):
                    yield from walk(sub)


def count_dots(jaxpr) -> int:
    """The number of ``dot_general`` equations in ``jaxpr`` and its sub-jaxprs."""
    return sum(eqn.primitive.name == "dot_general" for eqn in walk(jaxpr))
