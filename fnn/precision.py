"""Mixed precision for any model: parameters stored in one dtype, computed in another.

A :class:`Policy` names three dtypes; :func:`with_policy` wraps a model so that its parameters
stay stored in ``param_dtype`` (float32, where the optimizer updates them), its matmuls and
convolutions run in ``compute_dtype`` (bfloat16: half the memory traffic, the fast path of
accelerators) and its outputs come back in ``output_dtype`` (float32, for the loss)::

    model = with_policy(fnn.models.MLP([128], 10), Policy.parse("bfloat16"))
    params, state = model.init(key, x)           # float32 params
    logits, state = model.apply(params, state, x)  # computed in bfloat16, float32 logits

Numerically sensitive parts stay in float32 inside the layers whatever the compute dtype:
normalisation statistics (BatchNorm, LayerNorm, GroupNorm, RMSNorm), attention logits and
softmax, and the losses.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fnn.core import Layer, LayerError, as_spec, where


def _floating_dtype(field: str, value: Any) -> jnp.dtype:
    """``value`` as a floating ``jnp.dtype``, or an error naming the field."""
    try:
        if value is None:  # jnp.dtype(None) would silently mean the default float dtype
            raise TypeError("None is not a dtype")
        dtype = jnp.dtype(value)
    except TypeError as e:
        raise TypeError(f"Policy: {field} must be a floating dtype such as jnp.bfloat16 or "
                        f"'float32', got {value!r}") from e
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"Policy: {field} must be a floating dtype (float32, bfloat16, float16, "
                        f"float64), got {dtype.name}")
    return dtype


@dataclasses.dataclass(frozen=True)
class Policy:
    """The dtypes a model stores, computes and returns in.

    >>> Policy()
    Policy(param_dtype=float32, compute_dtype=bfloat16, output_dtype=float32)
    >>> str(Policy.parse("float16"))
    'Policy(float16)'
    """

    param_dtype: Any = jnp.float32  # storage of the parameters (and what the optimizer updates)
    compute_dtype: Any = jnp.bfloat16  # parameters and floating inputs are cast to it in apply
    output_dtype: Any = jnp.float32  # floating outputs are cast to it after apply

    def __post_init__(self):
        for field in ("param_dtype", "compute_dtype", "output_dtype"):
            # normalised to jnp.dtype, so that equal policies compare and hash equal
            object.__setattr__(self, field, _floating_dtype(field, getattr(self, field)))

    @classmethod
    def parse(cls, name: str) -> Policy:
        """The preset called ``name``, each with float32 parameters and outputs:

        - ``"bfloat16"``: compute in bfloat16 (same range as float32, no loss scaling needed);
        - ``"float16"``: compute in float16 (small range: without loss scaling, gradients of
          small magnitude underflow to zero);
        - ``"float32"``: everything in float32 (the same results as the bare model).
        """
        if name not in _PRESETS:
            raise ValueError(f"unknown precision policy {name!r}; expected one of "
                             f"{sorted(_PRESETS)}")
        return cls(compute_dtype=_PRESETS[name])

    def __str__(self) -> str:
        if self.param_dtype == jnp.float32 and self.output_dtype == jnp.float32:
            return f"Policy({self.compute_dtype.name})"
        return (f"Policy(param={self.param_dtype.name}, compute={self.compute_dtype.name}, "
                f"output={self.output_dtype.name})")

    def __repr__(self) -> str:
        return (f"Policy(param_dtype={self.param_dtype.name}, "
                f"compute_dtype={self.compute_dtype.name}, "
                f"output_dtype={self.output_dtype.name})")


_PRESETS = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


def _is_floating(leaf: Any) -> bool:
    # Python scalars carry no dtype of their own and are left alone
    return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)


def _cast_floating(tree: Any, dtype: Any) -> Any:
    """``tree`` with every floating array (or ``ShapeDtypeStruct``) cast to ``dtype``; integer,
    boolean and key leaves unchanged."""
    def cast(leaf):
        if not _is_floating(leaf):
            return leaf
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(leaf.shape, dtype)
        return leaf.astype(dtype)
    return jax.tree.map(cast, tree)


def with_policy(model: Layer, policy: Policy) -> Layer:
    """``model`` run under ``policy``: ``x: [...] -> model(x)``, shapes as ``model``'s.

    - ``init`` calls ``model.init`` on the input spec with its floating entries in
      ``compute_dtype`` (what ``apply`` will see) and stores the floating params in
      ``param_dtype`` (a no-op for fnn's layers, whose params are float32 by default). The
      state is kept as the model makes it.
    - ``apply`` casts the floating params and the floating entries of ``x`` to
      ``compute_dtype`` (integer inputs, such as token ids, and masks are untouched), runs the
      model, and casts the floating outputs to ``output_dtype``. The state goes in as stored and
      the new state is cast back to the stored dtypes, so running statistics stay float32.
    - The casts are differentiated like any op: gradients with respect to the stored params
      come back in ``param_dtype``.

    The params and state trees, and the paths in error messages, are the model's own.

    >>> import jax, jax.numpy as jnp, fnn
    >>> model = with_policy(fnn.Dense(3), Policy.parse("bfloat16"))
    >>> params, state = model.init(jax.random.key(0), jnp.zeros((2, 5)))
    >>> jax.tree.map(lambda p: (p.shape, p.dtype.name), params)
    {'b': ((3,), 'float32'), 'w': ((5, 3), 'float32')}
    >>> y, _ = model.apply(params, state, jnp.ones((2, 5)))
    >>> y.shape, y.dtype.name, model.name
    ((2, 3), 'float32', 'Policy(bfloat16)')
    """
    if not isinstance(model, Layer):
        raise TypeError(f"with_policy: model must be a Layer (built by a factory such as "
                        f"Dense(10)), got {type(model).__name__}")
    if not isinstance(policy, Policy):
        raise TypeError(f"with_policy: policy must be a Policy (e.g. Policy.parse('bfloat16')), "
                        f"got {policy!r}")
    name = str(policy)

    def init(key, x):
        params, state = model.init(key, _cast_floating(as_spec(x), policy.compute_dtype))
        return _cast_floating(params, policy.param_dtype), state

    def apply(params, state, x, *, key=None, train=False):
        y, new_state = model.apply(_cast_floating(params, policy.compute_dtype), state,
                                   _cast_floating(x, policy.compute_dtype), key=key, train=train)
        if jax.tree.structure(new_state) != jax.tree.structure(state):
            raise LayerError(f"{where(name)}: {model.name} returned state of a different "
                             f"structure than it was given ({jax.tree.structure(state)} in, "
                             f"{jax.tree.structure(new_state)} out)")
        new_state = jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, state)
        return _cast_floating(y, policy.output_dtype), new_state

    return Layer(init, apply, name)
