"""A model's weights and train states as trees: flat mappings, the nested dicts Orbax stores, and
the one report of how two weight layouts differ.

Every loader and checkpoint reader names a model's tensors by their dotted attribute path
('stage0.blocks.0.attn.proj_q.kernel'), and every mismatch between what a file holds and what a
model needs is reported by `describe_differences`, so all errors read the same.

Train states and model weights are stored as nested dicts with string keys following the pytree
paths (`params/stage0/blocks/0/...`, `opt_state/0/mu/...`), so files stay readable by plain Orbax
without cvt-flax's classes: the `.value` of nnx Variables is left out of the paths, typed PRNG keys
are stored as their raw uint32 key data (`to_nested_dict`, `from_nested_dict`, `flatten`, `nest`).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def flat_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
  """'stage0.blocks.0.attn.proj_q.kernel' -> Variable, for every nnx.Param and nnx.BatchStat (the
  weights; RNG state is not part of them)."""
  state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
  return {'.'.join(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}


def host_weights(model: nnx.Module) -> dict[str, np.ndarray]:
  """`flat_variables`' values as numpy arrays on the host (safe to pass to a jit over any mesh)."""
  return {k: np.asarray(jax.device_get(v.get_value())) for k, v in flat_variables(model).items()}


def shapes(arrays: Mapping[str, Any]) -> dict[str, tuple]:
  """key -> shape of anything with a `.shape` (arrays, ShapeDtypeStructs, Variables' values)."""
  return {k: tuple(v.get_value().shape if isinstance(v, nnx.Variable) else v.shape)
          for k, v in arrays.items()}


def _sample(items: Iterable[str], limit: int | None, group_sep: str | None) -> str:
  """The items, sorted; with a `limit`, at most that many of each group (the part of the key
  before `group_sep`, e.g. params/ and opt_state/ of a train state), then the total."""
  items = sorted(items)
  if limit is None:
    return '; '.join(items)
  groups: dict[str, list[str]] = {}
  for item in items:
    groups.setdefault(item.split(group_sep)[0] if group_sep else '', []).append(item)
  shown = [item for group in groups.values() for item in group[:limit]]
  return '; '.join(shown) + (f'; ... ({len(items)} in all)' if len(shown) < len(items) else '')


def describe_differences(found: Mapping[str, tuple], wanted: Mapping[str, tuple], *,
                         found_name: str = 'file', wanted_name: str = 'model',
                         limit: int | None = None, group_sep: str | None = None) -> list[str]:
  """One line per kind of difference between two key -> shape layouts: missing keys (wanted, not
  found), unexpected keys (found, not wanted), shape mismatches; [] if they agree. `limit` caps
  the keys listed per line, per group of keys if `group_sep` is given (see `_sample`)."""
  missing = set(wanted) - set(found)
  unexpected = set(found) - set(wanted)
  mismatched = [f'{k}: {found_name} {tuple(found[k])}, {wanted_name} {tuple(wanted[k])}'
                for k in set(found) & set(wanted) if tuple(found[k]) != tuple(wanted[k])]
  return [f'{title} ({len(items)}): {_sample(items, limit, group_sep)}'
          for title, items in (('missing keys', missing), ('unexpected keys', unexpected),
                               ('shape mismatches', mismatched)) if items]


# --------------------------------------------------------------------------------------------------
# Pytrees <-> the nested string-keyed dicts that Orbax stores.

def _key_name(key) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  raise TypeError(f'unsupported pytree key {key!r}')


def _is_prng_key(x) -> bool:
  return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_data_like(x):
  """The uint32 array (or its abstract shape) that stores a typed PRNG key."""
  if isinstance(x, jax.ShapeDtypeStruct):
    out = jax.eval_shape(jax.random.key_data, x)
    return jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=x.sharding)
  return jax.random.key_data(x)


def path_names(path) -> list[str]:
  """Pytree path -> key names, without the trailing `.value` of an nnx Variable."""
  names = [_key_name(k) for k in path]
  if len(names) > 1 and names[-1] == 'value' and isinstance(path[-1], jax.tree_util.GetAttrKey):
    names = names[:-1]
  return names


def to_nested_dict(tree: Any) -> dict:
  """Any pytree (nnx.State, optax states, dataclasses) -> nested dict with string keys."""
  out: dict = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = path_names(path)
    node = out
    for name in names[:-1]:
      node = node.setdefault(name, {})
    if names[-1] in node:
      raise ValueError(f'duplicate checkpoint key {"/".join(names)}')
    node[names[-1]] = _key_data_like(leaf) if _is_prng_key(leaf) else leaf
  return out


def from_nested_dict(nested: dict, like: Any) -> Any:
  """Inverse of `to_nested_dict`, given a tree with the target structure (arrays or abstract)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(like)
  leaves = []
  for path, ref in flat:
    node = nested
    for name in path_names(path):
      node = node[name]
    leaves.append(jax.random.wrap_key_data(node) if _is_prng_key(ref) else node)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def flatten(tree: Any, sep: str = '/') -> dict[str, Any]:
  """A nested dict (or any pytree) -> {'a/b/c': leaf}."""
  return {sep.join(path_names(path)): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def nest(flat: Mapping[str, Any], sep: str = '.') -> dict[str, Any]:
  """{'a.b.c': leaf} -> a nested dict."""
  out: dict[str, Any] = {}
  for key, value in flat.items():
    *parents, leaf = key.split(sep)
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out
