"""One global device mesh; data parallelism over its 'data' axis, optionally FSDP.

Every array of the train state gets a `NamedSharding` on the mesh: replicated for data parallelism,
or, with FSDP, split along its largest dimension that divides evenly by the device count (arrays
smaller than `fsdp_min_size` elements stay replicated: sharding them saves nothing and costs
collectives). Parameters and the AdamW moments have the same shapes, hence the same shardings, so
the optimizer state is sharded exactly like the weights. Batches are split along the batch axis.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from cvt_flax.errors import ConfigError

DATA_AXIS = 'data'


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over all devices of all processes (or the given ones), axis 'data'."""
  devices = list(devices) if devices is not None else jax.devices()
  # Auto axes: classic jit sharding propagation (the default Explicit axes would make every
  # reshape of a sharded batch a typing question).
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def fsdp_partition_spec(shape: tuple[int, ...], num_shards: int, min_size: int) -> P:
  """Shard the largest dimension divisible by `num_shards`; replicate small or indivisible arrays."""
  if num_shards == 1 or math.prod(shape) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % num_shards == 0:
      spec = [None] * len(shape)
      spec[axis] = DATA_AXIS
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh, *, fsdp: bool, fsdp_min_size: int) -> Any:
  """A NamedSharding for every leaf of `abstract_state` (a pytree of arrays/ShapeDtypeStructs)."""
  n = mesh.shape[DATA_AXIS]

  def sharding(x):
    spec = fsdp_partition_spec(tuple(x.shape), n, fsdp_min_size) if fsdp else P()
    return NamedSharding(mesh, spec)

  return jax.tree.map(sharding, abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', everything else whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh, grad_accum_steps: int = 1) -> None:
  """The global batch must split evenly over processes, devices and accumulation steps."""
  n = mesh.shape[DATA_AXIS]
  if global_batch_size % (n * grad_accum_steps) or global_batch_size % jax.process_count():
    raise ConfigError(
        f'batch size {global_batch_size} must be divisible by the number of devices ({n}) times '
        f'grad_accum_steps ({grad_accum_steps}) and by the number of processes '
        f'({jax.process_count()}) (config.batch_size / config.eval_batch_size).')


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into global arrays (batch axis sharded)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, cpu_collectives: str | None = None, *,
                           init_timeout: int = 300, heartbeat_timeout: int = 100) -> None:
  """`jax.distributed.initialize`; arguments left None are auto-detected (TPU pods, SLURM, ...).

  `cpu_collectives='gloo'` enables cross-process collectives between CPU devices (tests, CPU
  clusters); it must be set before the backend starts.

  Failure bounds (seconds): if not every process connects within `init_timeout`, the processes
  that did start exit with an error; once running, a process that stops heartbeating (killed,
  crashed, its machine lost) makes every other process exit within about `heartbeat_timeout`.
  JAX's runtime ends them with "Terminating process because the JAX distributed service detected
  fatal errors" (SIGABRT, exit code 134); no process hangs.
  """
  if cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', cpu_collectives)
  where = coordinator_address or 'auto-detected coordinator'
  who = (f'process {process_id} of {num_processes}' if process_id is not None and num_processes
         else 'this process')
  # Printed first so that a start-up failure (an abort inside JAX) comes with what was attempted.
  print(f'jax.distributed: {who} connecting to {where}; waiting up to {init_timeout}s for all '
        f'processes (heartbeat timeout {heartbeat_timeout}s).', file=sys.stderr, flush=True)
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=init_timeout,
                             heartbeat_timeout_seconds=heartbeat_timeout)
