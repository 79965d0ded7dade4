"""The official state-dict layout <-> a Flax CvT: one name table, strict in both directions.

Flax attribute paths mirror the official keys, so the table is a rename of the leaf plus a layout
change for kernels:

  flax leaf                 torch leaf            layout
  conv `kernel` (k,k,I,O)   `weight` (O,I,k,k)    transpose (3, 2, 0, 1)
  linear `kernel` (I,O)     `weight` (O,I)        transpose
  norm `scale`              `weight`
  BatchNorm `mean`/`var`    `running_mean`/`running_var`
  everything else           same name
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_LEAF_RENAMES = {'scale': 'weight', 'mean': 'running_mean', 'var': 'running_var',
                 'kernel': 'weight'}


class ConversionError(ValueError):
  """A state dict does not fit the model. The message lists every offending key."""


def _torch_name(path) -> str:
  parts = [str(p) for p in path]
  parts[-1] = _LEAF_RENAMES.get(parts[-1], parts[-1])
  return '.'.join(parts)


def _to_torch_layout(leaf: str, x: np.ndarray) -> np.ndarray:
  if leaf == 'kernel':
    return np.transpose(x, (3, 2, 0, 1)) if x.ndim == 4 else x.T
  return x


def _from_torch_layout(leaf: str, x: np.ndarray) -> np.ndarray:
  if leaf == 'kernel':
    return np.transpose(x, (2, 3, 1, 0)) if x.ndim == 4 else x.T
  return x


def _model_variables(model: nnx.Module):
  """(path, Variable) of every parameter and batch statistic (RNG state is not part of the weights)."""
  state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
  return [(tuple(path), var) for path, var in nnx.to_flat_state(state)]


def to_official_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """Flax CvT -> official state dict (numpy arrays; `num_batches_tracked` as int64).

  For an abstract model (`nnx.eval_shape`) the values are `jax.ShapeDtypeStruct`s in torch layout.
  """
  out = {}
  for path, var in _model_variables(model):
    if isinstance(var.get_value(), jax.ShapeDtypeStruct):  # a model from nnx.eval_shape: shapes only
      shape = _to_torch_layout(str(path[-1]), np.zeros(var.get_value().shape, np.int8)).shape
      out[_torch_name(path)] = jax.ShapeDtypeStruct(shape, var.get_value().dtype)
      continue
    x = np.asarray(jax.device_get(var.get_value()))
    if path[-1] == 'num_batches_tracked':
      x = x.astype(np.int64)
    out[_torch_name(path)] = _to_torch_layout(str(path[-1]), x)
  return out


def abstract_model(cfg) -> nnx.Module:
  """A CvT of `cfg` with shapes only (no parameter initialisation), to be filled by a loader and
  finished with `finish_abstract_model`; this skips the random init of weights about to be replaced
  (seconds for CvT-13, and W24's 1.1 GB), and lets a bad file fail before any allocation."""
  from cvt_flax.models import CvT  # pylint: disable=g-import-not-at-top
  return nnx.eval_shape(lambda: CvT(cfg, rngs=nnx.Rngs(0)))


def finish_abstract_model(model: nnx.Module, seed: int = 0) -> nnx.Module:
  """Gives the filled `abstract_model` concrete dropout RNG state (fresh keys from `seed`, counts 0).

  Raises if anything else is still abstract (a variable no loader filled).
  """
  rng_vars = [var for _, var in nnx.to_flat_state(nnx.state(model, nnx.RngState))]
  keys = jax.random.split(jax.random.key(seed), max(len(rng_vars), 1))
  for i, var in enumerate(rng_vars):
    if isinstance(var, nnx.RngKey):
      var.set_value(keys[i])
    else:
      shape = var.get_value()
      var.set_value(jnp.zeros(shape.shape, shape.dtype))
  left = [path for path, var in nnx.to_flat_state(nnx.state(model))
          if isinstance(var.get_value(), jax.ShapeDtypeStruct)]
  if left:
    raise ValueError(f'abstract model variables left unfilled: {left[:5]}')
  return model


def _check_values(name: str, x: np.ndarray, target_dtype) -> list[str]:
  if np.issubdtype(target_dtype, np.floating):
    if not np.issubdtype(x.dtype, np.floating):
      return [f'{name}: dtype {x.dtype}, expected a floating-point tensor']
    if not np.all(np.isfinite(x)):
      return [f'{name}: contains {int(np.sum(~np.isfinite(x)))} NaN/Inf values']
  elif not np.issubdtype(x.dtype, np.integer):
    return [f'{name}: dtype {x.dtype}, expected an integer tensor']
  return []


def load_official_state_dict(model: nnx.Module, state_dict: Mapping[str, np.ndarray], *,
                             source: str = 'state dict') -> nnx.Module:
  """Fills `model` in place from an official state dict; all-or-nothing and strict.

  Every source tensor must be used, every target filled, every shape and dtype must fit and floats
  must be finite; otherwise a ConversionError lists the missing, unexpected and mis-shaped keys and
  the model is left untouched.
  """
  variables = _model_variables(model)
  expected = {_torch_name(p): (p, v) for p, v in variables}
  missing = sorted(set(expected) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(expected))
  problems = []
  new_values = {}
  for name, (path, var) in expected.items():
    if name not in state_dict:
      continue
    x = np.asarray(state_dict[name])
    leaf = str(path[-1])
    want = tuple(_to_torch_layout(leaf, np.zeros(var.get_value().shape, np.int8)).shape)
    if tuple(x.shape) != want:
      problems.append(f'{name}: shape {tuple(x.shape)}, model expects {want}')
      continue
    problems += _check_values(name, x, np.dtype(var.get_value().dtype))
    new_values[path] = _from_torch_layout(leaf, x).astype(var.get_value().dtype)
  if missing or unexpected or problems:
    lines = [f'{source} does not fit the model:']
    if missing:
      lines.append(f'  missing keys ({len(missing)}): {", ".join(missing)}')
    if unexpected:
      lines.append(f'  unexpected keys ({len(unexpected)}): {", ".join(unexpected)}')
    if problems:
      lines.append(f'  bad tensors ({len(problems)}):\n    ' + '\n    '.join(problems))
    raise ConversionError('\n'.join(lines))
  for path, var in variables:
    var.set_value(jnp.asarray(new_values[path]))
  return model
