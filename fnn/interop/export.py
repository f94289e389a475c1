"""Deployment with ``jax.export``: a model's forward pass as one StableHLO program in a file that
runs again with nothing but JAX, without fnn and without the model's code::

    exported = export_model(model, params, state, x, batch_size="b")   # any batch size
    save_exported("digits_cnn.jaxexport", exported)
    predict = load_exported("digits_cnn.jaxexport")
    logits = predict(x)                      # model.apply(params, state, x)[0]

Elsewhere, with JAX alone::

    from jax import export
    with open("digits_cnn.jaxexport", "rb") as f:
        exported = export.deserialize(bytearray(f.read()))
    logits = exported.call(x)

What is exported is ``inputs -> model.apply(params, state, x, train=train)[0]``, eval mode by
default; the new state is dropped. The file is exactly ``Exported.serialize()``, nothing added.

Weights, two ways (``weights=``):

- ``"embedded"`` (default): params and state are constants of the program; one self-contained
  file about the size of the weights (flatbuffers caps a file at 2 GiB).
- ``"argument"``: the program takes ``(weights, *inputs)``, ``weights`` being the flat dict
  :func:`exported_weights` gives (``{"params/conv1/w": ..., "state/...": ...}``), which is what
  ``fnn.interop.save_safetensors(path, exported_weights(params, state))`` writes and
  ``read_safetensors`` (or ``safetensors.numpy.load_file``) reads back. The weights live in their
  own file, a fine-tuned model needs no new export, and the program stays small.

Files: JAX reads a file written by a JAX release up to about six months older (its
compatibility window); an older JAX reads a newer file only within weeks. Reading and writing
need the ``flatbuffers`` package. A file runs the program it holds (any custom call jaxlib
registers, no Python): load only files you trust. Nothing checks the weights' bytes: a flipped
bit in an embedded constant gives other outputs, silently.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Sequence

import jax
from jax import export as jax_export

from fnn.core import Layer, MissingKeyError, Seq, as_spec, describe
from fnn.interop.weights import flatten, unflatten, write_atomically

__all__ = ["ExportError", "ExportedFunction", "export_model", "exported_weights",
           "save_exported", "load_exported"]

WEIGHTS = ("embedded", "argument")


class ExportError(ValueError):
    """A model that cannot be exported as asked, a file that is not an exported program, or a
    call whose inputs do not fit the program."""


# ----------------------------------------------------------------------------- exporting


def exported_weights(params: Any, state: Any) -> dict[str, Any]:
    """The ``weights`` argument of a program exported with ``weights="argument"``: the leaves of
    ``{"params": params, "state": state}`` as ``{"params/conv1/w": array, ...}`` host arrays."""
    return flatten({"params": params, "state": state})


def export_model(model: Layer, params: Any, state: Any, *inputs: Any, train: bool = False,
                 batch_size: int | str | None = None, platforms: str | Sequence[str] | None = None,
                 weights: str = "embedded") -> jax_export.Exported:
    """``model``'s forward pass with these ``params`` and ``state``, exported for ``inputs``.

    ``inputs``: arrays or ``jax.ShapeDtypeStruct``\\ s (only shape and dtype are read), e.g.
    ``x: float32[batch, 8, 8, 1]`` or token ids ``int32[batch, time]``; one input is the model's
    ``x``, several are given to it as the tuple ``x = (a, b, ...)``. A ``Seq`` is not taken.
    ``batch_size``: ``None`` keeps the inputs' shapes; an int sets axis 0 of every input; a name
    (``"b"``) makes axis 0 a symbolic size, and the program takes any batch (for other symbolic
    axes, give specs built with ``jax.export.symbolic_shape`` yourself).
    ``platforms``: where the program may run, e.g. ``("cpu", "cuda")`` (default: this machine's
    backend); lowering needs no such device. ``weights``: ``"embedded"`` or ``"argument"`` (see
    the module docstring). ``train=True`` exports the training-mode forward (BatchNorm's batch
    statistics); a model with dropout cannot, an exported program takes no random key.

    Returns the ``jax.export.Exported``: ``.call(*inputs)`` runs it, ``.in_avals`` and
    ``.out_avals`` are its signature.

    >>> import jax, jax.numpy as jnp
    >>> from fnn.layers import Dense
    >>> model = Dense(3)
    >>> params, state = model.init(jax.random.key(0), jnp.zeros((1, 4)))
    >>> exported = export_model(model, params, state, jnp.zeros((1, 4)), batch_size="b")
    >>> exported.in_avals, exported.out_avals
    ((ShapedArray(float32[b,4]),), (ShapedArray(float32[b,3]),))
    >>> exported.call(jnp.ones((5, 4))).shape
    (5, 3)
    """
    _check_options(model, train, weights)
    if not inputs:
        raise TypeError("export_model: expected at least one input (an array or a "
                        "jax.ShapeDtypeStruct of the model's x), got none")
    specs = _with_batch([_input_spec(i, x) for i, x in enumerate(inputs)], batch_size)
    if weights == "embedded":
        def forward(*xs):
            return model.apply(params, state, _model_input(xs), train=train)[0]
        args = specs
    else:
        def forward(flat, *xs):
            tree = unflatten(flat)
            return model.apply(tree.get("params", {}), tree.get("state", {}), _model_input(xs),
                               train=train)[0]
        args = [as_spec(exported_weights(params, state)), *specs]
    forward.__name__ = forward.__qualname__ = model.name  # the name jax's errors show
    try:
        return jax_export.export(jax.jit(forward), platforms=_platforms(platforms))(*args)
    except MissingKeyError as e:
        stochastic = str(e).split(";")[0]  # "Dropout at drop is stochastic and needs a key ..."
        raise ExportError(f"export_model: train=True: {stochastic}, and an exported program "
                          f"takes no key: export with train=False") from None


def _check_options(model: Any, train: Any, weights: Any) -> None:
    if not isinstance(model, Layer):
        raise TypeError(f"export_model: expected a Layer (built by a factory such as LeNet()), "
                        f"got {type(model).__name__}")
    if not isinstance(train, bool):
        raise TypeError(f"export_model: train must be a Python bool, got {type(train).__name__}")
    if weights not in WEIGHTS:
        raise ValueError(f"export_model: weights must be one of {', '.join(WEIGHTS)}, "
                         f"got {weights!r}")


def _input_spec(index: int, x: Any) -> jax.ShapeDtypeStruct:
    if isinstance(x, Seq):
        raise TypeError(f"export_model: input {index} is a {describe(x)}: an exported program "
                        f"takes plain arrays, not a Seq")
    if isinstance(x, jax.ShapeDtypeStruct):
        return x  # as given: its axes may be symbolic
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"export_model: input {index} must be an array or a "
                        f"jax.ShapeDtypeStruct, got {type(x).__name__}")
    return as_spec(x)


def _with_batch(specs: list[jax.ShapeDtypeStruct], batch_size: Any) -> list[Any]:
    """``specs`` with axis 0 set to ``batch_size`` (an int, or a name of a symbolic size)."""
    if batch_size is None:
        return specs
    if isinstance(batch_size, str):
        dims = jax_export.symbolic_shape(batch_size)  # jax's own error for a malformed name
        if len(dims) != 1 or not jax_export.is_symbolic_dim(dims[0]):
            raise ValueError(f"export_model: batch_size must name one symbolic size such as "
                             f"'b', got {batch_size!r}")
        size = dims[0]  # one size shared by every input: they come from one symbolic scope
    elif isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size > 0:
        size = batch_size
    else:
        raise ValueError(f"export_model: batch_size must be None, a positive int or the name "
                         f"of a symbolic size ('b'), got {batch_size!r}")
    for i, spec in enumerate(specs):
        if not spec.shape:
            raise ExportError(f"export_model: batch_size needs a batch axis 0 on every input, "
                              f"input {i} is {describe(spec)}")
    return [jax.ShapeDtypeStruct((size, *spec.shape[1:]), spec.dtype) for spec in specs]


def _platforms(platforms: Any) -> tuple[str, ...] | None:
    if platforms is None:
        return None
    names = (platforms,) if isinstance(platforms, str) else tuple(platforms)
    if not names or not all(isinstance(p, str) for p in names) or len(set(names)) < len(names):
        raise ValueError(f"export_model: platforms must be distinct names such as ('cpu', "
                         f"'cuda'), got {platforms!r}")
    if "gpu" in names:  # jax.devices() says "gpu"; an export names the runtime
        raise ValueError("export_model: platforms: 'gpu' is not a platform of jax.export, "
                         "say 'cuda' (NVIDIA) or 'rocm' (AMD)")
    return names


def _model_input(xs: tuple[Any, ...]) -> Any:
    return xs[0] if len(xs) == 1 else xs


# ----------------------------------------------------------------------------- files


def save_exported(path: str | os.PathLike, exported: jax_export.Exported, *,
                  overwrite: bool = False) -> pathlib.Path:
    """Writes ``exported.serialize()`` to ``path`` through a temporary file moved into place (a
    failed write leaves no file and an existing one untouched); an existing ``path`` is
    replaced only with ``overwrite=True``. Returns the path."""
    if not isinstance(exported, jax_export.Exported):
        raise TypeError(f"save_exported: expected a jax.export.Exported (from export_model), "
                        f"got {type(exported).__name__}")
    path = pathlib.Path(path)
    data = exported.serialize()
    write_atomically(path, lambda f: f.write(data), overwrite)
    return path


def load_exported(path: str | os.PathLike) -> ExportedFunction:
    """The program saved in ``path`` (by :func:`save_exported`, or any
    ``Exported.serialize()``), as a function of the inputs it was exported for.

    >>> import pathlib, tempfile, jax.numpy as jnp
    >>> spec = jax.ShapeDtypeStruct((2,), jnp.float32)
    >>> double = jax.export.export(jax.jit(lambda x: 2 * x))(spec)
    >>> path = save_exported(pathlib.Path(tempfile.mkdtemp()) / "double.jaxexport", double)
    >>> load_exported(path)(jnp.ones(2))
    Array([2., 2.], dtype=float32)
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file" if path.exists() else
                                f"{path}: no such file")
    data = path.read_bytes()
    try:
        exported = jax_export.deserialize(bytearray(data))
    except ImportError:  # jax's own advice: install flatbuffers
        raise
    except Exception as e:  # the reader fails on foreign bytes in many ways (struct, type, ...)
        raise ExportError(f"{path}: not a jax.export file ({len(data)} bytes; written by "
                          f"save_exported or Exported.serialize): {_one_line(e)}") from None
    try:
        exported.mlir_module()  # the program itself, parsed now rather than at the first call
    except jax.errors.JaxRuntimeError as e:
        raise ExportError(f"{path}: its program does not read in jax {jax.__version__} (a file "
                          f"of a newer JAX, or a damaged one): {_one_line(e)}") from None
    return ExportedFunction(exported, str(path))


