"""The model config of an official state dict, read off its key names and tensor shapes.

What the weights determine: stage count, widths, depths, embedding and q/k/v kernel sizes, cls
tokens, q/k/v biases, MLP ratios, input channels and classes. What they do not, and how we fill it
in, following every released model (CvT-13/21/W24, 224 and 384):
  * heads = width / 64;
  * patch stride/padding from the embedding kernel: 7 -> stride 4, padding 2; 3 -> stride 2,
    padding 1;
  * q/k/v projections: stride_q 1, stride_kv 2, padding kernel // 2;
  * dropout and stochastic-depth rates: 0 (they do not affect inference).
Anything else is an error that asks for an explicit spec. Stages without convolutional projections
are 'avg' or 'linear', which the weights cannot tell apart: that is an error too.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from cvt_flax.convert.official import ConversionError
from cvt_flax.models.config import CvTConfig, make_config

RELEASED_HEAD_DIM = 64
RELEASED_PATCH_STRIDE_PADDING = {7: (4, 2), 3: (2, 1)}
_NEED_SPEC = 'pass the model spec explicitly (spec=... / --spec FILE)'


def _shape(state_dict, key, source):
  if key not in state_dict:
    raise ConversionError(f'{source}: cannot infer the model: key {key!r} is missing.')
  return tuple(state_dict[key].shape)


def _count(state_dict: Mapping[str, Any], pattern: str) -> int:
  """Number of distinct indices `i` among keys matching `pattern` (a regex with one `(\\d+)`)."""
  found = {int(m.group(1)) for k in state_dict for m in [re.match(pattern, k)] if m}
  if found and found != set(range(len(found))):
    return -1
  return len(found)


def _infer_stage(state_dict, i: int, source: str) -> dict[str, Any]:
  out_ch, in_ch, k, _ = _shape(state_dict, f'stage{i}.patch_embed.proj.weight', source)
  where = f'{source}: stage {i}'
  if out_ch % RELEASED_HEAD_DIM:
    raise ConversionError(f'{where} has width {out_ch}, not a multiple of {RELEASED_HEAD_DIM}: the '
                          f'number of heads cannot be inferred; {_NEED_SPEC}.')
  if k not in RELEASED_PATCH_STRIDE_PADDING:
    raise ConversionError(f'{where} has a {k}x{k} embedding kernel, unlike any released model: '
                          f'its stride and padding cannot be inferred; {_NEED_SPEC}.')
  depth = _count(state_dict, rf'stage{i}\.blocks\.(\d+)\.')
  if depth <= 0:
    raise ConversionError(f'{where}: blocks missing or not numbered 0..n-1; {_NEED_SPEC}.')
  block = f'stage{i}.blocks.0'
  conv_key = f'{block}.attn.conv_proj_q.conv.weight'
  if conv_key not in state_dict:
    raise ConversionError(f'{where} has no convolutional q/k/v projection: its method is '
                          f"'avg' or 'linear', which the weights cannot tell apart; {_NEED_SPEC}.")
  kernel_qkv = _shape(state_dict, conv_key, source)[-1]
  hidden = _shape(state_dict, f'{block}.mlp.fc1.weight', source)[0]
  stride, padding = RELEASED_PATCH_STRIDE_PADDING[k]
  return dict(
      in_chans=in_ch, dim_embed=out_ch, num_heads=out_ch // RELEASED_HEAD_DIM, depth=depth,
      patch_size=k, patch_stride=stride, patch_padding=padding,
      cls_token=f'stage{i}.cls_token' in state_dict, qkv_proj_method='dw_bn',
      kernel_qkv=kernel_qkv, stride_kv=2, stride_q=1, padding_kv=kernel_qkv // 2,
      padding_q=kernel_qkv // 2, qkv_bias=f'{block}.attn.proj_q.bias' in state_dict,
      mlp_ratio=hidden / out_ch, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0)


def num_classes_of(state_dict: Mapping[str, Any]) -> int:
  """Rows of the head (0 for a headless model)."""
  return int(state_dict['head.weight'].shape[0]) if 'head.weight' in state_dict else 0


def infer_config(state_dict: Mapping[str, Any], *, source: str = 'state dict',
                 **overrides) -> CvTConfig:
  """The CvTConfig of an official state dict (see the module docstring for the rules)."""
  num_stages = _count(state_dict, r'stage(\d+)\.')
  if num_stages <= 0:
    raise ConversionError(f'{source}: no stages `stage0.`, `stage1.`... numbered from 0; '
                          'not an official CvT state dict.')
  stages = [_infer_stage(state_dict, i, source) for i in range(num_stages)]
  fields = {name: tuple(s[name] for s in stages) for name in stages[0] if name != 'in_chans'}
  fields.update(in_chans=stages[0]['in_chans'], num_classes=num_classes_of(state_dict))
  fields.update(overrides)
  try:
    return make_config(fields)
  except ValueError as e:
    raise ConversionError(f'{source}: inferred an invalid config ({e}); {_NEED_SPEC}.') from e
