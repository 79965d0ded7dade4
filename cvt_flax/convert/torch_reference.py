"""The official CvT architecture in plain PyTorch, as a numerics reference for the Flax model.

This is the model that microsoft/CvT's `lib/models/cls_cvt.py` builds in `get_cls_model`, written
from scratch (no einops/timm): the module tree, and so the state-dict keys, are the official ones, so
the released `CvT-*.pth` files load into it with `load_state_dict(strict=True)`.

Deliberate differences from the official code, none of which changes a released model's outputs:
  * `qkv_proj_method='linear'` (no spatial projection) works; the official forward crashes on it.
  * The cls-token head keeps the batch axis for batch 1 (the official `torch.squeeze` drops it).
  * Activation is selectable: 'quick_gelu' (official) or 'gelu' (exact erf, HF transformers).

Only code that needs torch imports this module.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cvt_flax.models.config import STAGE_FIELDS, CvTConfig, from_official_spec


class QuickGELU(nn.Module):

  def forward(self, x):
    return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
  """LayerNorm computed in float32 for half-precision inputs (the official fp16-safe subclass).

  Unlike the official one it leaves float64 in float64, so that a float64 copy of the model gives
  the exact reference the tests measure float32 rounding against."""

  def forward(self, x):
    if x.dtype == torch.float64:
      return super().forward(x)
    return super().forward(x.float()).to(x.dtype)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample while training."""

  def __init__(self, rate: float):
    super().__init__()
    self.rate = rate

  def forward(self, x):
    if not self.training or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype,
                       device=x.device).bernoulli_(keep)
    return x * mask / keep


def _to_tokens(fmap):
  """(B, C, H, W) -> (B, H*W, C)."""
  return fmap.flatten(2).transpose(1, 2)


def _to_fmap(tokens, h, w):
  """(B, H*W, C) -> (B, C, H, W)."""
  b, _, c = tokens.shape
  return tokens.transpose(1, 2).reshape(b, c, h, w)


def _spatial_projection(dim, kernel_size, stride, padding, method):
  """The spatial part of a q/k/v projection, a module mapping a feature map to a feature map."""
  if method == 'dw_bn':
    return nn.Sequential(collections.OrderedDict([
        ('conv', nn.Conv2d(dim, dim, kernel_size, stride=stride, padding=padding, bias=False,
                           groups=dim)),
        ('bn', nn.BatchNorm2d(dim)),
    ]))
  if method == 'avg':
    return nn.AvgPool2d(kernel_size, stride=stride, padding=padding, ceil_mode=True)
  if method == 'linear':
    return None
  raise ValueError(f'Unknown qkv projection method {method!r}.')


class Attention(nn.Module):
  """Convolutional-projection multi-head attention (scale = full width ** -0.5, as official)."""

  def __init__(self, dim, stage: Mapping[str, Any]):
    super().__init__()
    self.num_heads = stage['num_heads']
    self.scale = dim ** -0.5
    self.with_cls_token = stage['cls_token']
    method = stage['qkv_proj_method']
    self.method = method
    k = stage['kernel_qkv']
    # 'avg' pools keys and values only; the query keeps full resolution.
    self.conv_proj_q = _spatial_projection(dim, k, stage['stride_q'], stage['padding_q'],
                                           'linear' if method == 'avg' else method)
    self.conv_proj_k = _spatial_projection(dim, k, stage['stride_kv'], stage['padding_kv'], method)
    self.conv_proj_v = _spatial_projection(dim, k, stage['stride_kv'], stage['padding_kv'], method)
    bias = stage['qkv_bias']
    self.proj_q = nn.Linear(dim, dim, bias=bias)
    self.proj_k = nn.Linear(dim, dim, bias=bias)
    self.proj_v = nn.Linear(dim, dim, bias=bias)
    self.attn_drop = nn.Dropout(stage['attn_drop_rate'])
    self.proj = nn.Linear(dim, dim)
    self.proj_drop = nn.Dropout(stage['drop_rate'])

  def _project(self, x, h, w):
    if self.method == 'linear':
      return x, x, x
    cls_tok = None
    if self.with_cls_token:
      cls_tok, x = x[:, :1], x[:, 1:]
    fmap = _to_fmap(x, h, w)
    qkv = [x if p is None else _to_tokens(p(fmap))
           for p in (self.conv_proj_q, self.conv_proj_k, self.conv_proj_v)]
    if cls_tok is not None:
      qkv = [torch.cat([cls_tok, t], dim=1) for t in qkv]
    return qkv

  def _split_heads(self, t):
    b, n, c = t.shape
    return t.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

  def forward(self, x, h, w):
    q, k, v = self._project(x, h, w)
    q = self._split_heads(self.proj_q(q))
    k = self._split_heads(self.proj_k(k))
    v = self._split_heads(self.proj_v(v))
    attn = F.softmax(torch.einsum('bhqd,bhkd->bhqk', q, k) * self.scale, dim=-1)
    out = torch.einsum('bhqk,bhkd->bhqd', self.attn_drop(attn), v)
    b, _, n, _ = out.shape
    return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, -1)))


