"""How a CvT computes: dtype and implementation choices per platform. Never what it computes.

A `Compute` is a runtime option of a model, like a jit flag: every choice gives the same function
(up to float summation order), so it is not part of the architecture (`CvTConfig`), is never
written into a checkpoint and never compared on resume. 'auto' choices are resolved for the
platform of the devices the model will run on (`platform`, default JAX's default backend): the
CPU-only paths of `cvt_flax.models.cpu` on 'cpu', the plain XLA paths everywhere else.

  dtype           'float32' | 'bfloat16' compute; parameters stay float32, LayerNorm, BatchNorm
                  statistics and softmax run in float32 either way.
  dwconv_impl     'xla' (one grouped conv) | 'shifts' (CPU: shifted multiply-adds) | 'fused'
                  (TPU: the three `dw_bn` projections' convolutions of a block in Pallas kernels
                  that read the token map once, with their BatchNorms in training,
                  `cvt_flax.models.tpu.depthwise_conv`, for 3x3 kernels
                  with padding 1 on maps that fit in VMEM, at 224 px the last stage's; others
                  take 'xla')
  attention_impl  'softmax' (official order) | 'deferred' (normalise after the product with v) |
                  'recompute' ('deferred' whose backward pass recomputes the probabilities) |
                  'blocked' (CPU: 'deferred' in cache-sized blocks) | 'xla_fused' / 'cudnn'
                  (`jax.nn.dot_product_attention` with the official scale width**-0.5, XLA's or
                  cuDNN's fused kernel; cuDNN only takes bf16/fp16 and head dims that are
                  multiples of 8 up to 128, other calls run 'deferred') | 'flash' (TPU: Pallas
                  kernels that keep the scores in VMEM, `cvt_flax.models.tpu`: where an image's
                  keys fit in VMEM (every CvT stage at 224 px) the token-layout kernels
                  (`tpu.token_attention`: the heads stay side by side in the channels, no padded
                  keys);
                  else the flash kernels in blocks of 128 keys, for calls with at least one
                  such block; shorter ones take 'recompute')
  mlp_impl        'xla' (LayerNorm, two linear layers, residual add) | 'fused' (TPU: Pallas
                  kernels for the whole second half of a block that keep the normalised tokens and
                  the hidden layer in VMEM and recompute them in the backward pass,
                  `cvt_flax.models.tpu.mlp_residual`, for layers whose weights fit in VMEM, without
                  dropout; others take 'xla')
  fusion_barrier  CPU: stop XLA:CPU's fusion of the residual gradient across blocks
  per_token_linear  CPU: linear layers applied to (batch * tokens, channels) rather than (batch,
                  tokens, channels): the weight gradient then contracts one axis, which XLA:CPU
                  does without first copying the activation transposed. Not on TPU, where the
                  tokens (3,137, 197, ...) are not a multiple of the 8-row tiles, so merging them
                  with the batch moves data: the CvT-13 train step on v5e-8 read and wrote a third
                  more bytes with it (`python -m cvt_flax.aot`; benchmarks/RESULTS.md).
  remat           'none' | 'block' (recompute each block in the backward pass, keeping only its
                  input) | a `jax.checkpoint_policies` name kept per block ('dots_saveable',
                  'dots_with_no_batch_dims_saveable', ...): less memory for W24 or large batches
  platform        what 'auto' is resolved for (None: JAX's default backend)
  mesh            the devices the batch is split over, for the kernels XLA cannot partition

A training config holds `dtype`, the three `*_impl` and `remat` under the same names
(`Compute.from_config` reads and checks them; CONFIG_FIELDS). Which path each op then takes
depends on its shapes too (a kernel's VMEM plan, cuDNN's dtypes and head sizes): `conv_path`,
`attention_path` and `mlp_path` decide it, for the ops here and for `choices`, which tells per
stage what runs and why (the trainer's first log lines and WORKDIR/compute.json, `python -m
cvt_flax.aot`).

'auto' per platform: CPU 'shifts' + 'blocked' + the barrier + per-token linears; GPU 'xla' +
'cudnn' for bf16/fp16 ('deferred' for float32, and before sm_80: a T4); TPU the 'fused'
convolutions + 'flash' + the 'fused' MLP; others 'xla' + 'deferred'. cuDNN's attention gets even
lengths: a cls token's odd ones are padded by one and masked
(`layers.even_length_attention`), which moves fewer bytes on an H100 than XLA's attention for
those stages (benchmarks/RESULTS.md).
The TPU choices come from XLA:TPU's own cost analysis of the compiled CvT-13 train step
(`python -m cvt_flax.aot`, benchmarks/RESULTS.md): 'flash' is estimated faster than 'recompute'
(which moves fewer bytes than 'deferred'), the 'fused' MLP than 'xla', and 'shifts' moves more
than one grouped conv; the 'fused' convolutions move fewer than 'xla'. On a mesh the kernels need
the `mesh` setting (the trainer and `evaluate` set it): XLA cannot split a Pallas kernel over
devices by itself, and without it the compile fails on a sharded batch. Every kernel is
single-device; `tpu.sharded.on_batch_shards` runs each op once per shard of the batch, and sums
its weight gradients over the devices.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from flax import nnx

from cvt_flax.errors import ConfigError
from cvt_flax.models import cpu, layers, tpu

DTYPES = ('float32', 'bfloat16')
DWCONV_IMPLS = ('auto', 'xla', 'shifts', 'fused')
ATTENTION_IMPLS = ('auto', 'softmax', 'deferred', 'recompute', 'blocked', 'xla_fused', 'cudnn',
                   'flash')
MLP_IMPLS = ('auto', 'xla', 'fused')
REMAT = ('none', 'block', 'dots_saveable', 'dots_with_no_batch_dims_saveable',
         'everything_saveable', 'nothing_saveable')
_ALLOWED = {'dtype': DTYPES, 'dwconv_impl': DWCONV_IMPLS, 'attention_impl': ATTENTION_IMPLS,
            'mlp_impl': MLP_IMPLS, 'remat': REMAT}
# The settings a training config holds under the same names (`Compute.from_config`); the CPU's
# switches stay 'auto', the platform and mesh are the run's.
CONFIG_FIELDS = tuple(_ALLOWED)
# The choice of 'auto' per platform; platforms not listed take 'default'.
_AUTO = {
    'cpu': {'dwconv_impl': 'shifts', 'attention_impl': 'blocked', 'mlp_impl': 'xla',
            'fusion_barrier': True, 'per_token_linear': True},
    'gpu': {'dwconv_impl': 'xla', 'attention_impl': 'cudnn', 'mlp_impl': 'xla',
            'fusion_barrier': False, 'per_token_linear': False},
    'tpu': {'dwconv_impl': 'fused', 'attention_impl': 'flash', 'mlp_impl': 'fused',
            'fusion_barrier': False, 'per_token_linear': False},
    'default': {'dwconv_impl': 'xla', 'attention_impl': 'deferred', 'mlp_impl': 'xla',
                'fusion_barrier': False, 'per_token_linear': False},
}
_PLATFORM_ALIASES = {'cuda': 'gpu', 'rocm': 'gpu'}  # jax.export's names for GPU platforms
CUDNN_DTYPES = ('bfloat16', 'float16')
# cuDNN's fused (flash) attention runs on Ampere (sm_80) and later: not on a T4 (sm_75).
CUDNN_MIN_CAPABILITY = 8.0


@dataclasses.dataclass(frozen=True)
class Compute:
  """The compute settings of a model (see the module docstring). Hashable: a static jit argument."""
  dtype: str = 'float32'
  dwconv_impl: str = 'auto'
  attention_impl: str = 'auto'
  mlp_impl: str = 'auto'
  fusion_barrier: bool | None = None  # None = 'auto'
  per_token_linear: bool | None = None  # None = 'auto'
  remat: str = 'none'
  platform: str | None = None  # what 'auto' is resolved for; None = jax.default_backend()
  # The devices the batch is split over, for kernels XLA cannot partition itself ('flash' runs
  # per shard of the batch under it); None: one device, or no such kernel.
  mesh: jax.sharding.Mesh | None = None

  def __post_init__(self):
    _check_allowed(lambda field: getattr(self, field),
                   'compute setting {field}={value!r} is not one of {allowed}.')

  @classmethod
  def from_config(cls, config, *, platform: str | None = None,
                  mesh: jax.sharding.Mesh | None = None) -> 'Compute':
    """The resolved settings of a training config (its CONFIG_FIELDS), for `platform` (default: the
    platform of `mesh`'s devices, else JAX's default backend). A value that is not allowed is a
    ConfigError naming `config.<field>`."""
    check_config(config)
    return make_compute(cls(**{field: config[field] for field in CONFIG_FIELDS}),
                        platform=platform, mesh=mesh)

  def resolved(self) -> 'Compute':
    """The same settings with every 'auto' replaced by the choice for the platform (unset: the
    platform of the mesh's devices, else JAX's default backend)."""
    platform = self.platform or (self.mesh.devices.flat[0].platform if self.mesh is not None
                                 else jax.default_backend())
    auto = dict(_AUTO.get(_PLATFORM_ALIASES.get(platform, platform), _AUTO['default']))
    if auto['attention_impl'] == 'cudnn' and self.dtype not in CUDNN_DTYPES:
      auto['attention_impl'] = 'deferred'  # cuDNN's fused attention has no float32 kernel
    chosen = {field: value for field, value in auto.items()
              if getattr(self, field) in ('auto', None)}  # None: 'auto' of the boolean switches
    return dataclasses.replace(self, platform=platform, **chosen)

  @property
  def jnp_dtype(self):
    return jax.numpy.dtype(self.dtype)


def _check_allowed(value_of, message: str) -> None:
  """ConfigError (`message` formatted with field, value, allowed) for the first setting whose
  value `value_of(field)` is not one of _ALLOWED's."""
  for field, allowed in _ALLOWED.items():
    value = value_of(field)
    if value not in allowed:
      raise ConfigError(message.format(field=field, value=value, allowed=allowed))


