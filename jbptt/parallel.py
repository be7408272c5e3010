"""Data-parallel training on several devices and processes: pmap, sharded jit, jax.distributed.

Both paths wrap :func:`jbptt.train.make_train_step`, so they serve every
:class:`~jbptt.estimator.GradientEstimator` (BPTT, TBPTT, RTRL and its approximations)::

    carry = cell.initial_carry(params, (B,))       # the GLOBAL batch
    dp = parallel.data_parallel(estimator, optimizer, params, carry, mode="sharded", devices="auto",
                                inputs=example.inputs)     # an example global batch's inputs [B, T, ...]
    state = dp.init(params, carry, key=key, inputs=example.inputs)
    for batch in batches:                  # this process's rows of each batch: [B / process_count, ...]
        state, metrics = dp.step(state, batch)     # metrics: replicated scalars ("loss", "grad_norm")
    host_state = dp.gather(state)          # a TrainState in single-device layout, e.g. to checkpoint

Modes:
  * ``"pmap"``: parameters, optimizer state and step count are replicated over a leading device axis, the
    batch is split as ``[n_local_devices, B_local / n_local_devices, ...]``, each device runs the estimator on
    its shard and the loss and gradients are averaged with ``lax.pmean`` before one optimizer update (one
    ``pmap`` call a step).
  * ``"sharded"``: the single-device step under ``jax.jit`` with ``NamedSharding`` over a 1-D mesh
    (``jax.make_mesh``, axis :data:`AXIS`): the batch and the per-example estimator state are sharded along
    the mesh axis, everything else is replicated; XLA inserts the cross-device reductions. This is the path
    JAX recommends (``pmap`` is in maintenance mode and since JAX 0.10 is itself built on ``shard_map``).
  * ``"none"``: plain ``jax.jit`` on one device, the same API.

Estimator-state sharding rule. The estimator state (TBPTT's carried state, RTRL's influence matrix, ...) is
split leaf by leaf. A leaf is *per-example* when its leading axis is the batch axis, found by evaluating
``estimator.init`` abstractly (``jax.eval_shape``) at batch sizes ``B`` and ``B + 1`` (carry and example inputs
resized alike):
  * leaves whose leading size follows the batch size are sharded with the batch; they stay on their device
    between steps, so a carried state continues where it stopped;
  * leaves whose shape does not depend on the batch size are replicated;
  * a leaf that depends on the batch size in any other way is an error (pass ``state_axes`` explicitly).
Parameters, optimizer state and the step counter are always replicated. Replicated estimator-state leaves must
evolve identically on every device (counters, PRNG keys); under ``pmap`` each device updates its own copy and
``gather`` returns device 0's. A stochastic estimator drawing noise from a replicated key therefore draws
different numbers under ``pmap`` (per shard) than under ``sharded`` / ``none`` (for the whole batch).

Averaging. Each device's loss is the weighted mean over its own shard (weights from ``Batch.weights()``). The
``pmap`` path averages loss and gradients with ``lax.pmean`` weighted by each shard's total loss weight: the
plain ``pmean`` when the shards carry equal weight, and the whole-batch result when masks or sequence lengths
differ between shards (for estimators whose loss is the weighted mean over the segment, as the protocol says).

Multi-process. Call :func:`initialize_distributed` first (coordinator address, number of processes and
process id from arguments or the ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``
environment variables; JAX's cluster auto-detection (SLURM, Open MPI, ...) for what is left unset). Every
process then builds the same :class:`DataParallel` over all global devices and feeds only its own rows
(:func:`process_rows`) of each global batch: process ``p`` owns rows ``[p * B / P, (p + 1) * B / P)``.
``gather`` is a collective (every process calls it); write metrics and checkpoints only where
:func:`is_main_process`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jbptt.batch import Batch
from jbptt.estimator import GradientEstimator
from jbptt.train import TrainState, init_train_state, make_train_step

__all__ = [
    "AXIS", "MODES", "DataParallel", "check_batch_divisible", "data_parallel",
    "initialize_distributed", "is_main_process", "maybe_initialize_distributed", "process_rows",
    "resolve_devices", "state_batch_axes", "weighted_pmean",
]

AXIS = "batch"
"""Name of the device axis (the ``pmap`` axis name and the mesh axis of the sharded path)."""

MODES = ("none", "pmap", "sharded")


# ------------------------------------------------------------------------------------------------------------
# Devices, processes, batch rows.


def resolve_devices(devices: str | int | Sequence = "auto") -> list:
    """The devices to train on.

    Args:
      devices: ``"auto"`` (every device of every process), a count ``N`` (the first ``N`` devices of
        ``jax.devices()``; with several processes it must be all of them), or an explicit device list.

    Returns:
      A list of devices, ordered by process (so each process owns a contiguous block).
    """
    available = jax.devices()
    if isinstance(devices, str):
        if devices != "auto":
            raise ValueError(f"parallel devices must be 'auto' or a positive integer, got {devices!r}")
        return list(available)
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        n = int(devices)
        if n < 1 or n > len(available):
            raise ValueError(f"parallel devices={n} but {len(available)} device(s) are available "
                             f"({available[0].platform}); use 1..{len(available)} or 'auto'")
        if jax.process_count() > 1 and n != len(available):
            raise ValueError(f"parallel devices={n}: with {jax.process_count()} processes every one of the "
                             f"{len(available)} global devices is used; set devices to 'auto'")
        return list(available[:n])
    return list(devices)


def check_batch_divisible(batch_size: int, num_devices: int, *, what: str = "batch size"):
    """Raises one clear ``ValueError`` unless ``batch_size`` divides by ``num_devices``."""
    if batch_size % num_devices:
        raise ValueError(f"{what} {batch_size} does not divide by the number of devices {num_devices}: "
                         "data-parallel training splits the batch evenly, so use a multiple of "
                         f"{num_devices} (or change parallel.devices)")


def process_rows(batch_size: int) -> slice:
    """The rows ``[p * B / P, (p + 1) * B / P)`` of a global batch ``B = batch_size`` that process p feeds."""
    count, index = jax.process_count(), jax.process_index()
    if batch_size % count:
        raise ValueError(f"global batch size {batch_size} does not divide by the number of processes {count}")
    per = batch_size // count
    return slice(index * per, (index + 1) * per)


def is_main_process() -> bool:
    """True in process 0, the one that writes metrics, checkpoints and plots."""
    return jax.process_index() == 0


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, local_device_count: int | None = None,
                           timeout_s: int = 300):
    """Starts multi-process JAX (``jax.distributed.initialize``); call before anything touches a device.

    Unset arguments come from ``JAX_COORDINATOR_ADDRESS`` (``host:port``), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``, then from JAX's cluster auto-detection (SLURM, Open MPI, Kubernetes, TPU pods).

    Args:
      coordinator_address: ``host:port`` of process 0's coordinator service.
      num_processes: number of processes ``P``.
      process_id: this process's index in ``[0, P)``.
      local_device_count: on CPU, the number of devices this process exposes (sets ``jax_num_cpu_devices``;
        ignored on accelerators). CPU collectives between processes use gloo.
      timeout_s: how long to wait for the other processes.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is outside [0, {num_processes}) processes")
    if local_device_count is not None:
        jax.config.update("jax_num_cpu_devices", int(local_device_count))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=timeout_s)


