"""Pytrees <-> the nested string-keyed dicts that Orbax stores, so files stay readable by plain
Orbax without cvt-flax's classes.

Train states and model weights are stored as nested dicts with string keys following the pytree
paths (`params/stage0/blocks/0/...`, `opt_state/0/mu/...`); the `.value` of nnx Variables is left
out of the paths, typed PRNG keys are stored as their raw uint32 key data.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp


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
