"""Training on several devices: one train step over a batch split across devices, with the
model itself split across them too when it does not fit one.

Six modes, one interface (:class:`DataParallel`)::

    runner = data_parallel(model, optimizer, loss, mode="fsdp")
    ts = runner.initial_state(learner_init, key, x)   # or runner.put_state(ts) of a given state
    for x, y in batches:
        ts, metrics = runner.step(ts, *runner.put_batch(x, y))
    ts = runner.get_state(ts)  # arrays that outlive further steps: evaluate, checkpoint

Data parallel, the whole train state on every device:

- ``"none"``: the plain jitted step (as :func:`fnn.train.make_train_step`) on one device.
- ``"pmap"``: ``jax.pmap`` over the devices; the train state is replicated with a leading
  device axis, the batch ``[B, ...]`` is split as ``[devices, B / devices, ...]``, and the step
  averages gradients, metrics and model state over the axis :data:`DATA_AXIS`. BatchNorm
  layers normalise with the whole batch's statistics: the step binds :data:`DATA_AXIS` as the
  batch axis (:func:`fnn.core.batch_axis`), which a BatchNorm without an ``axis_name`` of its
  own averages over.
- ``"shard_map"``: pmap's per-device program (the same ``axis_name``, the same BatchNorm and
  dropout behaviour, the same results) as ``jax.jit`` of ``jax.shard_map`` over a one-axis
  mesh, without pmap's stacked leading axis: the train state is one replicated array per leaf,
  the batch is split along its first axis. ``jax.pmap`` has been in maintenance mode since jax
  0.8; this is its successor, and works with several processes.
- ``"sharded"``: ``jax.jit`` over a one-axis :func:`data_mesh`; the train state is replicated
  (``P()``), the batch is split along its first axis (``P("data")``) and XLA inserts the
  cross-device reductions itself. Every layer sees the global batch, so a plain ``BatchNorm()``
  uses the whole batch's statistics and dropout draws the same mask as on one device.

The model split across devices (``jax.jit`` over a mesh, each leaf of the train state on the
``PartitionSpec`` of :mod:`fnn.train.sharding`; XLA inserts the gathers and reductions):

- ``"fsdp"``: params, optimizer state and gradients split over the ``"data"`` axis, each leaf
  along its largest divisible axis (or by ``rules``), the batch too: each of ``N`` devices holds
  about ``1 / N`` of the train state.
- ``"tensor"``: Megatron-style tensor parallel on a 2-D mesh (default ``{data: processes,
  model: local devices}``): attention heads and the feed-forward split over ``"model"`` by the
  rules of :data:`~fnn.train.sharding.TENSOR_RULES` (and the user's ``rules`` before them), the
  batch over ``"data"``.

Like ``"sharded"``, these modes see the global batch, so BatchNorm and dropout behave as on one
device. Their :meth:`DataParallel.initial_state` creates the train state already split: no
device ever holds the whole of it.

With several processes (``jax.process_count() > 1``, see :mod:`fnn.train.distributed`) use
``"sharded"``, ``"shard_map"``, ``"fsdp"`` or ``"tensor"``: the mesh spans every process's
devices, and each process passes :meth:`DataParallel.put_batch` only its own rows of the global
batch, process ``i`` rows ``[i * B / P, (i + 1) * B / P)``, so that the global batch is the one
a single process would see. ``"pmap"`` and ``"none"`` are single-process modes.

Every mode computes the step of :func:`fnn.train.train_step_fn` on the whole batch: for the
same global batch the parameters agree with a one-device run up to float rounding.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fnn.core import Layer
from fnn.train.learner import Learner, supervised
from fnn.train.sharding import (DATA_AXIS, MODEL_AXIS, TENSOR_RULES, Rules, auto_axes,
                                make_mesh, place, shardings, state_specs)
from fnn.train.state import TrainState
from fnn.train.step import DonatingStep, Loss, Metric, Mix

MODES = ("none", "pmap", "sharded", "shard_map", "fsdp", "tensor")


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh ``("data",)`` over ``devices`` (default: every device of every process).

    Devices are ordered by process, then id, so that the rows each process feeds sit together
    in process order in the global batch.
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("data_mesh: expected at least one device, got none")
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(ordered), (DATA_AXIS,))


def replicate(tree: Any, devices: Sequence[jax.Device]) -> Any:
    """pmap's layout of a replicated pytree: every leaf ``[...]`` becomes ``[devices, ...]``, one
    copy on each device (sharded along axis 0 over :func:`data_mesh` of ``devices``)."""
    sharding = NamedSharding(data_mesh(devices), P(DATA_AXIS))
    local = sharding.addressable_devices_indices_map((len(devices),))

    def put(a):
        copies = [jax.device_put(a[None], d) for d in local]
        return jax.make_array_from_single_device_arrays((len(devices),) + a.shape, sharding,
                                                        copies)

    return jax.tree.map(put, tree)


def shard_batch(tree: Any, devices: Sequence[jax.Device]) -> Any:
    """pmap's layout of a batch: every leaf ``[B, ...]`` (this process's rows) becomes
    ``[devices, B / devices, ...]``, row block ``i`` on device ``i``. ``B`` must divide by the
    number of this process's devices."""
    mesh = data_mesh(devices)
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    n = len(sharding.addressable_devices)
    _check_divisible(tree, n, "pmap")
    return jax.tree.map(
        lambda a: _put_rows(a.reshape((n, a.shape[0] // n) + a.shape[1:]), sharding), tree)


def unreplicate(tree: Any) -> Any:
    """The first replica of a pmap-replicated pytree: leaves ``[devices, ...] -> [...]``, new
    single-device arrays (safe to keep after the replicated tree is donated)."""
    return jax.tree.map(lambda a: a.addressable_shards[0].data[0], tree)


class DataParallel:
    """A data-parallel train step and the placement of its inputs; built by
    :func:`data_parallel`.

    - ``mode``: one of :data:`MODES`; ``devices``: the devices used, in mesh order;
      ``num_devices``: their number; ``mesh``: the mesh of the modes that have one (else
      ``None``).
    - ``initial_state(init, key, x)``: the train state ``init(key, x)`` as ``step`` wants it.
      ``"fsdp"`` and ``"tensor"`` create it under ``jit`` directly on its shards (no device
      holds the whole state); the other modes return ``init(key, x)`` itself, to be placed with
      ``put_state``.
    - ``put_state(ts)``: the train state placed for ``step`` (replicated, or split by the
      mode's layout). With ``"none"`` it may be ``ts``'s own arrays, which a donating ``step``
      then consumes.
    - ``put_batch(x, y)``: this process's rows ``x: [B, ...]``, ``y: [B, ...]`` (numpy arrays or
      pytrees of them) placed for ``step``; ``B`` must divide by the number of this process's
      devices (by its share of the ``"data"`` axis in the mesh modes).
    - ``step(ts, x, y) -> (ts, metrics)``: one train step; with ``donate`` the train state
      passed in is consumed. ``metrics`` maps names to scalar arrays; ``float()`` reads them.
    - ``get_state(ts)``: the train state as new arrays that stay valid after further (donating)
      steps, for an eval step, ``np.asarray`` or a checkpoint: single-device arrays on this
      process's first device, except in ``"fsdp"`` and ``"tensor"``, where they keep their
      layout (``jax.jit`` evaluates on them as they are; a checkpoint gathers one array at a
      time).
    """

    def __init__(self, mode: str, devices: list, step: Callable,
                 put_state: Callable[[TrainState], TrainState],
                 put_rows: Callable[[Any], Any],
                 get_state: Callable[[TrainState], TrainState], *,
                 mesh: Mesh | None = None,
                 initial_state: Callable[[Callable, jax.Array, Any], TrainState] | None = None):
        self.mode = mode
        self.devices = devices
        self.num_devices = len(devices)
        self.mesh = mesh
        self.step = step  # the compiled function (or a DonatingStep around it: one call frame)
        self.put_state = put_state
        self._put_rows = put_rows
        self.get_state = get_state
        self._initial_state = initial_state

    def initial_state(self, init: Callable[[jax.Array, Any], TrainState], key: jax.Array,
                      x: Any) -> TrainState:
        """``init(key, x)`` (``x``: inputs or their ``jax.ShapeDtypeStruct``); see the class
        docstring."""
        if self._initial_state is None:
            return init(key, x)
        return self._initial_state(init, key, x)

    def put_batch(self, x: Any, y: Any) -> tuple[Any, Any]:
        """``(x, y)`` placed for :attr:`step`; see the class docstring."""
        return self._put_rows((x, y))

    def __repr__(self) -> str:
        shape = "" if self.mesh is None else f", mesh={dict(self.mesh.shape)}"
        return f"DataParallel(mode={self.mode!r}, num_devices={self.num_devices}{shape})"


def data_parallel(model: Layer | Learner, optimizer: optax.GradientTransformation | None = None,
                  loss: Loss | None = None, metrics: Mapping[str, Metric] | None = None, *,
                  mode: str = "none", devices: Sequence[jax.Device] | None = None,
                  mesh: Mesh | Mapping[str, int] | None = None, rules: Rules | None = None,
                  donate: bool = True, mix: Mix | None = None) -> DataParallel:
    """The train step of :func:`fnn.train.train_step_fn` run over ``devices`` in ``mode``; or,
    given a :class:`~fnn.train.Learner` alone (``data_parallel(fnn.train.gan(...),
    mode="pmap")``), the learner's step.

    ``mode``: ``"none"`` (one device: ``devices[0]``, default the first local device),
    ``"pmap"`` (default: every local device), ``"sharded"``, ``"shard_map"``, ``"fsdp"`` or
    ``"tensor"`` (default: every device of every process); see the module docstring for how
    each lays out the state and the batch. With ``donate`` each step reuses the buffers of the
    train state it is given; ``mix`` mixes each batch (see :func:`fnn.train.train_step_fn`).

    ``mesh`` (``"fsdp"``, ``"tensor"``): a ``jax.sharding.Mesh`` (Auto or Explicit axes; fnn
    runs it with Auto axes) or axis sizes ``{"data": 2, "model": 4}`` over ``devices``; it must
    have a ``"data"`` axis, and ``"tensor"``'s built-in rules use ``"model"``. ``rules``: the
    parameter patterns and specs of :mod:`fnn.train.sharding`, before the mode's own.

    Raises ``ValueError`` for an unknown mode, an empty device list, several devices with
    ``"none"``, ``"none"``/``"pmap"`` with several processes, a mesh that leaves out a process,
    ``mesh``/``rules`` where the mode has none, and rules that do not fit the state.
    """
    if isinstance(model, Learner):
        if optimizer is not None or loss is not None or metrics is not None or mix is not None:
            raise TypeError("data_parallel: a Learner brings its own optimizers, losses and "
                            "metrics; give it alone (data_parallel(learner, mode=...))")
        step_fn = model.train_step_fn
    else:
        if optimizer is None or loss is None:
            raise TypeError("data_parallel: expected a model with its optimizer and loss "
                            "(data_parallel(model, optimizer, loss)), or a Learner alone")
        step_fn = supervised(model, optimizer, loss, metrics, mix=mix).train_step_fn
    if mode not in MODES:
        raise ValueError(f"data_parallel: mode must be one of {MODES}, got {mode!r}")
    if mode in ("none", "pmap") and jax.process_count() > 1:
        raise ValueError(f"data_parallel: mode {mode!r} runs in one process, but there are "
                         f"{jax.process_count()} processes; use mode='sharded', 'shard_map', "
                         f"'fsdp' or 'tensor', whose mesh spans every process's devices")
    if devices is not None and not list(devices):
        raise ValueError(f"data_parallel: expected at least one device for mode {mode!r}, "
                         f"got none")
    if mode not in ("fsdp", "tensor") and (mesh is not None or rules is not None):
        raise ValueError(f"data_parallel: mode {mode!r} replicates the train state, so it "
                         f"takes no mesh or sharding rules; those are for mode 'fsdp' or "
                         f"'tensor'")
    if mode in ("fsdp", "tensor"):
        runner = _split_state(mode, step_fn, devices, donate, mesh, rules)
    else:
        build = {"none": _single_device, "pmap": _pmap, "sharded": _sharded,
                 "shard_map": _shard_map}[mode]
        runner = build(step_fn, devices, donate)
    if donate:
        name = "train step" if mode == "none" else f"data_parallel(mode={mode!r}) step"
        runner.step = DonatingStep(runner.step, name)
    return runner


# ----------------------------------------------------------------------------- the modes

def _single_device(step_fn, devices, donate) -> DataParallel:
    if devices is not None and len(devices) > 1:
        raise ValueError(f"data_parallel: mode 'none' trains on one device, got "
                         f"{len(devices)} devices; use mode='pmap' or 'sharded' for several")
    device = jax.local_devices()[0] if devices is None else list(devices)[0]
    step = jax.jit(step_fn(None), donate_argnums=(0,) if donate else ())
    return DataParallel(
        "none", [device], step,
        put_state=lambda ts: jax.device_put(ts, device),
        put_rows=lambda tree: jax.device_put(tree, device),
        get_state=lambda ts: jax.tree.map(_copy, ts))


def _pmap(step_fn, devices, donate) -> DataParallel:
    ordered = list(data_mesh(jax.local_devices() if devices is None else devices).devices)
    # Over one device every mean is the identity, but XLA keeps the all-reduces (a copy of
    # every gradient): the plain step's body is the same step without them.
    body_axis = DATA_AXIS if len(ordered) > 1 else None
    step = jax.pmap(step_fn(body_axis),
                    axis_name=DATA_AXIS, devices=ordered,
                    donate_argnums=(0,) if donate else (),
                    # the metrics are averaged over the axis, hence equal on every device:
                    # return them once instead of stacked, so float() needs no indexing
                    out_axes=(0, None))
    return DataParallel("pmap", ordered, step, put_state=lambda ts: replicate(ts, ordered),
                        put_rows=lambda tree: shard_batch(tree, ordered),
                        get_state=unreplicate)


def _sharded(step_fn, devices, donate) -> DataParallel:
    mesh = _spanning(data_mesh(devices), "sharded")
    replicated = NamedSharding(mesh, P())
    rows = NamedSharding(mesh, P(DATA_AXIS))
    step = jax.jit(step_fn(None),
                   in_shardings=(replicated, rows, rows), out_shardings=(replicated, replicated),
                   donate_argnums=(0,) if donate else ())
    return DataParallel("sharded", list(mesh.devices.flat), step,
                        put_state=lambda ts: place(ts, _like(ts, replicated)),
                        put_rows=_row_putter(rows, "sharded"), get_state=_local_copy,
                        mesh=mesh)


def _shard_map(step_fn, devices, donate) -> DataParallel:
    mesh = _spanning(data_mesh(devices), "shard_map")
    replicated = NamedSharding(mesh, P())
    rows = NamedSharding(mesh, P(DATA_AXIS))
    # pmap's per-device body, with pmap's semantics: no varying-axes checks, so a replicated
    # parameter's gradient is each device's own and the step's explicit pmean the mean (jax
    # 0.12's checks also refuse some primitives outright, a GPT's among them)
    per_device = jax.shard_map(step_fn(DATA_AXIS if mesh.size > 1 else None), mesh=mesh,
                               in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS)),
                               out_specs=(P(), P()), check_vma=False)
    step = jax.jit(per_device, donate_argnums=(0,) if donate else ())
    return DataParallel("shard_map", list(mesh.devices.flat), step,
                        put_state=lambda ts: place(ts, _like(ts, replicated)),
                        put_rows=_row_putter(rows, "shard_map"),
                        get_state=_local_copy, mesh=mesh)


class _LaidOutStep:
    """The jitted step of a mode that splits the train state: compiled for the layout of the
    first state placed (:meth:`lay_out`), laid out again for a state of other shapes."""

    def __init__(self, step_fn, mesh: Mesh, layout: Callable[[Any], Any], donate: bool):
        self._step_fn, self._mesh, self._layout, self._donate = step_fn, mesh, layout, donate
        self._key, self._jitted, self.shardings = None, None, None

    def lay_out(self, shapes: Any) -> Any:
        """The shardings of a train state shaped like ``shapes``; compiles the step for them."""
        key = (jax.tree.structure(shapes),
               tuple((np.shape(a), a.dtype) for a in jax.tree.leaves(shapes)))
        if key != self._key:
            self.shardings = self._layout(shapes)
            rows = NamedSharding(self._mesh, P(DATA_AXIS))
            self._jitted = jax.jit(self._step_fn(None),
                                   in_shardings=(self.shardings, rows, rows),
                                   out_shardings=(self.shardings, NamedSharding(self._mesh, P())),
                                   donate_argnums=(0,) if self._donate else ())
            self._key = key
        return self.shardings

    def __call__(self, ts, x, y):
        if self._jitted is None:
            raise ValueError("data_parallel: place the train state first (runner.put_state(ts) "
                             "or runner.initial_state(init, key, x)): the step is compiled for "
                             "its layout")
        return self._jitted(ts, x, y)

    def __getattr__(self, name: str) -> Any:  # lower, trace, ...: the jitted function's
        if self._jitted is None:
            raise AttributeError(name)
        return getattr(self._jitted, name)


def _split_state(mode, step_fn, devices, donate, mesh, rules) -> DataParallel:
    mesh = _spanning(_mode_mesh(mode, mesh, devices), mode)
    builtin = TENSOR_RULES if mode == "tensor" else ()
    fsdp_axis = DATA_AXIS if mode == "fsdp" else None
    step = _LaidOutStep(step_fn, mesh, lambda shapes: shardings(state_specs(
        shapes, mesh, rules=rules, builtin=builtin, fsdp_axis=fsdp_axis), mesh), donate)
    copy = jax.jit(lambda ts: jax.tree.map(jnp.copy, ts))  # keeps each leaf's sharding

    def put_state(ts):
        return place(ts, step.lay_out(ts))

    def initial_state(init, key, x):
        spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), x)
        def make(key):
            return init(key, spec)

        placement = step.lay_out(jax.eval_shape(make, key))
        return jax.jit(make, out_shardings=placement)(key)

    return DataParallel(mode, list(mesh.devices.flat), step, put_state,
                        _row_putter(NamedSharding(mesh, P(DATA_AXIS)), mode), copy, mesh=mesh,
                        initial_state=initial_state)


