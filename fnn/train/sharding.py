"""Where each array of a train state lives on a device mesh: the layouts of the ``"fsdp"`` and
``"tensor"`` modes of :func:`fnn.train.data_parallel`.

A layout gives every leaf of the train state a ``PartitionSpec`` over the mesh's axes:

- **fsdp** (fully sharded data parallel): each parameter, its optimizer state (Adam's two
  moments) and its gradient are split along their largest axis that divides by the size of the
  ``"data"`` axis; arrays of fewer than ``min_size`` elements (biases, norm scales, counters)
  stay replicated, where splitting would cost more in communication than it saves. The batch is
  split over ``"data"`` too. Each device holds about ``1 / devices`` of the state; XLA gathers a
  weight where a layer needs it whole and reduces gradients to their shards.
- **tensor** (Megatron-style, on a 2-D mesh ``{data: D, model: M}``): the rules of
  :data:`TENSOR_RULES` split the attention heads (query/key/value by columns, the output
  projection by rows), the feed-forward (``up``/``gate`` by columns, ``down`` by rows), the
  embedding over the vocabulary and the head over its outputs along ``"model"``; everything
  else is replicated, and the batch is split over ``"data"``.

Rules map parameter path patterns (``"**/attention/query/w"``, the patterns of
:mod:`fnn.train.groups`) to a spec of the array's *trailing* axes, so one rule serves a layer
and its stacked copy under :func:`fnn.repeat` (an extra leading axis, left unsplit)::

    rules = {"**/attention/query/w": (None, "model", None),   # [features, heads, head_dim]
             "**/my_layer/w": ("model", None)}

A rule is matched against the parameter's path inside ``params`` (``blocks/0/ffn/up/w``); the
optimizer state and the model state at the same path, of the same shape, follow it. The first
matching rule wins. Rules given by the user come before the built-in ones, must each match some
parameter, and must divide the axes they split (an error names the path, the shape and the
mesh); a built-in rule whose split does not divide an array (a 10-class head on 4 devices)
leaves it replicated.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fnn.train.groups import leaf_path, matches

DATA_AXIS = "data"  # the batch's axis; fsdp's too
MODEL_AXIS = "model"  # the tensor-parallel axis of TENSOR_RULES
MIN_SHARD_SIZE = 1024  # fsdp leaves arrays of fewer elements replicated

Rules = Mapping[str, Sequence[Any]] | Sequence[tuple[str, Sequence[Any]]]

# Megatron-style tensor parallelism for fnn's parameter names: column-split projections into
# the heads and the hidden units, row-split projections out of them (one all-reduce each), the
# vocabulary split in the embedding and the head.
TENSOR_RULES: tuple[tuple[str, tuple], ...] = (
    ("**/attention/query/w", (None, MODEL_AXIS, None)),  # [features, heads, head_dim]
    ("**/attention/key/w", (None, MODEL_AXIS, None)),
    ("**/attention/value/w", (None, MODEL_AXIS, None)),
    ("**/attention/query/b", (MODEL_AXIS, None)),  # [heads, head_dim]
    ("**/attention/key/b", (MODEL_AXIS, None)),
    ("**/attention/value/b", (MODEL_AXIS, None)),
    ("**/attention/out/w", (MODEL_AXIS, None, None)),  # [heads, head_dim, features]
    ("**/ffn/up/w", (None, MODEL_AXIS)),  # [features, hidden]
    ("**/ffn/gate/w", (None, MODEL_AXIS)),
    ("**/ffn/up/b", (MODEL_AXIS,)),
    ("**/ffn/gate/b", (MODEL_AXIS,)),
    ("**/ffn/down/w", (MODEL_AXIS, None)),  # [hidden, features]
    ("**/embed/table", (MODEL_AXIS, None)),  # [vocab, features]
    ("**/head/w", (None, MODEL_AXIS)),  # [features, vocab]
    ("**/head/b", (MODEL_AXIS,)),
)


def make_mesh(shape: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh of ``devices`` (default: every device of every process) with the axes of
    ``shape`` (``{"data": 2, "model": 4}``; default ``{"data": devices}``), Auto axes.

    Devices are ordered by process, then id, so that a process's devices are adjacent along
    the last axis (tensor parallel within a machine, data parallel across machines). The sizes
    must multiply to the number of devices.
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("make_mesh: expected at least one device, got none")
    shape = {DATA_AXIS: len(devices)} if shape is None else dict(shape)
    for name, size in shape.items():
        if not isinstance(name, str) or not isinstance(size, int) or isinstance(size, bool) \
                or size < 1:
            raise ValueError(f"make_mesh: expected axis names with positive int sizes, got "
                             f"{name!r}: {size!r}")
    if math.prod(shape.values()) != len(devices):
        raise ValueError(f"make_mesh: the mesh {shape} has {math.prod(shape.values())} "
                         f"devices, but there are {len(devices)}; give sizes that multiply to "
                         f"{len(devices)}")
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(ordered).reshape(tuple(shape.values())), tuple(shape),
                axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def auto_axes(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis Auto: the same devices and names. fnn's steps leave the
    placement of every intermediate to XLA's sharding propagation, which Explicit axes (the
    default of ``jax.make_mesh`` since jax 0.9) would instead ask of each operation."""
    return Mesh(mesh.devices, mesh.axis_names,
                axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))


