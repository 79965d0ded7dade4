"""CvT (Wu et al. 2021) in Flax NNX, numerically equivalent to the official PyTorch model.

Attribute names mirror the official state-dict keys (`stage2.blocks.3.attn.conv_proj_q.bn.running_mean`
is `model.stage2.blocks[3].attn.conv_proj_q.bn.mean`), so conversion is a plain table
(see `cvt_flax.convert`). Images are NHWC.

Every module takes the architecture (`CvTConfig`) and the compute settings (`Compute`, resolved for
a platform) separately: the first decides the function, the second only how it is computed.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cvt_flax.models import compute as compute_lib
from cvt_flax.models import layers, norms
from cvt_flax.models.compute import Compute
from cvt_flax.models.config import STAGE_FIELDS, CvTConfig, make_config


def _layer_norm(dim, cfg: CvTConfig, dtype):
  return norms.LayerNorm(dim, epsilon=cfg.layer_norm_eps, dtype=dtype)


def _linear(din, dout, cfg: CvTConfig, dtype, rngs, use_bias=True):
  return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype,
                    kernel_init=layers.linear_kernel_init(cfg.init), rngs=rngs)


class DepthwiseConv(nnx.Module):
  """Depthwise conv without bias. `kernel` is (k, k, 1, C): torch's (C, 1, k, k) transposed (2, 3, 1, 0)."""

  def __init__(self, channels, kernel_size, stride, padding, compute: Compute, rngs):
    self.stride, self.padding, self.compute = stride, padding, compute
    init = layers.torch_default_uniform(kernel_size * kernel_size)
    self.kernel = nnx.Param(init(rngs.params(), (kernel_size, kernel_size, 1, channels)))

  def __call__(self, x):
    dtype = self.compute.jnp_dtype
    return compute_lib.depthwise_conv(self.compute, x.astype(dtype), self.kernel.get_value().astype(dtype),
                                      self.stride, self.padding)


class ConvProjection(nnx.Module):
  """The `dw_bn` projection: depthwise conv (no bias) + BatchNorm."""

  def __init__(self, dim, kernel_size, stride, padding, compute: Compute, rngs):
    self.conv = DepthwiseConv(dim, kernel_size, stride, padding, compute, rngs)
    self.bn = norms.BatchNorm(dim, dtype=compute.jnp_dtype)

  def __call__(self, x):
    with jax.named_scope('conv_proj'):
      return self.bn(self.conv(x))


class Attention(nnx.Module):
  """Convolutional projection attention.

  q, k, v are spatial projections (`dw_bn`: depthwise conv + BN; `avg`: ceil-mode average pooling of
  k and v, q unprojected; `linear`: none) of the token map, followed by linear q/k/v layers. The cls
  token bypasses the spatial projection but goes through the linear layers. The scale is
  dim**-0.5 with dim the full stage width, as in the official code.
  """

  def __init__(self, dim, num_heads, stage: dict, cfg: CvTConfig, compute: Compute, rngs):
    self.num_heads, self.compute = num_heads, compute
    dtype = compute.jnp_dtype
    self.record_attention = False
    self.scale = dim ** -0.5
    self.method = stage['qkv_proj_method']
    self.with_cls_token = stage['cls_token']
    self.kernel_size, self.stride_kv = stage['kernel_qkv'], stage['stride_kv']
    self.padding_kv = stage['padding_kv']
    if self.method == 'dw_bn':
      q_args = (stage['kernel_qkv'], stage['stride_q'], stage['padding_q'])
      kv_args = (stage['kernel_qkv'], stage['stride_kv'], stage['padding_kv'])
      self.conv_proj_q = ConvProjection(dim, *q_args, compute, rngs)
      self.conv_proj_k = ConvProjection(dim, *kv_args, compute, rngs)
      self.conv_proj_v = ConvProjection(dim, *kv_args, compute, rngs)
    bias = stage['qkv_bias']
    self.proj_q = _linear(dim, dim, cfg, dtype, rngs, use_bias=bias)
    self.proj_k = _linear(dim, dim, cfg, dtype, rngs, use_bias=bias)
    self.proj_v = _linear(dim, dim, cfg, dtype, rngs, use_bias=bias)
    self.attn_drop = nnx.Dropout(stage['attn_drop_rate'], rngs=rngs)
    self.proj = _linear(dim, dim, cfg, dtype, rngs)
    self.proj_drop = nnx.Dropout(stage['drop_rate'], rngs=rngs)

  def _spatial_qkv(self, x, h, w):
    if self.method == 'linear':
      return x, x, x
    cls_tok = None
    if self.with_cls_token:
      cls_tok, x = x[:, :1], x[:, 1:]
    b, _, c = x.shape
    fmap = x.reshape(b, h, w, c)
    if self.method == 'dw_bn':
      q, k, v = compute_lib.conv_projections(
          self.compute, (self.conv_proj_q, self.conv_proj_k, self.conv_proj_v), fmap)
    else:  # avg
      q = fmap
      k = v = layers.avg_pool_ceil(fmap, self.kernel_size, self.stride_kv, self.padding_kv)
    q, k, v = (t.reshape(b, -1, c) for t in (q, k, v))
    if cls_tok is not None:
      q, k, v = (jnp.concatenate([cls_tok.astype(t.dtype), t], axis=1) for t in (q, k, v))
    return q, k, v

  def __call__(self, x, h, w):
    q, k, v = self._spatial_qkv(x, h, w)
    with jax.named_scope('qkv_linear'):
      q, k, v = (self._linear(proj, t)
                 for proj, t in ((self.proj_q, q), (self.proj_k, k), (self.proj_v, v)))
    record = None
    if self.record_attention:  # for visualisation; see `attention_maps`
      record = lambda probs: self.sow(nnx.Intermediate, 'attention_weights', probs)
    drop = self.attn_drop
    dropout = drop if drop.rate > 0 and not drop.deterministic else None
    with jax.named_scope('attention_core'):
      out = compute_lib.multi_head_attention(self.compute, q, k, v, self.num_heads, self.scale,
                                             dropout=dropout, record=record)
    with jax.named_scope('attn_out_linear'):
      return self.proj_drop(self._linear(self.proj, out))

  def _linear(self, layer, x):
    return compute_lib.token_linear(self.compute, layer, x)