def _mode_mesh(mode: str, mesh, devices) -> Mesh:
    """The mesh of a mode that splits the train state, with Auto axes."""
    if isinstance(mesh, Mesh):
        if devices is not None:
            raise ValueError(f"data_parallel(mode={mode!r}): give a mesh or devices, not both "
                             f"(a mesh holds its devices)")
        mesh = auto_axes(mesh)
    else:
        if mesh is None and mode == "tensor":
            local = jax.local_device_count() if devices is None else \
                sum(d.process_index == jax.process_index() for d in devices)
            count = len(jax.devices() if devices is None else devices)
            mesh = {DATA_AXIS: count // local, MODEL_AXIS: local}
        mesh = make_mesh(mesh, devices)
    if DATA_AXIS not in mesh.shape:
        raise ValueError(f"data_parallel(mode={mode!r}): the mesh needs a {DATA_AXIS!r} axis "
                         f"for the batch (size 1 is fine), got the axes {dict(mesh.shape)}")
    return mesh


def _spanning(mesh: Mesh, mode: str) -> Mesh:
    """``mesh``, checked to hold devices of every process."""
    processes = {d.process_index for d in mesh.devices.flat}
    if len(processes) != jax.process_count():
        raise ValueError(f"data_parallel(mode={mode!r}): the devices must include devices of "
                         f"every one of the {jax.process_count()} processes, got devices of "
                         f"processes {sorted(processes)}")
    return mesh


def _row_putter(rows: NamedSharding, mode: str) -> Callable[[Any], Any]:
    """Places this process's rows of a batch split along axis 0 over ``rows``."""
    local = _local_row_blocks(rows)

    def put_rows(tree):
        _check_divisible(tree, local, mode)
        return jax.tree.map(lambda a: _put_rows(a, rows), tree)

    return put_rows


def _local_row_blocks(rows: NamedSharding) -> int:
    """How many distinct blocks of a batch's rows this process's devices hold."""
    index = rows.addressable_devices_indices_map((rows.mesh.shape[DATA_AXIS],))
    return len({i[0].start for i in index.values()})


def _like(tree: Any, sharding: NamedSharding) -> Any:
    return jax.tree.map(lambda _: sharding, tree)


def _local_copy(ts: Any) -> Any:
    """A replicated train state's value as new arrays on this process's first device."""
    return jax.tree.map(lambda a: _copy(a.addressable_shards[0].data), ts)


# ----------------------------------------------------------------------------- placement

def _check_divisible(tree: Any, num_local: int, mode: str) -> None:
    for leaf in jax.tree.leaves(tree):
        if not np.ndim(leaf):
            raise ValueError(f"data_parallel(mode={mode!r}): expected batch arrays [batch, ...], "
                             f"got a scalar of shape ()")
        size = np.shape(leaf)[0]
        if size % num_local:
            where = ("" if jax.process_count() == 1 else
                     f" (this process's rows, process {jax.process_index()})")
            raise ValueError(
                f"data_parallel(mode={mode!r}): the batch size {size}{where} does not divide by "
                f"the {num_local} devices; use a batch size that is a multiple of {num_local}, "
                f"got an input of shape {np.shape(leaf)}")


def _put_rows(a: Any, sharding: NamedSharding) -> jax.Array:
    """This process's rows of a batch, split along axis 0 over ``sharding``'s mesh."""
    if jax.process_count() == 1:
        return jax.device_put(a, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(a))


def _copy(a: jax.Array) -> jax.Array:
    """A new buffer with ``a``'s value on ``a``'s device: it outlives a donation of ``a``."""
    return jax.device_put(a, list(a.devices())[0], may_alias=False)