def state_specs(tree: Any, mesh: Mesh, *, rules: Rules | None = None,
                builtin: Iterable[tuple[str, Sequence[Any]]] = (),
                fsdp_axis: str | None = None, min_size: int = MIN_SHARD_SIZE) -> Any:
    """A ``PartitionSpec`` for every leaf of a train state ``tree`` (arrays or
    ``jax.ShapeDtypeStruct``), as a tree like it.

    Each leaf takes the spec of the first rule (``rules``, then ``builtin``) whose pattern
    matches its parameter's path (see the module docstring); a leaf no rule places is split
    along its largest axis that divides by the size of ``fsdp_axis`` when it has at least
    ``min_size`` elements, and replicated otherwise or without ``fsdp_axis``.
    """
    user = _check_rules(rules, mesh)
    if fsdp_axis is not None and fsdp_axis not in mesh.shape:
        raise ValueError(f"sharding: the mesh {dict(mesh.shape)} has no axis {fsdp_axis!r}")
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [leaf_path(key_path) for key_path, _ in flat]
    params = {path.removeprefix("params/"): np.shape(leaf) for path, (_, leaf)
              in zip(paths, flat) if path.startswith("params/")}
    if not params:  # a bare param tree rather than a train state
        params = {path: np.shape(leaf) for path, (_, leaf) in zip(paths, flat)}
    for pattern, _ in user:
        if not any(matches(pattern, path) for path in params):
            raise ValueError(f"sharding: the rule {pattern!r} matches no parameter; the "
                             f"parameters are {', '.join(sorted(params)[:12])}"
                             + (" ..." if len(params) > 12 else ""))
    specs = []
    for path, (_, leaf) in zip(paths, flat):
        shape = np.shape(leaf)
        param = _param_of(path, shape, params)
        spec = None
        if param is not None:
            spec = _first_rule(user, param, shape, mesh, strict=True)
            if spec is None:
                spec = _first_rule(builtin, param, shape, mesh, strict=False)
        if spec is None:
            spec = _fsdp_spec(shape, mesh, fsdp_axis, min_size)
        specs.append(spec)
    return jax.tree_util.tree_unflatten(treedef, specs)


