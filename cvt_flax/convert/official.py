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

from cvt_flax.errors import CvtFlaxError
from cvt_flax.models.weights import describe_differences, flat_variables, shapes

_LEAF_RENAMES = {'scale': 'weight', 'mean': 'running_mean', 'var': 'running_var',
                 'kernel': 'weight'}


class ConversionError(CvtFlaxError, ValueError):
  """A state dict does not fit the model. The message lists every offending key."""


def _torch_name(key: str) -> str:
  *parents, leaf = key.split('.')
  return '.'.join([*parents, _LEAF_RENAMES.get(leaf, leaf)])


def _leaf(key: str) -> str:
  return key.rsplit('.', 1)[-1]


def _to_torch_layout(leaf: str, x: np.ndarray) -> np.ndarray:
  if leaf == 'kernel':
    return np.transpose(x, (3, 2, 0, 1)) if x.ndim == 4 else x.T
  return x


def _from_torch_layout(leaf: str, x: np.ndarray) -> np.ndarray:
  if leaf == 'kernel':
    return np.transpose(x, (2, 3, 1, 0)) if x.ndim == 4 else x.T
  return x


def _torch_shape(key: str, shape) -> tuple:
  return tuple(_to_torch_layout(_leaf(key), np.zeros(shape, np.int8)).shape)


def to_official_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """Flax CvT -> official state dict (numpy arrays; `num_batches_tracked` as int64).

  For an abstract model (`nnx.eval_shape`) the values are `jax.ShapeDtypeStruct`s in torch layout.
  """
  out = {}
  for key, var in flat_variables(model).items():
    value = var.get_value()
    if isinstance(value, jax.ShapeDtypeStruct):  # a model from nnx.eval_shape: shapes only
      out[_torch_name(key)] = jax.ShapeDtypeStruct(_torch_shape(key, value.shape), value.dtype)
      continue
    x = np.asarray(jax.device_get(value))
    if _leaf(key) == 'num_batches_tracked':
      x = x.astype(np.int64)
    out[_torch_name(key)] = _to_torch_layout(_leaf(key), x)
  return out


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
  the bad tensors, and the model is left untouched.
  """
  variables = {_torch_name(k): (k, var) for k, var in flat_variables(model).items()}
  wanted = {name: _torch_shape(key, var.get_value().shape) for name, (key, var) in variables.items()}
  lines = describe_differences(shapes(state_dict), wanted, found_name='file', wanted_name='model')
  problems = []
  for name, (key, var) in variables.items():
    if name in state_dict and tuple(np.shape(state_dict[name])) == wanted[name]:
      problems += _check_values(name, np.asarray(state_dict[name]), np.dtype(var.get_value().dtype))
  if problems:
    lines.append(f'bad tensors ({len(problems)}):\n    ' + '\n    '.join(problems))
  if lines:
    raise ConversionError(f'{source} does not fit the model:\n  ' + '\n  '.join(lines))
  for name, (key, var) in variables.items():
    value = _from_torch_layout(_leaf(key), np.asarray(state_dict[name]))
    var.set_value(jnp.asarray(value.astype(var.get_value().dtype)))
  return model
