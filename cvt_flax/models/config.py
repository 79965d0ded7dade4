"""CvT model configuration: variants, official SPEC dicts and YAML files.

A CvTConfig holds the architecture and nothing else: every field changes the function the model
computes (or its training-time regularisation). How it is computed (dtype, implementation
switches) is a runtime choice, `cvt_flax.models.Compute`, never saved with a model.

A model is described by a flat dict of fields. Per-stage fields are tuples with one entry per stage and
carry the lower-case names of the official SPEC keys (`DIM_EMBED` -> `dim_embed`), so an official YAML
file maps onto them one to one. Everything else (classes, activation, init) is a scalar.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import yaml

from cvt_flax.errors import ConfigError

# Official SPEC key -> our field name (per-stage fields).
STAGE_FIELDS = {
    'PATCH_SIZE': 'patch_size',
    'PATCH_STRIDE': 'patch_stride',
    'PATCH_PADDING': 'patch_padding',
    'DIM_EMBED': 'dim_embed',
    'NUM_HEADS': 'num_heads',
    'DEPTH': 'depth',
    'MLP_RATIO': 'mlp_ratio',
    'QKV_BIAS': 'qkv_bias',
    'DROP_RATE': 'drop_rate',
    'ATTN_DROP_RATE': 'attn_drop_rate',
    'DROP_PATH_RATE': 'drop_path_rate',
    'CLS_TOKEN': 'cls_token',
    'QKV_PROJ_METHOD': 'qkv_proj_method',
    'KERNEL_QKV': 'kernel_qkv',
    'STRIDE_KV': 'stride_kv',
    'STRIDE_Q': 'stride_q',
    'PADDING_KV': 'padding_kv',
    'PADDING_Q': 'padding_q',
}
# Official SPEC keys that are accepted but carry nothing we model.
_IGNORED_SPEC_KEYS = {'NUM_STAGES', 'POS_EMBED', 'INIT'}
PROJ_METHODS = ('dw_bn', 'avg', 'linear')
ACTIVATIONS = ('quick_gelu', 'gelu')
# Written into CvT configs before they held only the architecture (format version 1 files).
COMPUTE_FIELDS = ('dtype', 'dwconv_impl', 'attention_impl')


@dataclasses.dataclass(frozen=True)
class CvTConfig:
  """All fields that define a CvT model. Per-stage fields are tuples of length `num_stages`."""
  dim_embed: tuple = (64, 192, 384)
  num_heads: tuple = (1, 3, 6)
  depth: tuple = (1, 2, 10)
  patch_size: tuple = (7, 3, 3)
  patch_stride: tuple = (4, 2, 2)
  patch_padding: tuple = (2, 1, 1)
  cls_token: tuple = (False, False, True)
  qkv_proj_method: tuple = ('dw_bn', 'dw_bn', 'dw_bn')
  kernel_qkv: tuple = (3, 3, 3)
  stride_kv: tuple = (2, 2, 2)
  stride_q: tuple = (1, 1, 1)
  padding_kv: tuple = (1, 1, 1)
  padding_q: tuple = (1, 1, 1)
  qkv_bias: tuple = (True, True, True)
  mlp_ratio: tuple = (4.0, 4.0, 4.0)
  drop_rate: tuple = (0.0, 0.0, 0.0)
  attn_drop_rate: tuple = (0.0, 0.0, 0.0)
  drop_path_rate: tuple = (0.0, 0.0, 0.1)
  num_classes: int = 1000
  in_chans: int = 3
  # 'quick_gelu': x * sigmoid(1.702 x), the official model. 'gelu': exact erf GELU, HF transformers.
  activation: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  # 'trunc_norm' or 'xavier', as the official INIT option.
  init: str = 'trunc_norm'

  @property
  def num_stages(self) -> int:
    return len(self.dim_embed)

  def to_dict(self) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  def to_official_spec(self) -> dict:
    spec = {key: list(getattr(self, name)) for key, name in STAGE_FIELDS.items()}
    spec.update(NUM_STAGES=self.num_stages, INIT=self.init, POS_EMBED=[False] * self.num_stages)
    return spec

  def validate(self) -> 'CvTConfig':
    n = self.num_stages
    for name in STAGE_FIELDS.values():
      if len(getattr(self, name)) != n:
        raise ConfigError(f'CvT config: `{name}` has {len(getattr(self, name))} entries, '
                         f'`dim_embed` has {n}; every per-stage field needs one entry per stage.')
    for i, (dim, heads) in enumerate(zip(self.dim_embed, self.num_heads)):
      if dim % heads:
        raise ConfigError(f'CvT config: stage {i} width {dim} is not divisible by {heads} heads.')
    for i, m in enumerate(self.qkv_proj_method):
      if m not in PROJ_METHODS:
        raise ConfigError(f'CvT config: stage {i} qkv_proj_method {m!r} is not one of {PROJ_METHODS}.')
    if any(self.cls_token[:-1]):
      raise ConfigError('CvT config: only the last stage may have a cls token (as in the official code).')
    if self.activation not in ACTIVATIONS:
      raise ConfigError(f'CvT config: activation {self.activation!r} is not one of {ACTIVATIONS}.')
    if self.init not in ('trunc_norm', 'xavier'):
      raise ConfigError(f"CvT config: init {self.init!r} is not 'trunc_norm' or 'xavier'.")
    return self

  def differences(self, other: 'CvTConfig') -> list[str]:
    """'field: this value vs other value' for every field where the two configs differ."""
    return [f'{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}'
            for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


_CVT_13 = dict(dim_embed=(64, 192, 384), num_heads=(1, 3, 6), depth=(1, 2, 10),
               drop_path_rate=(0.0, 0.0, 0.1))
VARIANTS = {
    'cvt-13': _CVT_13,
    'cvt-21': dict(_CVT_13, depth=(1, 4, 16)),
    'cvt-w24': dict(dim_embed=(192, 768, 1024), num_heads=(3, 12, 16), depth=(2, 2, 20),
                    drop_path_rate=(0.0, 0.0, 0.3)),
    # Two stages, 18k parameters with 10 classes: for tests, examples and smoke runs, where a model
    # must build and compile in seconds (as big_vision's configs have `runlocal`). Not released.
    'tiny': dict(dim_embed=(16, 32), num_heads=(1, 2), depth=(1, 1), patch_size=(3, 3),
                 patch_stride=(2, 2), patch_padding=(1, 1), mlp_ratio=(2.0, 2.0)),
}


def stage_defaults(name: str, num_stages: int) -> tuple:
  """The default of per-stage field `name` for a model of `num_stages` stages: the official
  3-stage default's first entry for the first stage, its last for the last stage and its middle one
  for the stages between (a 7x7 stride-4 patch embedding first; a cls token and stochastic depth
  last). A 3-stage model gets the official defaults themselves."""
  first, middle, last = getattr(CvTConfig, name)
  return tuple(first if i == 0 else last if i == num_stages - 1 else middle
               for i in range(num_stages))


def _stage_tuple(key: str, value: Any) -> tuple:
  if isinstance(value, (list, tuple)):
    return tuple(value)
  raise ConfigError(f'CvT config: `{key}` must be a list with one entry per stage, got {value!r}.')


def from_official_spec(spec: Mapping[str, Any], **overrides) -> CvTConfig:
  """Builds a config from an official SPEC dict (the upper-case keys of the official YAML files)."""
  spec = dict(spec)
  unknown = set(spec) - set(STAGE_FIELDS) - _IGNORED_SPEC_KEYS
  if unknown:
    raise ConfigError(f'Official CvT SPEC: unknown keys {sorted(unknown)}.')
  if any(spec.get('POS_EMBED') or []):
    raise ConfigError('Official CvT SPEC: POS_EMBED=True is not supported (no released model uses it).')
  fields = {name: _stage_tuple(key, spec[key]) for key, name in STAGE_FIELDS.items() if key in spec}
  if 'INIT' in spec:
    fields['init'] = spec['INIT']
  missing = [k for k in ('DIM_EMBED', 'NUM_HEADS', 'DEPTH') if k not in spec]
  if missing:
    raise ConfigError(f'Official CvT SPEC: missing keys {missing}.')
  return make_config(dict(fields, **overrides))


def make_config(variant_or_fields: Any = 'cvt-13', **overrides) -> CvTConfig:
  """Resolves a variant name, an official SPEC, a ConfigDict/dict of fields or a CvTConfig."""
  src = variant_or_fields
  if isinstance(src, CvTConfig):
    fields = src.to_dict()
  elif isinstance(src, str):
    if src.lower() not in VARIANTS:
      raise ConfigError(f'Unknown CvT variant {src!r}; known: {sorted(VARIANTS)}.')
    fields = dict(VARIANTS[src.lower()])
  else:
    fields = dict(src.to_dict() if hasattr(src, 'to_dict') else src)
    if any(k.isupper() for k in fields):
      return from_official_spec(fields, **overrides)
    if 'variant' in fields:  # a model ConfigDict may name a variant and override some fields
      fields = dict(VARIANTS[fields.pop('variant').lower()], **fields)
  fields.update(overrides)
  known = {f.name for f in dataclasses.fields(CvTConfig)}
  unknown = set(fields) - known
  compute = sorted(unknown & set(COMPUTE_FIELDS))
  if compute:
    raise ConfigError(f'CvT config: {compute} are compute settings, not part of the architecture: '
                     'pass them to create_model(..., dtype=..., attention_impl=...) or set '
                     '--config.dtype / --config.attention_impl / --config.dwconv_impl in training.')
  if unknown:
    raise ConfigError(f'CvT config: unknown fields {sorted(unknown)}; known: {sorted(known)}.')
  n = len(fields.get('dim_embed', CvTConfig.dim_embed))
  for name in STAGE_FIELDS.values():
    fields[name] = (_stage_tuple(name, fields[name]) if name in fields
                    else stage_defaults(name, n))
  return CvTConfig(**fields).validate()


def config_from_saved(fields: Mapping[str, Any]) -> CvTConfig:
  """The CvTConfig of a saved model document. Format-1 documents also held the compute settings
  (COMPUTE_FIELDS); they never were architecture, so they are dropped."""
  return make_config({k: v for k, v in dict(fields).items() if k not in COMPUTE_FIELDS})


def configs_from_official_yaml(path: str, **overrides) -> CvTConfig:
  """Reads an official experiment YAML (`MODEL.SPEC`, `MODEL.NUM_CLASSES`) into a CvTConfig."""
  with open(path) as f:
    doc = yaml.safe_load(f)
  try:
    model = doc['MODEL']
    spec = model['SPEC']
  except (KeyError, TypeError) as e:
    raise ConfigError(f'{path}: not an official CvT YAML (no MODEL.SPEC).') from e
  if 'NUM_CLASSES' in model:
    overrides.setdefault('num_classes', model['NUM_CLASSES'])
  return from_official_spec(spec, **overrides)
