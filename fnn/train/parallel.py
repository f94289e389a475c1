"""Data-parallel training: one train step over a batch split across devices.

Three modes, one interface (:class:`DataParallel`)::

    runner = data_parallel(model, optimizer, loss, mode="sharded")
    ts = runner.put_state(create_train_state(model, optimizer, key, x))
    for x, y in batches:
        ts, metrics = runner.step(ts, *runner.put_batch(x, y))
    ts = runner.get_state(ts)  # ordinary arrays: evaluate, checkpoint, np.asarray

- ``"none"``: the plain jitted step (as :func:`fnn.train.make_train_step`) on one device.
- ``"pmap"``: ``jax.pmap`` over the devices; the train state is replicated with a leading
  device axis, the batch ``[B, ...]`` is split as ``[devices, B / devices, ...]``, and the step
  averages gradients, metrics and model state over the axis :data:`DATA_AXIS`. BatchNorm
  layers normalise with the whole batch's statistics: the step binds :data:`DATA_AXIS` as the
  batch axis (:func:`fnn.core.batch_axis`), which a BatchNorm without an ``axis_name`` of its
  own averages over.
- ``"sharded"``: ``jax.jit`` over a one-axis :func:`data_mesh`; the train state is replicated
  (``P()``), the batch is split along its first axis (``P("data")``) and XLA inserts the
  cross-device reductions itself. Every layer sees the global batch, so a plain ``BatchNorm()``
  uses the whole batch's statistics and dropout draws the same mask as on one device.

With several processes (``jax.process_count() > 1``, see :mod:`fnn.train.distributed`) use
``"sharded"``: the mesh spans every process's devices, and each process passes
:meth:`DataParallel.put_batch` only its own rows of the global batch, process ``i`` rows
``[i * B / P, (i + 1) * B / P)``, so that the global batch is the one a single process would
see. ``"pmap"`` and ``"none"`` are single-process modes.

Every mode computes the step of :func:`fnn.train.train_step_fn` on the whole batch: for the
same global batch the parameters agree with a one-device run up to float rounding.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fnn.core import Layer
from fnn.train.learner import Learner, supervised
from fnn.train.state import TrainState
from fnn.train.step import DonatingStep, Loss, Metric, Mix

MODES = ("none", "pmap", "sharded")
DATA_AXIS = "data"  # the mesh axis of "sharded" and the pmap axis of "pmap"


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
      ``num_devices``: their number.
    - ``put_state(ts)``: the train state placed for ``step`` (replicated). With ``"none"`` it
      may be ``ts``'s own arrays, which a donating ``step`` then consumes.
    - ``put_batch(x, y)``: this process's rows ``x: [B, ...]``, ``y: [B, ...]`` (numpy arrays or
      pytrees of them) placed for ``step``; ``B`` must divide by the number of this process's
      devices.
    - ``step(ts, x, y) -> (ts, metrics)``: one train step; with ``donate`` the train state
      passed in is consumed. ``metrics`` maps names to scalar arrays; ``float()`` reads them.
    - ``get_state(ts)``: the train state as new single-device arrays on this process's first
      device, for an ordinary eval step, ``np.asarray`` or a checkpoint. It stays valid after
      further (donating) steps.
    """

    def __init__(self, mode: str, devices: list, step: Callable,
                 put_state: Callable[[TrainState], TrainState],
                 put_rows: Callable[[Any], Any],
                 get_state: Callable[[TrainState], TrainState]):
        self.mode = mode
        self.devices = devices
        self.num_devices = len(devices)
        self.step = step  # the compiled function (or a DonatingStep around it: one call frame)
        self.put_state = put_state
        self._put_rows = put_rows
        self.get_state = get_state

    def put_batch(self, x: Any, y: Any) -> tuple[Any, Any]:
        """``(x, y)`` placed for :attr:`step`; see the class docstring."""
        return self._put_rows((x, y))

    def __repr__(self) -> str:
        return f"DataParallel(mode={self.mode!r}, num_devices={self.num_devices})"