class Mlp(nnx.Module):
  """fc1, activation, fc2, with dropout. On TPU `compute_lib.mlp_residual` runs it in one kernel
  with the LayerNorm before it and the residual add after it, from these same parameters."""

  def __init__(self, dim, hidden, drop, cfg: CvTConfig, compute: Compute, rngs):
    self.compute = compute
    dtype = compute.jnp_dtype
    self.fc1 = _linear(dim, hidden, cfg, dtype, rngs)
    self.act = layers.ACTIVATIONS[cfg.activation]
    self.fc2 = _linear(hidden, dim, cfg, dtype, rngs)
    self.drop = nnx.Dropout(drop, rngs=rngs)

  def __call__(self, x):
    with jax.named_scope('mlp'):
      return compute_lib.token_linear(
          self.compute, lambda x: self.drop(self.fc2(self.drop(self.act(self.fc1(x))))), x)


class Block(nnx.Module):
  """Pre-norm transformer block. Stochastic depth = dropout broadcast over all but the batch axis."""

  def __init__(self, dim, num_heads, drop_path, stage: dict, cfg: CvTConfig, compute: Compute,
               rngs):
    dtype = compute.jnp_dtype
    self.compute = compute
    self.norm1 = _layer_norm(dim, cfg, dtype)
    self.attn = Attention(dim, num_heads, stage, cfg, compute, rngs)
    self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2), rngs=rngs)
    self.norm2 = _layer_norm(dim, cfg, dtype)
    self.mlp = Mlp(dim, int(dim * stage['mlp_ratio']), stage['drop_rate'], cfg, compute, rngs)

  def __call__(self, x, h, w):
    # Named scopes label the computations in profiles (benchmarks/profile_ops.py); no numerics.
    with jax.named_scope('layer_norm'):
      y = self.norm1(x)
    x = x + self.drop_path(self.attn(y, h, w))
    return compute_lib.mlp_residual(self.compute, self.norm2, self.mlp, self.drop_path, x)


class ConvEmbed(nnx.Module):
  """Convolutional token embedding: strided conv with explicit symmetric padding, then LayerNorm."""

  def __init__(self, in_chans, dim, patch_size, stride, padding, cfg: CvTConfig, dtype, rngs):
    fan_in = in_chans * patch_size * patch_size
    self.proj = nnx.Conv(in_chans, dim, (patch_size, patch_size), strides=stride,
                         padding=((padding, padding), (padding, padding)), dtype=dtype,
                         kernel_init=layers.torch_default_uniform(fan_in),
                         bias_init=layers.torch_default_uniform(fan_in), rngs=rngs)
    self.norm = _layer_norm(dim, cfg, dtype)

  def __call__(self, x):
    with jax.named_scope('patch_embed'):
      y = self.proj(x)
      b, h, w, c = y.shape
      # Normalised as the tokens the blocks take: XLA:TPU then changes the layout before the
      # norm's float32 arithmetic rather than after it (benchmarks/RESULTS.md).
      return self.norm(y.reshape(b, h * w, c)).reshape(b, h, w, c)