class ExportedFunction:
    """An exported program, called like the model's forward: ``predict(x)`` (``predict(weights,
    x)`` for one exported with ``weights="argument"``). ``exported`` is its
    ``jax.export.Exported``. Compiled once per input shape (``jax.jit``)."""

    def __init__(self, exported: jax_export.Exported, source: str = "exported program"):
        self.exported = exported
        self.source = source
        self._call = jax.jit(exported.call)
        self._platform = jax_export.default_export_platform()

    def __call__(self, *args: Any) -> Any:
        if self._platform not in self.exported.platforms:
            raise ExportError(f"{self.source}: the program was exported for "
                              f"{', '.join(self.exported.platforms)}, not for this machine's "
                              f"{self._platform}: export it with platforms=(..., "
                              f"{self._platform!r})")
        try:
            return self._call(*args)
        except ValueError as e:  # jax's checks of the arguments against the signature
            raise ExportError(f"{self.source}: expected inputs ({self.signature()[0]}), got "
                              f"({_describe_args(args)}): {_one_line(e)}") from None

    def signature(self) -> tuple[str, str]:
        """``("float32[b, 8, 8, 1]", "float32[b, 10]")``: the inputs and outputs, described."""
        args, _ = jax.tree.unflatten(self.exported.in_tree, self.exported.in_avals)
        outputs = jax.tree.unflatten(self.exported.out_tree, self.exported.out_avals)
        return _describe_args(args), _describe_args(
            outputs if isinstance(outputs, tuple) else (outputs,))

    def __repr__(self) -> str:
        inputs, outputs = self.signature()
        return (f"ExportedFunction({self.exported.fun_name}: ({inputs}) -> ({outputs}) on "
                f"{', '.join(self.exported.platforms)}, from {self.source})")


def _describe_args(args: Sequence[Any]) -> str:
    """Arrays as ``float32[2, 8]``, containers (the weights) as ``dict of 8 arrays``."""
    return ", ".join(describe(a) if hasattr(a, "shape")
                     else f"{type(a).__name__} of {len(jax.tree.leaves(a))} arrays" for a in args)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