class Mlp(nn.Module):

  def __init__(self, dim, hidden, drop, act_layer):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = act_layer()
    self.fc2 = nn.Linear(hidden, dim)
    self.drop = nn.Dropout(drop)

  def forward(self, x):
    return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
  """Pre-norm transformer block."""

  def __init__(self, dim, drop_path, stage, act_layer, norm_layer):
    super().__init__()
    self.norm1 = norm_layer(dim)
    self.attn = Attention(dim, stage)
    self.drop_path = DropPath(drop_path)
    self.norm2 = norm_layer(dim)
    self.mlp = Mlp(dim, int(dim * stage['mlp_ratio']), stage['drop_rate'], act_layer)

  def forward(self, x, h, w):
    x = x + self.drop_path(self.attn(self.norm1(x), h, w))
    return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvEmbed(nn.Module):
  """Strided conv then LayerNorm over channels; returns a feature map."""

  def __init__(self, in_chans, dim, patch_size, stride, padding, norm_layer):
    super().__init__()
    self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=stride, padding=padding)
    self.norm = norm_layer(dim)

  def forward(self, x):
    x = self.proj(x)
    _, _, h, w = x.shape
    return _to_fmap(self.norm(_to_tokens(x)), h, w)


def _init_weights(module: nn.Module, init: str):
  """The official init of a stage: linear weights trunc_normal(.02)/xavier, zero biases, unit norms."""
  for m in module.modules():
    if isinstance(m, nn.Linear):
      if init == 'xavier':
        nn.init.xavier_uniform_(m.weight)
      else:
        nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
      if m.bias is not None:
        nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
      nn.init.ones_(m.weight)
      nn.init.zeros_(m.bias)


class Stage(nn.Module):
  """One CvT stage (the official `VisionTransformer`)."""

  def __init__(self, in_chans, stage, act_layer, norm_layer, init):
    super().__init__()
    dim = stage['dim_embed']
    self.patch_embed = ConvEmbed(in_chans, dim, stage['patch_size'], stage['patch_stride'],
                                 stage['patch_padding'], norm_layer)
    self.cls_token = None
    if stage['cls_token']:
      self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
      nn.init.trunc_normal_(self.cls_token, std=0.02, a=-2.0, b=2.0)
    self.pos_drop = nn.Dropout(stage['drop_rate'])
    rates = torch.linspace(0, stage['drop_path_rate'], stage['depth'], device='cpu').tolist()
    self.blocks = nn.ModuleList([Block(dim, r, stage, act_layer, norm_layer) for r in rates])
    _init_weights(self, init)

  def forward(self, x):
    """Feature map -> (feature map, cls token (B, 1, C) or None)."""
    x = self.patch_embed(x)
    b, _, h, w = x.shape
    x = _to_tokens(x)
    if self.cls_token is not None:
      x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
    x = self.pos_drop(x)
    for block in self.blocks:
      x = block(x, h, w)
    cls_tok = None
    if self.cls_token is not None:
      cls_tok, x = x[:, :1], x[:, 1:]
    return _to_fmap(x, h, w), cls_tok


class ConvolutionalVisionTransformer(nn.Module):
  """The official classifier: stages, LayerNorm of the last cls token (or mean token), linear head."""

  def __init__(self, cfg: CvTConfig):
    super().__init__()
    self.num_stages = cfg.num_stages
    act_layer = {'quick_gelu': QuickGELU, 'gelu': nn.GELU}[cfg.activation]

    def norm_layer(dim):
      return LayerNorm(dim, eps=cfg.layer_norm_eps)

    in_chans = cfg.in_chans
    for i in range(cfg.num_stages):
      stage = {name: getattr(cfg, name)[i] for name in STAGE_FIELDS.values()}
      setattr(self, f'stage{i}', Stage(in_chans, stage, act_layer, norm_layer, cfg.init))
      in_chans = stage['dim_embed']
    dim = cfg.dim_embed[-1]
    self.norm = norm_layer(dim)
    self.use_cls_token = cfg.cls_token[-1]
    self.head = nn.Linear(dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
    if cfg.num_classes > 0:
      nn.init.trunc_normal_(self.head.weight, std=0.02, a=-2.0, b=2.0)

  def forward_stages(self, x):
    """NCHW images -> ([per-stage NCHW feature maps], last cls token (B, 1, C) or None)."""
    maps = []
    cls_tok = None
    for i in range(self.num_stages):
      x, cls_tok = getattr(self, f'stage{i}')(x)
      maps.append(x)
    return maps, cls_tok

  def forward_features(self, x):
    maps, cls_tok = self.forward_stages(x)
    if self.use_cls_token:
      return self.norm(cls_tok)[:, 0]  # indexing, not squeeze: batch 1 keeps its batch axis
    return self.norm(_to_tokens(maps[-1])).mean(dim=1)

  def forward(self, x):
    return self.head(self.forward_features(x))


def build_reference_model(spec_or_config, num_classes: int | None = None, *,
                          activation: str | None = None) -> ConvolutionalVisionTransformer:
  """The official CvT in PyTorch (train mode, as torch builds modules).

  `spec_or_config`: an official SPEC dict (upper-case keys of the YAML files) or a CvTConfig.
  `num_classes` and `activation` override the config's values ('quick_gelu' is the official one).
  """
  if isinstance(spec_or_config, CvTConfig):
    cfg = spec_or_config
  else:
    cfg = from_official_spec(spec_or_config)
  overrides = {}
  if num_classes is not None:
    overrides['num_classes'] = num_classes
  if activation is not None:
    overrides['activation'] = activation
  if overrides:
    cfg = dataclasses.replace(cfg, **overrides).validate()
  return ConvolutionalVisionTransformer(cfg)