class Stage(nnx.Module):
  """One CvT stage (the official `VisionTransformer`): conv embedding, optional cls token, blocks."""

  def __init__(self, in_chans, stage: dict, cfg: CvTConfig, compute: Compute, rngs):
    dim = stage['dim_embed']
    self.compute = compute
    self.patch_embed = ConvEmbed(in_chans, dim, stage['patch_size'], stage['patch_stride'],
                                 stage['patch_padding'], cfg, compute.jnp_dtype, rngs)
    self.cls_token = (nnx.Param(layers.trunc_normal(0.02)(rngs.params(), (1, 1, dim)))
                      if stage['cls_token'] else None)
    self.pos_drop = nnx.Dropout(stage['drop_rate'], rngs=rngs)
    # Stochastic depth grows linearly inside each stage, from 0 to the stage's rate (official rule).
    rates = np.linspace(0.0, stage['drop_path_rate'], stage['depth'])
    self.blocks = nnx.List([Block(dim, stage['num_heads'], float(r), stage, cfg, compute, rngs)
                            for r in rates])

  def __call__(self, x):
    """NHWC image/feature map -> (NHWC feature map, cls token (B, C) or None)."""
    x = self.patch_embed(x)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    if self.cls_token is not None:
      cls_tok = jnp.broadcast_to(self.cls_token.get_value().astype(x.dtype), (b, 1, c))
      x = jnp.concatenate([cls_tok, x], axis=1)
    x = self.pos_drop(x)
    for block in self.blocks:
      x = compute_lib.run_block(self.compute, block, compute_lib.block_boundary(self.compute, x),
                                h, w)
    cls_out = None
    if self.cls_token is not None:
      cls_out, x = x[:, 0], x[:, 1:]
    return x.reshape(b, h, w, c), cls_out


class CvT(nnx.Module):
  """Convolutional vision Transformer. `model(images)` -> logits; `model.features(images)` -> dict.

  `config`: the architecture. `compute`: how it is computed (default: float32, the fast paths of
  JAX's default backend; see `cvt_flax.models.compute`). Loaders also set `preprocess` (the eval
  transform the model expects, a `cvt_flax.preprocess.Preprocess`) and `class_names` (what its
  outputs mean) where their source says; both stay None otherwise.
  """

  def __init__(self, cfg: CvTConfig, *, rngs: nnx.Rngs, compute: Compute | None = None):
    self.config = cfg
    compute = (compute or Compute()).resolved()
    self.compute = compute
    dtype = compute.jnp_dtype
    self.dtype = dtype
    self.preprocess = None
    self.class_names = None
    in_chans = cfg.in_chans
    for i in range(cfg.num_stages):
      stage = {name: getattr(cfg, name)[i] for name in STAGE_FIELDS.values()}
      setattr(self, f'stage{i}', Stage(in_chans, stage, cfg, compute, rngs))
      in_chans = stage['dim_embed']
    dim = cfg.dim_embed[-1]
    self.norm = _layer_norm(dim, cfg, dtype)
    # The official head: trunc_normal(0.02) weight, torch-default bias (it is built outside `apply`).
    self.head = (nnx.Linear(dim, cfg.num_classes, dtype=dtype, kernel_init=layers.trunc_normal(0.02),
                            bias_init=layers.torch_default_uniform(dim), rngs=rngs)
                 if cfg.num_classes > 0 else None)

  @property
  def stages(self):
    return [getattr(self, f'stage{i}') for i in range(self.config.num_stages)]

  def _check_images(self, images):
    c = self.config.in_chans
    if images.ndim != 4 or images.shape[-1] != c:
      hint = (' (this looks like NCHW; CvT-Flax takes NHWC: transpose with (0, 2, 3, 1))'
              if images.ndim == 4 and images.shape[1] == c else '')
      raise ValueError(f'CvT expects NHWC images (batch, height, width, {c}); '
                       f'got shape {tuple(images.shape)}{hint}.')
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f'CvT expects floating-point images (normalised); got dtype {images.dtype}.')

  def features(self, images) -> dict[str, Any]:
    """Per-stage NHWC feature maps (`stage0`...), the last stage's `cls_token` (B, C) or None, and
    `pre_logits`: LayerNorm(cls token), or the mean of LayerNorm(tokens) for models without one."""
    self._check_images(images)
    x = images.astype(self.dtype)
    out = {}
    cls_tok = None
    for i, stage in enumerate(self.stages):
      x, cls_tok = stage(x)
      out[f'stage{i}'] = x
    out['cls_token'] = cls_tok
    if cls_tok is not None:
      out['pre_logits'] = self.norm(cls_tok)
    else:
      b, h, w, c = x.shape
      out['pre_logits'] = jnp.mean(self.norm(x.reshape(b, h * w, c)), axis=1)
    return out

  def __call__(self, images):
    pre_logits = self.features(images)['pre_logits']
    if self.head is None:
      return pre_logits
    return self.head(pre_logits).astype(jnp.float32)


