"""The train state: everything a training run carries from one step to the next."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fnn.core import Layer, Params, State, as_spec


class TrainState(NamedTuple):
    params: Params  # trainable parameters
    state: State  # non-trained model state (e.g. BatchNorm running statistics)
    opt_state: optax.OptState  # the optimizer's state
    step: jax.Array  # int32 scalar: steps taken so far, skipped ones included
    key: jax.Array  # base random key; step i uses fold_in(key, i), so no key is carried forward
    skipped: jax.Array  # int32 scalar: steps skipped so far because the loss or a gradient was
    #                     not finite (params, state and opt_state were left as they were)
    bad_streak: jax.Array  # int32 scalar: consecutive skipped steps ending at this step; a
    #                        finite step resets it to 0
    ema: Any = None  # an exponential moving average of params, for learners that keep one
    #                  (fnn.train.diffusion); None (no leaves) otherwise


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _compiled_init(init, treedef, spec_leaves, key):
    """``init(key, spec)`` as one compiled program instead of one small compilation per
    parameter initialiser. The init function and the input spec are static, so a second train
    state for the same model and input shapes reuses the compiled program."""
    return init(key, jax.tree.unflatten(treedef, spec_leaves))


def create_train_state(model: Layer, optimizer: optax.GradientTransformation, key: jax.Array,
                       x: Any, *, params: Params | None = None,
                       state: State | None = None) -> TrainState:
    """Initialises ``model`` for inputs shaped like ``x`` and ``optimizer`` for its params.

    ``params`` and ``state`` start from the given trees instead of ``model.init`` (pretrained
    weights, or a run's: :func:`fnn.app.load_run`), after checking them against what init
    makes (:func:`fnn.check_params`: every path, shape and dtype); they are copied, so the
    given arrays stay usable after a donating train step. ``step``, ``skipped`` and
    ``bad_streak`` start at 0.
    """
    init_key, train_key = jax.random.split(key)
    if params is None or state is None:
        leaves, treedef = jax.tree.flatten(as_spec(x))
        fresh_params, fresh_state = _compiled_init(model.init, treedef, tuple(leaves), init_key)
    if params is not None or state is not None:
        from fnn.inspection import check_params

        params = fresh_params if params is None else jax.tree.map(jnp.copy, params)
        state = fresh_state if state is None else jax.tree.map(jnp.copy, state)
        check_params(model, params, state, x)
    else:
        params, state = fresh_params, fresh_state
    # three separate buffers: a donating step must not see one buffer twice
    step, skipped, bad_streak = (jnp.zeros((), jnp.int32) for _ in range(3))
    # optax mixes dtypes (e.g. a float32 hyper-parameter with bfloat16 params), as in the step
    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(params)
    return TrainState(params, state, opt_state, step, train_key, skipped, bad_streak)
