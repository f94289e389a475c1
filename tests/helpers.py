"""Helpers shared by the tests: random inputs, jitted calls, random params with the names and
shapes a layer's ``init`` makes, padding arithmetic for references, and jaxpr walks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr


def rand(shape, seed=0, low=None):
    """Standard-normal float32 data (or uniform in [low, low + 1) when ``low`` is given)."""
    rng = np.random.default_rng(seed)
    if low is not None:
        return (rng.random(shape) + low).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def f32(a):
    return jnp.asarray(np.asarray(a, np.float32))


def f64(a):
    return np.asarray(a, np.float64)


def as_tuple(v, n):
    return (v,) * n if isinstance(v, int) else tuple(v)


@functools.lru_cache(maxsize=None)
def _jitted(layer, train):
    return jax.jit(lambda p, s, x, k: layer.apply(p, s, x, key=k, train=train))


def run(layer, params, x, state=None, *, key=None, train=False):
    """``layer.apply`` under ``jit`` (one compilation per layer and input shape instead of one
    per operation, which keeps the suite fast on a small CPU); returns ``(y, state)``."""
    return _jitted(layer, train)(params, {} if state is None else state, x, key)


def make_params(layer, x, seed=100, scale=0.5):
    """Random numpy-drawn params with exactly the names and shapes ``layer.init`` creates (so
    that unit scales and zero biases cannot hide mistakes)."""
    spec, _ = jax.eval_shape(layer.init, jax.random.key(0), x)
    leaves, treedef = jax.tree.flatten(spec)
    return jax.tree.unflatten(treedef, [jnp.asarray(scale * rand(leaf.shape, seed + i))
                                        for i, leaf in enumerate(leaves)])


def init_apply(layer, x, params=None, **kwargs):
    """Applies ``layer`` to ``x`` with ``params`` (a flat dict of numpy arrays) in place of its
    initial ones; returns ``(y, params, state)``.

    ``init`` is only traced (``jax.eval_shape``): the given params must have exactly the names
    and shapes it would create. Without ``params``, every parameter is drawn from numpy. The
    state starts at zeros.
    """
    spec, state = jax.eval_shape(layer.init, jax.random.key(0), x)
    if params is None:
        params = {name: rand(leaf.shape, 100 + i) for i, (name, leaf) in enumerate(spec.items())}
    assert set(params) == set(spec), (set(params), set(spec))
    for name, value in params.items():
        assert spec[name].shape == np.shape(value), (name, spec[name].shape, np.shape(value))
    params = {name: f32(value) for name, value in params.items()}
    state = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), state)
    y, state = run(layer, params, x, state, **kwargs)
    return y, params, state


def explicit_pads(padding, spatial, window, strides):
    """``padding`` ("SAME", "VALID", int, pairs) as one (low, high) pair per spatial axis, with
    the XLA/TensorFlow convention for SAME (the odd extra pad goes to the high side)."""
    n = len(spatial)
    if padding == "VALID":
        return [(0, 0)] * n
    if padding == "SAME":
        pads = []
        for size, win, s in zip(spatial, window, strides):
            out = -(-size // s)
            total = max((out - 1) * s + win - size, 0)
            pads.append((total // 2, total - total // 2))
        return pads
    if isinstance(padding, int):
        return [(padding, padding)] * n
    return [tuple(p) for p in padding]


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


def kill_at_first_checkpoint(config, run, *args, timeout=120):
    """Starts ``fnn train CONFIG --output-dir RUN --no-progress ARGS`` and SIGKILLs it soon
    after its first checkpoint appears; returns the newest checkpoint's step left behind."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "fnn.app.cli", "train", str(config),
                             "--output-dir", str(run), "--no-progress", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not list((run / "checkpoints").glob("step_*")) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
    return max(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