def data_parallel(model: Layer | Learner, optimizer: optax.GradientTransformation | None = None,
                  loss: Loss | None = None, metrics: Mapping[str, Metric] | None = None, *,
                  mode: str = "none", devices: Sequence[jax.Device] | None = None,
                  donate: bool = True, mix: Mix | None = None) -> DataParallel:
    """The train step of :func:`fnn.train.train_step_fn` run data parallel over ``devices``;
    or, given a :class:`~fnn.train.Learner` alone (``data_parallel(fnn.train.gan(...),
    mode="pmap")``), the learner's step.

    ``mode``: ``"none"`` (one device: ``devices[0]``, default the first local device),
    ``"pmap"`` (default: every local device) or ``"sharded"`` (default: every device of every
    process); see the module docstring for how each lays out the state and the batch. With
    ``donate`` each step reuses the buffers of the train state it is given; ``mix`` mixes
    each batch (see :func:`fnn.train.train_step_fn`).

    Raises ``ValueError`` for an unknown mode, an empty device list, several devices with
    ``"none"``, ``"none"``/``"pmap"`` with several processes, and a ``"sharded"`` mesh that
    leaves out a process.
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
    if mode != "sharded" and jax.process_count() > 1:
        raise ValueError(f"data_parallel: mode {mode!r} runs in one process, but there are "
                         f"{jax.process_count()} processes; use mode='sharded', whose mesh "
                         f"spans every process's devices")
    if devices is not None and not list(devices):
        raise ValueError(f"data_parallel: expected at least one device for mode {mode!r}, "
                         f"got none")
    build = {"none": _single_device, "pmap": _pmap, "sharded": _sharded}[mode]
    runner = build(step_fn, devices, donate)
    if donate:
        name = "train step" if mode == "none" else f"data_parallel(mode={mode!r}) step"
        runner.step = DonatingStep(runner.step, name)
    return runner


# ----------------------------------------------------------------------------- the three modes

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
    mesh = data_mesh(devices)
    processes = {d.process_index for d in mesh.devices.flat}
    if len(processes) != jax.process_count():
        raise ValueError(f"data_parallel(mode='sharded'): the devices must include devices of "
                         f"every one of the {jax.process_count()} processes, got devices of "
                         f"processes {sorted(processes)}")
    replicated = NamedSharding(mesh, P())
    rows = NamedSharding(mesh, P(DATA_AXIS))
    step = jax.jit(step_fn(None),
                   in_shardings=(replicated, rows, rows), out_shardings=(replicated, replicated),
                   donate_argnums=(0,) if donate else ())
    local = len(rows.addressable_devices)

    def put_rows(tree):
        _check_divisible(tree, local, "sharded")
        return jax.tree.map(lambda a: _put_rows(a, rows), tree)

    def put_state(ts):
        return jax.tree.map(lambda a: _put_replicated(a, replicated), ts)

    def get_state(ts):
        return jax.tree.map(lambda a: _copy(a.addressable_shards[0].data), ts)

    return DataParallel("sharded", list(mesh.devices), step, put_state, put_rows, get_state)


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


def _put_replicated(a: jax.Array, sharding: NamedSharding) -> jax.Array:
    """A copy of ``a`` on each of this process's devices of ``sharding`` (replicated)."""
    if jax.process_count() == 1:
        return jax.device_put(a, sharding)
    copies = [jax.device_put(a, d) for d in sharding.addressable_devices_indices_map(a.shape)]
    return jax.make_array_from_single_device_arrays(a.shape, sharding, copies)


def _copy(a: jax.Array) -> jax.Array:
    """A new buffer with ``a``'s value on ``a``'s device: it outlives a donation of ``a``."""
    return jax.device_put(a, list(a.devices())[0], may_alias=False)