def create_model(variant_or_spec: Any = 'cvt-13', num_classes: int | None = None, *,
                 rngs: nnx.Rngs, compute: Compute | None = None, **fields) -> CvT:
  """Builds a CvT in training mode (call `.eval()` for inference).

  `variant_or_spec`: 'cvt-13' | 'cvt-21' | 'cvt-w24', a CvTConfig, a dict/ConfigDict of model fields
  (optionally with `variant`), or an official SPEC dict (upper-case keys). `num_classes` defaults to
  1000 for variant names and to the given config's value otherwise; 0 gives a model returning
  pre-logits features. `fields` override architecture fields, except the compute settings (every
  field of `Compute`: `dtype`, `dwconv_impl`, `attention_impl`, `mlp_impl`, `fusion_barrier`,
  `per_token_linear`, `remat`, `platform`, `mesh`), which go to `compute`.
  """
  if num_classes is not None:
    fields['num_classes'] = num_classes
  settings = {f.name: fields.pop(f.name) for f in dataclasses.fields(Compute) if f.name in fields}
  return CvT(make_config(variant_or_spec, **fields), rngs=rngs,
             compute=compute_lib.make_compute(compute, **settings))


def abstract_model(cfg: CvTConfig, compute: Compute | None = None) -> CvT:
  """A CvT of `cfg` with shapes only (no parameter initialisation), to be filled by a loader; this
  skips the random init of weights about to be replaced (seconds for CvT-13, and W24's 1.1 GB)."""
  return nnx.eval_shape(lambda: CvT(cfg, rngs=nnx.Rngs(0), compute=compute))


def finish_abstract_model(model: nnx.Module, seed: int = 0) -> nnx.Module:
  """Gives a filled `abstract_model` concrete dropout RNG state (fresh keys from
  `seed`, counts 0). Raises if anything else is still abstract (a variable no loader filled)."""
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


def with_compute(model: CvT, compute: Compute | None = None, **settings) -> CvT:
  """The same weights (shared, not copied), preprocessing and class names in a model computing
  with other settings, e.g. `with_compute(model, dtype='bfloat16')`. Keeps train/eval mode."""
  new = abstract_model(model.config, compute_lib.make_compute(compute or model.compute, **settings))
  nnx.update(new, nnx.state(model))
  new.preprocess, new.class_names = model.preprocess, model.class_names
  if model.stage0.pos_drop.deterministic:  # `.eval()` sets it; a fresh model is in training mode
    new.eval()
  return new


def attention_maps(model: CvT, images) -> list[list[jax.Array]]:
  """Attention probabilities of every block: maps[stage][block] is (B, heads, q_tokens, kv_tokens).

  In the last stage token 0 is the cls token, so maps[-1][-1][:, :, 0, 1:] is the cls token's
  attention over the (stride_kv-subsampled) spatial tokens.
  """
  model.set_attributes(record_attention=True)
  try:
    _, recorded = nnx.capture(model, nnx.Intermediate)(images)
  finally:
    model.set_attributes(record_attention=False)
  maps = []
  for i, stage in enumerate(model.stages):
    maps.append([recorded[f'stage{i}']['blocks'][j]['attn']['attention_weights'].get_value()[0]
                 for j in range(len(stage.blocks))])
  return maps


def count_params(model_or_state) -> int:
  """Number of trainable parameters (nnx.Param), as torch counts `requires_grad` parameters."""
  state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) \
      else model_or_state
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
