"""Running a TPU op on a mesh: one call per shard of the batch.

XLA's partitioner cannot split a Pallas kernel, so on a mesh each op (a whole `jax.custom_vjp`,
forward and backward) runs under `jax.shard_map` with the batch split over every mesh axis and
the weights whole on every device. The kernels know nothing of meshes. The weight gradients are
summed over the devices by shard_map's transpose (unchecked, `check_vma=False`): the cotangent of
an input that is whole on every device is the sum of the shards' cotangents. An op whose forward
pass needs the whole batch (the BatchNorms' statistics) takes `batch_axes(mesh)` as its
`axis_name`, as `flax.nnx.BatchNorm` does, and reduces over it itself.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import Mesh, PartitionSpec


def batch_axes(mesh: Mesh | None) -> tuple[str, ...] | None:
  """The axes the batch is split over, for an op's collectives (None off a mesh)."""
  return None if mesh is None or mesh.size == 1 else tuple(mesh.axis_names)


def on_batch_shards(mesh: Mesh | None, op: Callable, args, *, split_in: int,
                    split_out: Any = True):
  """`op(*args)`, on a mesh one call per shard of the batch. The first `split_in` arguments are
  split along their leading axis, the others whole on every device. `split_out`: a pytree prefix
  of `op`'s outputs, True for those split along their leading axis, False for those whole on every
  device (equal on all, e.g. statistics reduced over `batch_axes`). `mesh` None or of one device:
  a plain call."""
  if batch_axes(mesh) is None:
    return op(*args)
  split, whole = PartitionSpec(mesh.axis_names), PartitionSpec()
  in_specs = (split,) * split_in + (whole,) * (len(args) - split_in)
  out_specs = jax.tree.map(lambda s: split if s else whole, split_out)
  return jax.shard_map(op, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)(*args)