def maybe_initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
    """:func:`initialize_distributed` if several processes are asked for (by the arguments or
    ``JAX_NUM_PROCESSES``) and JAX's distributed runtime is not running yet; returns True when it runs.

    For the runner: a single-process config and environment leave JAX untouched.
    """
    n = num_processes if num_processes is not None else int(os.environ.get("JAX_NUM_PROCESSES", "1") or 1)
    if n <= 1:
        return False
    if not jax.distributed.is_initialized():
        initialize_distributed(coordinator_address, n, process_id)
    return True


# ------------------------------------------------------------------------------------------------------------
# Which estimator-state leaves are per-example.


def _path_name(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def state_batch_axes(estimator: GradientEstimator, params, carry, *, key=None, inputs=None):
    """Which leaves of the initial estimator state are per-example (see the module docstring's rule).

    Args:
      params: the parameters (only shapes are used).
      carry: the initial carry of the global batch; every leaf ``[B, ...]``.
      key: the key passed to ``estimator.init`` (only its type is used).
      inputs: the example inputs passed to ``estimator.init`` (leaves ``[B, T, ...]``; only shapes are used).

    Returns:
      A pytree of bools with the structure of the estimator state: True where the leaf's leading axis is the
      batch axis.
    """
    carry_leaves = jax.tree_util.tree_leaves(carry)
    sizes = {jnp.shape(c)[0] if jnp.ndim(c) else None for c in carry_leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError("state_batch_axes: every carry leaf needs the same leading batch axis [B, ...]; got "
                         f"shapes {[jnp.shape(c) for c in carry_leaves]}")
    (B,) = sizes

    def resized(c, n):
        return jax.ShapeDtypeStruct((n,) + tuple(jnp.shape(c)[1:]), jnp.result_type(c))

    def shapes(n):
        def init(p, c, x):
            return estimator.init(p, c, key=key, inputs=x)

        return jax.eval_shape(init, params, jax.tree.map(lambda c: resized(c, n), carry),
                              jax.tree.map(lambda x: resized(x, n), inputs))

    shape_b, shape_b1 = shapes(B), shapes(B + 1)

    def classify(path, a, b):
        if a.shape == b.shape:
            return False
        if a.shape[:1] == (B,) and b.shape[:1] == (B + 1,) and a.shape[1:] == b.shape[1:]:
            return True
        raise ValueError(f"estimator state leaf {_path_name(path)} has shape {a.shape} at batch size {B} and "
                         f"{b.shape} at {B + 1}: its batch axis is not the leading one; pass state_axes")

    return jax.tree_util.tree_map_with_path(classify, shape_b, shape_b1)


def _batch_size(batch) -> int:
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves or not jnp.ndim(leaves[0]):
        raise ValueError("data-parallel batch: expected leaves with a leading batch axis [B, ...]")
    return int(jnp.shape(leaves[0])[0])


# ------------------------------------------------------------------------------------------------------------
# Averaging over the device axis.


def weighted_pmean(tree, weight, axis_name: str = AXIS):
    """``lax.pmean`` of every leaf of ``tree`` weighted by this device's ``weight`` (a scalar >= 0).

    Returns ``sum_d weight_d * x_d / sum_d weight_d`` over the devices of ``axis_name`` (0 when every weight
    is 0; a device with weight 0 contributes nothing even if its ``x`` is NaN). Equal weights give ``pmean``.
    """
    total = lax.pmean(weight, axis_name)
    share = jnp.where(total > 0, weight / jnp.where(total > 0, total, 1.0), 0.0)

    def average(x):
        return lax.pmean(jnp.where(weight > 0, x * share.astype(x.dtype), jnp.zeros_like(x)), axis_name)

    return jax.tree.map(average, tree)


def _averaging_step(estimator, optimizer, axis_name):
    """The per-device step of the pmap path: gradients averaged over ``axis_name`` by shard loss weight."""

    def step(state: TrainState, batch: Batch):
        def average(loss_grads):
            weight = jnp.sum(batch.weights(jnp.result_type(loss_grads[0])))
            return weighted_pmean(loss_grads, weight, axis_name)

        return make_train_step(estimator, optimizer, grad_transform=average)(state, batch)

    return step


# ------------------------------------------------------------------------------------------------------------
# The DataParallel bundle.


class DataParallel(NamedTuple):
    """Data-parallel training functions for one state layout (see the module docstring).

    Attributes:
      mode: ``"none"``, ``"pmap"`` or ``"sharded"``.
      devices: the devices used (every process's).
      batch_size: the global batch size ``B``.
      state_axes: a :class:`TrainState` of bools, True for the per-example (sharded) leaves.
      init: ``init(params, carry, *, key=None, inputs=None) -> state`` placed on the devices (``carry``: the
        global initial carry; ``key`` and ``inputs`` go to ``estimator.init``).
      place: ``place(host_state) -> state``: places a global single-device-layout :class:`TrainState` (e.g. a
        restored checkpoint) on the devices; every process passes the same global state.
      step: ``step(state, batch) -> (state, metrics)``: one training step; ``batch`` holds this process's rows
        (``[B / process_count, ...]``, see :func:`process_rows`); ``metrics`` are replicated scalars. Compiled
        once per batch shape; with ``donate=True`` the incoming ``state`` is consumed (do not reuse it).
      gather: ``gather(state) -> TrainState`` in single-device layout with the global batch (host arrays); a
        collective in multi-process runs (every process calls it).
    """

    mode: str
    devices: list
    batch_size: int
    state_axes: TrainState
    init: Callable[..., TrainState]
    place: Callable[[TrainState], TrainState]
    step: Callable[[TrainState, Batch], tuple[TrainState, dict]]
    gather: Callable[[TrainState], TrainState]


def data_parallel(estimator: GradientEstimator, optimizer: optax.GradientTransformation, params, carry, *,
                  mode: str = "sharded", devices: str | int | Sequence = "auto", state_axes=None, inputs=None,
                  donate: bool = False) -> DataParallel:
    """Builds data-parallel training for ``estimator`` and ``optimizer``.

    Args:
      estimator: any :class:`~jbptt.estimator.GradientEstimator`.
      optimizer: an optax transformation.
      params: the parameters (only shapes are read here; arrays or ``jax.ShapeDtypeStruct``).
      carry: the global initial carry, leaves ``[B, ...]`` (only shapes are read); fixes the batch size ``B``,
        which must divide by the number of devices.
      mode: ``"none"`` (one device, plain ``jit``), ``"pmap"`` or ``"sharded"`` (``jit`` + ``NamedSharding``).
      devices: ``"auto"``, a device count or a device list (see :func:`resolve_devices`).
      state_axes: optional pytree of bools over the estimator state overriding :func:`state_batch_axes`.
      inputs: an example of the training inputs of the global batch (leaves ``[B, T, ...]``; only shapes are read
        here), for estimators whose state holds inputs (TBPTT's replay window): ``estimator.init`` allocates that
        state from it, so the state's structure is fixed from the start. Pass the same to ``init``.
      donate: donate the incoming train state to the step: saves a copy of the state (e.g. a large influence
        matrix) but the state passed to ``step`` is consumed, so a caller that keeps the previous state (to
        halt on a NaN, say) must leave it False.

    Returns:
      A :class:`DataParallel`. Nothing is compiled until the first step.
    """
    if mode not in MODES:
        raise ValueError(f"parallel mode must be one of {list(MODES)}, got {mode!r}")
    if mode == "none":
        if jax.process_count() > 1:
            raise ValueError(f"parallel mode 'none' runs on one device but {jax.process_count()} processes "
                             "were started; use 'pmap' or 'sharded'")
        devs = resolve_devices(devices)[:1] if devices == "auto" else resolve_devices(devices)
        if len(devs) != 1:
            raise ValueError(f"parallel mode 'none' uses one device, got devices={devices!r}")
    else:
        devs = resolve_devices(devices)
    local = [d for d in devs if d.process_index == jax.process_index()]
    if len(local) * jax.process_count() != len(devs):
        raise ValueError(f"every process must own the same number of the {len(devs)} devices")
    B = _batch_size(carry)
    check_batch_divisible(B, len(devs))
    est_axes = state_axes if state_axes is not None else state_batch_axes(estimator, params, carry, inputs=inputs)
    opt_shapes = jax.eval_shape(optimizer.init, params)
    axes = TrainState(jax.tree.map(lambda _: False, params), jax.tree.map(lambda _: False, opt_shapes),
                      est_axes, False)
    build = {"none": _single_device, "pmap": _pmap, "sharded": _sharded}[mode]
    place, step, gather = build(estimator, optimizer, devs, local, axes, donate)
    structure = jax.tree_util.tree_structure(axes)

    def check(state, what):
        if jax.tree_util.tree_structure(state) != structure:
            raise ValueError(f"data_parallel: the {what} has another pytree structure than the state the "
                             "layout was built for (estimator.init at construction). An estimator's init must "
                             "allocate its whole state (from `inputs`, for state that holds inputs: pass the same "
                             "example inputs to data_parallel and to init); its update must keep that structure")
        return state

    def checked_place(host_state):
        return place(check(host_state, "state to place"))

    def checked_step(state, batch):
        new_state, metrics = step(check(state, "state passed to step"), batch)
        return check(new_state, "state returned by the estimator's update"), metrics

    def init(params, carry, *, key=None, inputs=inputs):
        return checked_place(init_train_state(estimator, optimizer, params, carry, key=key, inputs=inputs))

    return DataParallel(mode, devs, B, axes, init, checked_place, checked_step, gather)


def _single_device(estimator, optimizer, devs, local, axes, donate):
    del local, axes
    step = jax.jit(make_train_step(estimator, optimizer), donate_argnums=(0,) if donate else ())
    return (lambda state: jax.tree.map(lambda x: _put(x, devs[0]), state)), step, jax.device_get


def _put(x, where):
    """``jax.device_put`` into fresh buffers (the step donates its state; the caller's arrays survive)."""
    return jax.device_put(_host(x), where, may_alias=False)


def _host(x):
    """``x`` as a host numpy array (typed PRNG keys stay JAX arrays), so placing compiles nothing."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return x
    return np.asarray(x)


def _check_local_batch(batch, num_devices):
    check_batch_divisible(_batch_size(batch) * jax.process_count(), num_devices)


def _pmap(estimator, optimizer, devs, local, axes, donate):
    n_local, multi = len(local), jax.process_count() > 1
    placement = NamedSharding(Mesh(np.array(local), (AXIS,), axis_types=(AxisType.Auto,)), P(AXIS))
    pstep = jax.pmap(_averaging_step(estimator, optimizer, AXIS), axis_name=AXIS, out_axes=(0, None),
                     devices=None if multi else devs, donate_argnums=(0,) if donate else ())

    def split(x):  # [b_local, ...] -> [n_local, b_local / n_local, ...] (numpy stays numpy)
        return x.reshape((n_local, x.shape[0] // n_local) + tuple(x.shape[1:]))

    def place(state):
        def put(x, batched):
            x = _host(x)
            if batched:
                x = split(x[process_rows(x.shape[0])])
            else:
                x = jnp.broadcast_to(x, (n_local,) + x.shape) if isinstance(x, jax.Array) else \
                    np.broadcast_to(x, (n_local,) + x.shape)
            return _put(x, placement)

        return jax.tree.map(put, state, axes)

    def step(state, batch):
        _check_local_batch(batch, len(devs))
        return pstep(state, jax.tree.map(split, batch))

    def gather(state):
        def get(x, batched):
            x = jax.device_get(x)
            if not batched:
                return x[0]
            x = np.reshape(x, (-1,) + tuple(x.shape[2:]))  # [n_local, b, ...] -> [b_local, ...]
            return np.asarray(multihost_utils.process_allgather(x, tiled=True)) if multi else x

        return jax.tree.map(get, state, axes)

    return place, step, gather


def _sharded(estimator, optimizer, devs, local, axes, donate):
    del local
    multi = jax.process_count() > 1
    mesh = jax.make_mesh((len(devs),), (AXIS,), axis_types=(AxisType.Auto,), devices=devs)
    rows, whole = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())
    shardings = jax.tree.map(lambda batched: rows if batched else whole, axes)
    step_fn = jax.jit(make_train_step(estimator, optimizer), in_shardings=(shardings, rows),
                      out_shardings=(shardings, whole), donate_argnums=(0,) if donate else ())

    def place(state):
        def put(x, sharding):
            if not multi:
                return _put(x, sharding)
            x = jnp.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

        return jax.tree.map(put, state, shardings)

    def put_batch(x):
        if multi:
            return jax.make_array_from_process_local_data(rows, np.asarray(x))
        return jax.device_put(x, rows)

    train_step, checked = make_train_step(estimator, optimizer), []

    def step(state, batch):
        _check_local_batch(batch, len(devs))
        batch = jax.tree.map(put_batch, batch)
        if not checked:  # out_shardings fix the state's structure: a changing one gets the clear error here
            out = jax.eval_shape(train_step, state, batch)[0]
            if jax.tree_util.tree_structure(out) != jax.tree_util.tree_structure(state):
                return out, None
            checked.append(True)
        return step_fn(state, batch)

    def gather(state):
        def get(x, batched):
            if not multi:
                return jax.device_get(x)
            if batched:
                return np.asarray(multihost_utils.process_allgather(x, tiled=True))
            return np.asarray(x.addressable_data(0))

        return jax.tree.map(get, state, axes)

    return place, step, gather
