"""HF transformers' CvT layout <-> the official one: a key table and the config.json mapping.

Weights: one table of name templates, read in both directions (`{s}` stage, `{b}` block, `{p}` the
tensor's leaf name, which both layouts share: weight, bias, running_mean...). Tensor layouts are
identical (both are PyTorch), so conversion is a pure rename.

What transformers' CvT (checked against transformers 5.23) actually computes, and how we map it:
  * Activation: exact erf GELU (`nn.GELU`), so HF checkpoints load with activation 'gelu' (the
    official models use QuickGELU). Our exports of a QuickGELU model add `"hidden_act": "quick_gelu"`
    to config.json so that cvt-flax restores it; transformers ignores that key and runs GELU.
  * LayerNorm eps: every `nn.LayerNorm` is built with torch's default 1e-5; `config.layer_norm_eps`
    (default 1e-12) is never read. So we always use 1e-5 for HF checkpoints.
  * `qkv_projection_method='avg'` (and 'linear'): the HF module only builds a convolution for
    'dw_bn', and its forward calls it unconditionally, so any other method raises AttributeError; HF
    computes nothing we could match. 'avg' checkpoints (necessarily converted from official ones,
    since HF cannot train them) are read with the official meaning: average-pooled keys/values.
  * transformers cannot even build a model with depth[i] <= i for some stage i (it indexes the
    per-block drop-path rates by the stage index); cvt-flax reads and writes such configs anyway.
  * Stochastic depth (training only): HF gives every block of stage i the rate
    `linspace(0, rate_i, depth_i)[i]` and drops after the MLP residual; we keep the official
    per-block linear rule. Eval outputs are unaffected.
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Mapping

from cvt_flax.models.config import CvTConfig, make_config
from cvt_flax.convert.official import ConversionError

_LAYER = 'cvt.encoder.stages.{s}.layers.{b}'
_QKV = {'q': 'query', 'k': 'key', 'v': 'value'}

# (official key template, HF key template)
KEY_TABLE = [
    ('stage{s}.patch_embed.proj.{p}',
     'cvt.encoder.stages.{s}.embedding.convolution_embeddings.projection.{p}'),
    ('stage{s}.patch_embed.norm.{p}',
     'cvt.encoder.stages.{s}.embedding.convolution_embeddings.normalization.{p}'),
    ('stage{s}.cls_token', 'cvt.encoder.stages.{s}.cls_token'),
    *[(f'stage{{s}}.blocks.{{b}}.attn.conv_proj_{x}.conv.{{p}}',
       f'{_LAYER}.attention.attention.convolution_projection_{name}'
       '.convolution_projection.convolution.{p}') for x, name in _QKV.items()],
    *[(f'stage{{s}}.blocks.{{b}}.attn.conv_proj_{x}.bn.{{p}}',
       f'{_LAYER}.attention.attention.convolution_projection_{name}'
       '.convolution_projection.normalization.{p}') for x, name in _QKV.items()],
    *[(f'stage{{s}}.blocks.{{b}}.attn.proj_{x}.{{p}}',
       f'{_LAYER}.attention.attention.projection_{name}.{{p}}') for x, name in _QKV.items()],
    ('stage{s}.blocks.{b}.attn.proj.{p}', _LAYER + '.attention.output.dense.{p}'),
    ('stage{s}.blocks.{b}.mlp.fc1.{p}', _LAYER + '.intermediate.dense.{p}'),
    ('stage{s}.blocks.{b}.mlp.fc2.{p}', _LAYER + '.output.dense.{p}'),
    ('stage{s}.blocks.{b}.norm1.{p}', _LAYER + '.layernorm_before.{p}'),
    ('stage{s}.blocks.{b}.norm2.{p}', _LAYER + '.layernorm_after.{p}'),
    ('norm.{p}', 'layernorm.{p}'),
    ('head.{p}', 'classifier.{p}'),
]
_GROUPS = {'s': r'(?P<s>\d+)', 'b': r'(?P<b>\d+)', 'p': r'(?P<p>[a-z_]+)'}


def _compile(template: str) -> re.Pattern:
  parts = re.split(r'\{(\w)\}', template)  # literal, name, literal, name, ...
  return re.compile(''.join(_GROUPS[x] if i % 2 else re.escape(x) for i, x in enumerate(parts)))


_TO_OFFICIAL = [(_compile(hf), official) for official, hf in KEY_TABLE]
_TO_HF = [(_compile(official), hf) for official, hf in KEY_TABLE]


def _rename(state_dict: Mapping[str, Any], rules, what: str, source: str) -> dict[str, Any]:
  out, unknown = {}, []
  for key, value in state_dict.items():
    for pattern, template in rules:
      match = pattern.fullmatch(key)
      if match:
        out[template.format(**match.groupdict())] = value
        break
    else:
      unknown.append(key)
  if unknown:
    raise ConversionError(f'{source}: {len(unknown)} keys with no {what} counterpart (unknown key '
                          f'layout): {", ".join(sorted(unknown))}')
  return out


def hf_to_official_state_dict(state_dict: Mapping[str, Any], *,
                              source: str = 'HF state dict') -> dict[str, Any]:
  """HF CvtForImageClassification (or headless CvtModel) keys -> official keys; values untouched."""
  if not any(k.startswith('cvt.') for k in state_dict):  # CvtModel saved without the `cvt.` wrapper
    state_dict = {('cvt.' + k if k.startswith('encoder.') else k): v for k, v in state_dict.items()}
  return _rename(state_dict, _TO_OFFICIAL, 'official', source)


def official_to_hf_state_dict(state_dict: Mapping[str, Any], *,
                              source: str = 'official state dict') -> dict[str, Any]:
  """Official keys -> HF CvtForImageClassification keys; values untouched."""
  return _rename(state_dict, _TO_HF, 'HF', source)


# HF CvtConfig field -> CvTConfig field, for the per-stage lists.
HF_STAGE_FIELDS = {
    'patch_sizes': 'patch_size', 'patch_stride': 'patch_stride', 'patch_padding': 'patch_padding',
    'embed_dim': 'dim_embed', 'num_heads': 'num_heads', 'depth': 'depth', 'mlp_ratio': 'mlp_ratio',
    'attention_drop_rate': 'attn_drop_rate', 'drop_rate': 'drop_rate',
    'drop_path_rate': 'drop_path_rate', 'qkv_bias': 'qkv_bias', 'cls_token': 'cls_token',
    'qkv_projection_method': 'qkv_proj_method', 'kernel_qkv': 'kernel_qkv',
    'padding_kv': 'padding_kv', 'stride_kv': 'stride_kv', 'padding_q': 'padding_q',
    'stride_q': 'stride_q',
}
# transformers' CvtConfig defaults, for fields a config.json leaves out.
HF_DEFAULTS = {
    'num_channels': 3, 'patch_sizes': [7, 3, 3], 'patch_stride': [4, 2, 2],
    'patch_padding': [2, 1, 1], 'embed_dim': [64, 192, 384], 'num_heads': [1, 3, 6],
    'depth': [1, 2, 10], 'mlp_ratio': [4.0] * 3, 'attention_drop_rate': [0.0] * 3,
    'drop_rate': [0.0] * 3, 'drop_path_rate': [0.0, 0.0, 0.1], 'qkv_bias': [True] * 3,
    'cls_token': [False, False, True], 'qkv_projection_method': ['dw_bn'] * 3,
    'kernel_qkv': [3] * 3, 'padding_kv': [1] * 3, 'stride_kv': [2] * 3, 'padding_q': [1] * 3,
    'stride_q': [1] * 3,
}
HF_LAYER_NORM_EPS = 1e-5  # what transformers' CvT computes with, whatever config.layer_norm_eps says
_HF_DEFAULT_NUM_LABELS = 2  # transformers' PreTrainedConfig default


def _hf_num_labels(hf: Mapping[str, Any]) -> int:
  if hf.get('id2label') is not None:
    return len(hf['id2label'])
  return int(hf.get('num_labels', _HF_DEFAULT_NUM_LABELS))


def config_from_hf(hf: Mapping[str, Any], *, source: str = 'HF config', **overrides) -> CvTConfig:
  """An HF CvT config.json dict -> CvTConfig (activation 'gelu', LayerNorm eps 1e-5, as HF runs)."""
  fields = {ours: tuple(hf.get(theirs, HF_DEFAULTS[theirs]))
            for theirs, ours in HF_STAGE_FIELDS.items()}
  methods = fields['qkv_proj_method']
  if any(m != 'dw_bn' for m in methods):
    warnings.warn(f'{source}: qkv_projection_method {list(methods)}: transformers cannot run '
                  "methods other than 'dw_bn'; reading them with the official meaning "
                  "('avg' = average-pooled keys/values, 'linear' = no spatial projection).")
  activation = hf.get('hidden_act', 'gelu')
  fields.update(in_chans=int(hf.get('num_channels', HF_DEFAULTS['num_channels'])),
                num_classes=_hf_num_labels(hf), activation=activation,
                layer_norm_eps=HF_LAYER_NORM_EPS)
  fields.update(overrides)
  try:
    return make_config(fields)
  except ValueError as e:
    raise ConversionError(f'{source}: not a valid CvT config: {e}') from e


def config_to_hf(cfg: CvTConfig, id2label: Mapping[int, str] | None = None) -> dict[str, Any]:
  """CvTConfig -> an HF CvT config.json dict that transformers' CvtConfig accepts."""
  if cfg.layer_norm_eps != HF_LAYER_NORM_EPS:
    raise ConversionError(f'layer_norm_eps {cfg.layer_norm_eps}: the HF CvT layout cannot express '
                          f'it (transformers always uses {HF_LAYER_NORM_EPS}).')
  if cfg.activation != 'gelu':
    warnings.warn(f"activation {cfg.activation!r}: transformers' CvT always runs exact GELU, so it "
                  'will compute slightly different outputs; cvt-flax restores the activation from '
                  'the `hidden_act` key it writes.')
  hf: dict[str, Any] = {'model_type': 'cvt', 'architectures': ['CvtForImageClassification'],
                        'num_channels': cfg.in_chans, 'initializer_range': 0.02,
                        # Never read by transformers' CvT; recorded for what the weights expect.
                        'layer_norm_eps': cfg.layer_norm_eps}
  for theirs, ours in HF_STAGE_FIELDS.items():
    kind = type(HF_DEFAULTS[theirs][0])  # HF's strict config wants floats as floats
    hf[theirs] = [kind(x) for x in getattr(cfg, ours)]
  if cfg.activation != 'gelu':
    hf['hidden_act'] = cfg.activation  # ignored by transformers, read back by config_from_hf
  labels = dict(id2label) if id2label else {i: f'LABEL_{i}' for i in range(cfg.num_classes)}
  if len(labels) != cfg.num_classes:
    raise ValueError(f'id2label has {len(labels)} entries for a model with {cfg.num_classes} classes.')
  hf['id2label'] = {str(i): name for i, name in labels.items()}
  hf['label2id'] = {name: int(i) for i, name in labels.items()}
  return hf