def shardings(specs: Any, mesh: Mesh) -> Any:
    """``NamedSharding(mesh, spec)`` for every ``PartitionSpec`` of the tree ``specs``."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                        is_leaf=lambda s: isinstance(s, P))


def place(tree: Any, placement: Any) -> Any:
    """``tree``'s arrays on the shardings of the tree ``placement``, with several processes too:
    each process gives the whole value of every leaf and keeps the shards on its own devices.
    An array already placed so is returned as it is."""
    if jax.process_count() == 1:
        return jax.device_put(tree, placement)

    def put(a, sharding):
        if isinstance(a, jax.Array) and a.sharding == sharding:
            return a
        index = sharding.addressable_devices_indices_map(np.shape(a))
        return jax.make_array_from_single_device_arrays(
            np.shape(a), sharding, [jax.device_put(a[i], d) for d, i in index.items()])

    return jax.tree.map(put, tree, placement)


def bytes_per_device(tree: Any) -> dict[jax.Device, int]:
    """The bytes of ``tree``'s arrays held on each of this process's devices (the sum of the
    arrays' addressable shards there): what a layout costs in device memory."""
    held: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


def spans_processes(tree: Any) -> bool:
    """Whether some array of ``tree`` has shards on another process's devices."""
    return any(isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
               for leaf in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- rules

def _check_rules(rules: Rules | None, mesh: Mesh) -> list[tuple[str, P]]:
    """The user's rules as ``(pattern, spec)`` pairs, each spec's axes checked against the
    mesh."""
    if rules is None:
        return []
    pairs = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    checked = []
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                and isinstance(pair[0], str)):
            raise ValueError(f"sharding: a rule is a pattern and a spec, "
                             f"('**/ffn/up/w', (None, 'model')), got {pair!r}")
        pattern, spec = pair
        entries = tuple(spec) if isinstance(spec, (tuple, list, P)) else None
        if entries is None:
            raise ValueError(f"sharding: the spec of rule {pattern!r} must be a list of mesh "
                             f"axis names or None per trailing array axis, got {spec!r}")
        for entry in entries:
            names = entry if isinstance(entry, (tuple, list)) else (entry,)
            for name in names:
                if name is not None and name not in mesh.shape:
                    raise ValueError(f"sharding: the rule {pattern!r} names the axis {name!r}, "
                                     f"but the mesh has the axes {dict(mesh.shape)}")
        checked.append((pattern, P(*entries)))
    return checked


def _param_of(path: str, shape: tuple, params: Mapping[str, tuple]) -> str | None:
    """The parameter path a train-state leaf belongs to: itself under ``params``, or the
    longest trailing part of its path that names a parameter of the same shape (the
    optimizer's moments, a model state or an average of the weights kept alongside)."""
    if path.startswith("params/") and path.removeprefix("params/") in params:
        return path.removeprefix("params/")
    parts = path.split("/")
    for start in range(len(parts)):
        candidate = "/".join(parts[start:])
        if params.get(candidate) == shape:
            return candidate
    return None


def _first_rule(rules, param: str, shape: tuple, mesh: Mesh, strict: bool) -> P | None:
    """The spec of the first rule matching ``param``, aligned to the array's trailing axes;
    ``None`` when none matches, or (``strict=False``) when its split does not divide."""
    for pattern, spec in rules:
        if not matches(pattern, param):
            continue
        entries = tuple(spec)
        if len(entries) > len(shape):
            if not strict:
                return None
            raise ValueError(f"sharding: the rule {pattern!r} gives {len(entries)} axes "
                             f"{P(*entries)}, but {param} has shape {tuple(shape)}")
        full = (None,) * (len(shape) - len(entries)) + entries
        for axis, (size, entry) in enumerate(zip(shape, full)):
            split = _axis_size(mesh, entry)
            if size % split:
                if not strict:
                    return None
                raise ValueError(f"sharding: the rule {pattern!r} splits axis {axis} of {param} "
                                 f"(shape {tuple(shape)}, size {size}) over {entry!r}, "
                                 f"{split} devices of the mesh {dict(mesh.shape)}, which does "
                                 f"not divide it; give that axis None (replicated) or a mesh "
                                 f"axis that divides {size}")
        return P(*full)
    return None


def _axis_size(mesh: Mesh, entry) -> int:
    names = entry if isinstance(entry, (tuple, list)) else (entry,)
    return math.prod(mesh.shape[name] for name in names if name is not None)


def _fsdp_spec(shape: tuple, mesh: Mesh, axis: str | None, min_size: int) -> P:
    """Split along the largest axis that divides by ``axis``'s size (the first of equals), or
    replicate: no axis, a small array, or no axis that divides."""
    if axis is None or mesh.shape[axis] == 1 or math.prod(shape) < min_size:
        return P()
    size = mesh.shape[axis]
    candidates = [i for i, n in enumerate(shape) if n % size == 0]
    if not candidates:
        return P()
    best = max(candidates, key=lambda i: (shape[i], -i))
    return P(*(axis if i == best else None for i in range(len(shape))))