def check_config(config) -> None:
  """A training config's compute settings (CONFIG_FIELDS), checked: a ConfigError naming
  `config.<field>` for a value that is not allowed."""
  _check_allowed(config.__getitem__, 'config.{field}: {value!r} is not one of {allowed}')


def make_compute(compute: Compute | None = None, **settings) -> Compute:
  """A resolved Compute from a Compute and/or keyword settings (None values are ignored)."""
  base = compute or Compute()
  return dataclasses.replace(base, **{k: v for k, v in settings.items() if v is not None}).resolved()


def depthwise_conv(compute: Compute, x, kernel, stride: int, padding: int):
  """Depthwise conv of NHWC `x` with a (k, k, 1, C) kernel and explicit symmetric zero padding."""
  if compute.dwconv_impl == 'shifts':
    return cpu.depthwise_conv_shifts(x, kernel, stride, padding)
  return layers.depthwise_conv_xla(x, kernel, stride, padding)


def conv_projections(compute: Compute, projections, fmap):
  """The `dw_bn` projections (each a `ConvProjection`: depthwise conv, then BatchNorm) of the NHWC
  token map `fmap`, one output per projection."""
  convs = [p.conv for p in projections]
  size = convs[0].kernel.shape[0]
  strides = tuple(c.stride for c in convs)
  path, _ = conv_path(compute, fmap.shape, size, strides, [c.padding for c in convs])
  if path == 'fused':
    dtype = compute.jnp_dtype
    # The kernels as XLA's convolution takes them (rounded to the compute dtype), taps in rows.
    weights = jax.numpy.stack([c.kernel.get_value().astype(dtype).astype(jax.numpy.float32)
                               .reshape(size * size, -1) for c in convs])
    norms = [p.bn for p in projections]
    with jax.named_scope('conv_proj'):
      if any(norm.use_running_average for norm in norms):
        outs = tpu.sharded.on_batch_shards(
            compute.mesh, lambda x, w: tpu.depthwise_conv.depthwise_convs(x, w, strides),
            (fmap.astype(dtype), weights), split_in=1)
        return [norm(out) for norm, out in zip(norms, outs)]
      # Training: the BatchNorms' statistics (over the whole batch) and both passes inside the
      # kernels.
      scale, bias = (jax.numpy.stack([getattr(n, name).get_value() for n in norms])
                     for name in ('scale', 'bias'))
      axes = tpu.sharded.batch_axes(compute.mesh)
      outs, means, variances = tpu.sharded.on_batch_shards(
          compute.mesh, lambda *a: tpu.depthwise_conv.depthwise_convs_batch_norm(
              *a, strides, norms[0].epsilon, axes),
          (fmap.astype(dtype), weights, scale, bias), split_in=1, split_out=(True, False, False))
      for norm, out, mean, var in zip(norms, outs, means, variances):
        norm.track(mean, var, math.prod(out.shape[:-1]))
      return [out.astype(norm.dtype) for norm, out in zip(norms, outs)]
  return [p(fmap) for p in projections]


