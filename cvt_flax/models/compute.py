"""How a CvT computes: dtype and implementation choices per platform. Never what it computes.

A `Compute` is a runtime option of a model, like a jit flag: every choice gives the same function
(up to float summation order), so it is not part of the architecture (`CvTConfig`), is never
written into a checkpoint and never compared on resume. 'auto' choices are resolved for the
platform of the devices the model will run on (`platform`, default JAX's default backend): the
CPU-only paths of `cvt_flax.models.cpu` on 'cpu', the plain XLA paths everywhere else.

  dtype           'float32' | 'bfloat16' compute; parameters stay float32, LayerNorm, BatchNorm
                  statistics and softmax run in float32 either way.
  dwconv_impl     'xla' (one grouped conv) | 'shifts' (CPU: shifted multiply-adds)
  attention_impl  'softmax' (official order) | 'deferred' (normalise after the product with v) |
                  'blocked' (CPU: 'deferred' in cache-sized blocks)
  fusion_barrier  CPU: stop XLA:CPU's fusion of the residual gradient across blocks
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax

from cvt_flax.models import cpu, layers

DTYPES = ('float32', 'bfloat16')
DWCONV_IMPLS = ('auto', 'xla', 'shifts')
ATTENTION_IMPLS = ('auto', 'softmax', 'deferred', 'blocked')
# The choice of 'auto' per platform; platforms not listed take 'default'.
_AUTO = {
    'cpu': {'dwconv_impl': 'shifts', 'attention_impl': 'blocked', 'fusion_barrier': True},
    'default': {'dwconv_impl': 'xla', 'attention_impl': 'deferred', 'fusion_barrier': False},
}


@dataclasses.dataclass(frozen=True)
class Compute:
  """The compute settings of a model (see the module docstring). Hashable: a static jit argument."""
  dtype: str = 'float32'
  dwconv_impl: str = 'auto'
  attention_impl: str = 'auto'
  fusion_barrier: bool | None = None  # None = 'auto'
  platform: str | None = None  # what 'auto' is resolved for; None = jax.default_backend()

  def __post_init__(self):
    for field, allowed in (('dtype', DTYPES), ('dwconv_impl', DWCONV_IMPLS),
                           ('attention_impl', ATTENTION_IMPLS)):
      if getattr(self, field) not in allowed:
        raise ValueError(f'compute setting {field}={getattr(self, field)!r} is not one of '
                         f'{allowed}.')

  def resolved(self) -> 'Compute':
    """The same settings with every 'auto' replaced by the choice for the platform."""
    platform = self.platform or jax.default_backend()
    auto = _AUTO.get(platform, _AUTO['default'])
    return dataclasses.replace(
        self, platform=platform,
        dwconv_impl=auto['dwconv_impl'] if self.dwconv_impl == 'auto' else self.dwconv_impl,
        attention_impl=(auto['attention_impl'] if self.attention_impl == 'auto'
                        else self.attention_impl),
        fusion_barrier=auto['fusion_barrier'] if self.fusion_barrier is None else self.fusion_barrier)

  @property
  def jnp_dtype(self):
    return jax.numpy.dtype(self.dtype)


def make_compute(compute: Compute | None = None, **settings) -> Compute:
  """A resolved Compute from a Compute and/or keyword settings (None values are ignored)."""
  base = compute or Compute()
  return dataclasses.replace(base, **{k: v for k, v in settings.items() if v is not None}).resolved()


def depthwise_conv(compute: Compute, x, kernel, stride: int, padding: int):
  """Depthwise conv of NHWC `x` with a (k, k, 1, C) kernel and explicit symmetric zero padding."""
  if compute.dwconv_impl == 'shifts':
    return cpu.depthwise_conv_shifts(x, kernel, stride, padding)
  return layers.depthwise_conv_xla(x, kernel, stride, padding)


def attention(compute: Compute, q, k, v, scale, *, dropout=None, record=None):
  """softmax(q k^T * scale) v for (b, heads, tokens, d) q, k, v; scores and softmax in float32.

  Attention dropout or recording the probabilities (`attention_maps`) needs them materialised,
  so either one takes the 'softmax' path.
  """
  impl = compute.attention_impl
  if impl == 'softmax' or dropout is not None or record is not None:
    return layers.softmax_attention(q, k, v, scale, dropout=dropout, record=record)
  if impl == 'blocked':
    return cpu.attention(q, k, v, scale)
  return layers.deferred_attention(q, k, v, scale)[0]


def block_boundary(compute: Compute, x):
  """What happens to the residual stream between two blocks: nothing, except on CPU."""
  return cpu.gradient_fusion_barrier(x) if compute.fusion_barrier else x


def compiler_options(platform: str | None = None) -> dict[str, Any] | None:
  """XLA options for every jit of a CvT computation on `platform` (default: JAX's default
  backend): `jax.jit(fn, compiler_options=compiler_options())`. None = XLA's defaults."""
  if (platform or jax.default_backend()) == 'cpu':
    return dict(cpu.COMPILER_OPTIONS)
  return None
