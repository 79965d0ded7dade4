"""A model's weights as a flat mapping, and the one report of how two weight layouts differ.

Every loader and checkpoint reader names a model's tensors by their dotted attribute path
('stage0.blocks.0.attn.proj_q.kernel'), and every mismatch between what a file holds and what a
model needs is reported by `describe_differences`, so all errors read the same.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
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