def attention(compute: Compute, q, k, v, scale, *, dropout=None, record=None):
  """softmax(q k^T * scale) v for (b, heads, tokens, d) q, k, v; scores and softmax in float32.

  Attention dropout or recording the probabilities (`attention_maps`) needs them materialised,
  so either one takes the 'softmax' path.
  """
  if dropout is not None or record is not None:
    return layers.softmax_attention(q, k, v, scale, dropout=dropout, record=record)
  path, _ = _head_attention_path(compute, k.shape[2], q.shape[-1], q.dtype.name)
  if path == 'softmax':
    return layers.softmax_attention(q, k, v, scale)
  if path == 'blocked':
    return cpu.attention(q, k, v, scale)
  if path == 'flash':
    return tpu.sharded.on_batch_shards(
        compute.mesh, lambda q, k, v: tpu.flash_attention.flash_attention(q, k, v, scale),
        (q, k, v), split_in=3)
  if path == 'recompute':
    return layers.recompute_attention(q, k, v, scale)
  if path in ('xla_fused', 'cudnn'):
    return _fused_attention(q, k, v, scale, 'xla' if path == 'xla_fused' else 'cudnn')
  return layers.deferred_attention(q, k, v, scale)[0]


def multi_head_attention(compute: Compute, q, k, v, heads: int, scale, *, dropout=None,
                         record=None):
  """Attention of (b, tokens, heads * d) q, k, v whose channels hold the heads side by side, the
  output in the same layout. 'flash' takes `tpu.token_attention` where an image's keys fit in VMEM
  (no head transposes, no padded keys); everything else splits the heads out for `attention`."""
  b, n, c = q.shape
  if (dropout is None and record is None and attention_path(
      compute, b, n, k.shape[1], c, heads, q.dtype.name)[0] == 'token_attention'):
    return tpu.sharded.on_batch_shards(
        compute.mesh, lambda q, k, v: tpu.token_attention.token_attention(q, k, v, heads, scale),
        (q, k, v), split_in=3)
  split = lambda t: t.reshape(b, t.shape[1], heads, c // heads).transpose(0, 2, 1, 3)
  out = attention(compute, split(q), split(k), split(v), scale, dropout=dropout, record=record)
  return out.transpose(0, 2, 1, 3).reshape(b, n, c)


def _per_device(compute: Compute, batch: int) -> int:
  return batch // (compute.mesh.size if compute.mesh is not None else 1)


def mlp_residual(compute: Compute, norm, mlp, drop_path, x):
  """`x + drop_path(mlp(norm(x)))`, the second half of a block: a LayerNorm, an MLP (`fc1`, `act`,
  `fc2`, `drop`) and `drop_path` (stochastic depth, an `nnx.Dropout` over whole images)."""
  width, hidden = mlp.fc1.kernel.shape
  if ((mlp.drop.rate == 0 or mlp.drop.deterministic)
      and mlp_path(compute, x.shape[1], width, hidden, x.dtype.name)[0] == 'fused'):
    # Stochastic depth's factor per image (0 or 1/keep; 1 when inactive), drawn as for `x`.
    scale = drop_path(jax.numpy.ones((x.shape[0], 1, 1), jax.numpy.float32)).reshape(-1)
    params = (norm.scale, norm.bias, mlp.fc1.kernel, mlp.fc1.bias, mlp.fc2.kernel, mlp.fc2.bias)
    with jax.named_scope('mlp'):
      return tpu.sharded.on_batch_shards(
          compute.mesh, lambda *a: tpu.mlp_residual.fused_mlp_block(*a, mlp.act, norm.epsilon),
          (x, scale, *(p.get_value() for p in params)), split_in=2)
  with jax.named_scope('layer_norm'):
    y = norm(x)
  return x + drop_path(mlp(y))


# ----------------------------------------------------------------------------------------------------
# Which path each op takes for given shapes, and why: the one decision, used by the ops above and
# shown by `choices` (the trainer's log and workdir, `python -m cvt_flax.aot`). Paths that need
# the probabilities (attention dropout, `attention_maps`) or MLP dropout take XLA's path whatever
# these say.

def conv_path(compute: Compute, fmap_shape, kernel_size: int, strides, paddings) -> tuple[str, str]:
  """(path, why) of a block's `dw_bn` convolutions on an NHWC map of `fmap_shape`."""
  b, h, w, c = fmap_shape
  if compute.dwconv_impl == 'fused':
    if not tpu.depthwise_conv.supported(kernel_size, strides, paddings):
      return 'xla', "XLA's grouped convolution: the kernels take 3x3 convolutions with padding 1"
    images, itemsize = _per_device(compute, b), jax.numpy.dtype(compute.jnp_dtype).itemsize
    if not tpu.depthwise_conv.fits(images, h, w, c, itemsize):
      return 'xla', (f"XLA's grouped convolution: a {h}x{w}x{c} map of {images} images per "
                     "device does not fit the kernels' VMEM plan")
    rows = tpu.depthwise_conv.row_block(images, h, w, c, itemsize)
    if rows is not None:
      return 'fused', ('Pallas kernels in blocks of rows with a halo (statistics, forward, '
                       f'BatchNorm sums, backward: {", ".join(map(str, rows))}), '
                       'tpu.depthwise_conv')
    return 'fused', 'Pallas kernels reading the map once, tpu.depthwise_conv'
  if compute.dwconv_impl == 'shifts':
    return 'shifts', 'shifted multiply-adds, the CPU path'
  return 'xla', "XLA's grouped convolution"


def attention_path(compute: Compute, batch: int, queries: int, keys: int, width: int, heads: int,
                   dtype: str) -> tuple[str, str]:
  """(path, why) of attention of `queries` against `keys` tokens, `heads` heads over `width`."""
  itemsize = jax.numpy.dtype(dtype).itemsize
  if (compute.attention_impl == 'flash'
      and tpu.token_attention.fits(_per_device(compute, batch), queries, keys, width, itemsize)):
    return 'token_attention', "Pallas kernels on the token layout, the image's keys in VMEM"
  path, why = _head_attention_path(compute, keys, width // heads, dtype)
  if compute.attention_impl == 'flash':
    why = f"the image's keys do not fit VMEM whole: {why}"
  return path, why


def _head_attention_path(compute: Compute, keys: int, head_dim: int, dtype: str) -> tuple[str, str]:
  impl = compute.attention_impl
  if impl == 'flash':
    if keys >= tpu.flash_attention.BLOCK_K:
      return 'flash', f'Pallas flash attention in blocks of {tpu.flash_attention.BLOCK_K} keys'
    return 'recompute', (f'XLA, probabilities recomputed in the backward pass: {keys} keys are '
                         'fewer than one flash block')
  if impl == 'cudnn':
    refused = _cudnn_attention_refuses(compute, dtype, head_dim)
    if not refused:
      return 'cudnn', "cuDNN's fused attention"
    return 'deferred', f'XLA, normalised after the product with v: {refused}'
  return impl, {'softmax': 'XLA, the official order', 'deferred': 'XLA, normalised after the '
                'product with v', 'recompute': 'XLA, probabilities recomputed in the backward pass',
                'blocked': 'XLA in blocks of queries sized to the L2 cache, the CPU path',
                'xla_fused': "XLA's fused attention (jax.nn.dot_product_attention)"}[impl]


def gpu_capability(compute: Compute) -> float | None:
  """The CUDA compute capability of the GPU `compute` runs on (its mesh's devices, else JAX's
  default device): 9.0 for an H100; None off a GPU or where the device does not say."""
  if compute.mesh is not None:
    device = compute.mesh.devices.flat[0]
  elif jax.default_backend() in ('gpu', 'cuda'):
    device = jax.devices()[0]
  else:
    return None
  capability = getattr(device, 'compute_capability', None)
  return float(capability) if capability else None


def _cudnn_attention_refuses(compute: Compute, dtype: str, head_dim: int) -> str:
  """Why cuDNN's fused attention does not take this GPU, dtype or head size ('' if it does)."""
  capability = gpu_capability(compute)
  if capability is not None and capability < CUDNN_MIN_CAPABILITY:
    return f'cuDNN fused attention needs sm_80 or later, this GPU is sm_{capability * 10:.0f}'
  if dtype not in CUDNN_DTYPES or head_dim % 8 or head_dim > 128:
    return (f'cuDNN takes bf16/fp16 and head dims that are multiples of 8 up to 128, not {dtype} '
            f'x {head_dim}')
  return ''


def mlp_path(compute: Compute, tokens: int, width: int, hidden: int, dtype: str) -> tuple[str, str]:
  """(path, why) of a block's second half (LayerNorm, MLP, residual add) on `tokens` tokens."""
  if compute.mlp_impl != 'fused':
    return 'xla', 'XLA'
  if not tpu.mlp_residual.fits(tokens, width, hidden, jax.numpy.dtype(dtype).itemsize):
    return 'xla', f"XLA: a {width}x{hidden} MLP's weights do not fit the kernels' VMEM plan"
  return 'fused', 'a Pallas kernel keeping the normalised tokens and the hidden layer in VMEM'


def _fused_attention(q, k, v, scale, implementation):
  """jax.nn.dot_product_attention on (b, heads, tokens, d) inputs (it takes (b, tokens, heads,
  d)), with CvT's explicit scale (the full width, not the head dim, as SDPA would default to).
  cuDNN's gets even lengths (`layers.even_length_attention`)."""
  q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
  if implementation == 'cudnn':
    out = layers.even_length_attention(q, k, v, scale, implementation)
  else:
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
  return out.transpose(0, 2, 1, 3)


def run_block(compute: Compute, block, x, h: int, w: int):
  """`block(x, h, w)`, rematerialised in the backward pass as `compute.remat` says."""
  if compute.remat == 'none':
    return block(x, h, w)
  policy = None if compute.remat == 'block' else getattr(jax.checkpoint_policies, compute.remat)
  return nnx.remat(lambda block, x: block(x, h, w), policy=policy)(block, x)


def token_linear(compute: Compute, fn, x):
  """`fn` (linear layers, elementwise ops) of (batch, tokens, channels) `x`: as one (batch *
  tokens, channels) matrix where `compute.per_token_linear` (the same function; see the module
  docstring)."""
  if not compute.per_token_linear:
    return fn(x)
  b, n, c = x.shape
  y = fn(x.reshape(b * n, c))
  return y.reshape(b, n, y.shape[-1])


def block_boundary(compute: Compute, x):
  """What happens to the residual stream between two blocks: nothing, except on CPU."""
  return cpu.gradient_fusion_barrier(x) if compute.fusion_barrier else x


def choices(compute: Compute, cfg, height: int, width: int, batch: int) -> list[dict[str, Any]]:
  """Per stage of a CvTConfig `cfg`, for `batch` images (over the mesh) of height x width: the
  path each op takes and why, {'stage', 'map', 'conv', 'attention', 'mlp'} with (path, why)."""
  rows = []
  for i, (h, w, queries, keys) in enumerate(layers.stage_sizes(cfg, height, width)):
    dim, extra, method = cfg.dim_embed[i], int(bool(cfg.cls_token[i])), cfg.qkv_proj_method[i]
    if method == 'dw_bn':
      conv = conv_path(compute, (batch, h, w, dim), cfg.kernel_qkv[i],
                       (cfg.stride_q[i], cfg.stride_kv[i], cfg.stride_kv[i]),
                       (cfg.padding_q[i], cfg.padding_kv[i], cfg.padding_kv[i]))
    else:
      conv = {'avg': ('avg', 'average pooling of the keys and values, no convolution'),
              'linear': ('linear', 'no projection')}[method]
    rows.append({
        'stage': i, 'map': f'{h}x{w}x{dim}', 'conv': conv,
        'attention': attention_path(compute, batch, queries + extra, keys + extra, dim,
                                    cfg.num_heads[i], compute.dtype),
        'mlp': mlp_path(compute, h * w + extra, dim, int(dim * cfg.mlp_ratio[i]), compute.dtype)})
  return rows


def describe_choices(rows: list[dict[str, Any]]) -> list[str]:
  """`choices` as text, a line per stage."""
  return [f"stage {row['stage']} ({row['map']}): "
          + '; '.join(f'{op} {row[op][0]} ({row[op][1]})' for op in ('conv', 'attention', 'mlp'))
          for row in rows]
