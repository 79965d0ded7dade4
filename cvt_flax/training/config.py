"""The training config: every field the trainer reads, with the official CvT-13 recipe as defaults.

The files in `configs/` start from `default_config()` and change what their experiment needs. All
fields exist from the start with their final types, so the config can be locked and a mistyped
`--config.<field>` override fails instead of being ignored.
"""
from __future__ import annotations

from ml_collections import ConfigDict

from cvt_flax.data import default_input_config
from cvt_flax.errors import ConfigError
from cvt_flax.models import compute
from cvt_flax.training.mixup import default_mixup_config
from cvt_flax.training.optim import default_optimizer_config


def default_config() -> ConfigDict:
  c = ConfigDict()
  c.seed = 0
  # Model: the architecture, a ConfigDict passed to `cvt_flax.create_model`: `variant` ('cvt-13',
  # 'cvt-21', 'cvt-w24', or 'init_from' = the architecture of the init_from checkpoint) plus field
  # overrides, or explicit fields. num_classes comes from the dataset.
  c.model = ConfigDict({'variant': 'cvt-13'})
  # Compute settings (`cvt_flax.models.Compute`): how the model computes, not what; not part of the
  # checkpointed model, so they may change when a run resumes. 'auto' = the fast path for the
  # platform of the mesh's devices.
  c.dtype = 'float32'  # 'bfloat16': bf16 compute, float32 master weights, LayerNorm/softmax float32.
  # 'softmax' | 'deferred' | 'recompute' | 'blocked' (CPU) | 'xla_fused' | 'cudnn' | 'flash' (TPU)
  c.attention_impl = 'auto'
  c.dwconv_impl = 'auto'  # 'xla' | 'shifts' (CPU) | 'fused' (TPU)
  c.mlp_impl = 'auto'  # 'xla' | 'fused' (TPU)
  # Recompute activations in the backward pass: 'none', 'block' (keep only each block's input) or
  # a jax.checkpoint_policies name per block ('dots_saveable', ...). For W24 or large batches.
  c.remat = 'none'
  c.input = default_input_config()
  c.mixup = default_mixup_config()
  c.optimizer = default_optimizer_config()
  # Length: num_train_steps if > 0, else num_epochs (of the train split at `batch_size`).
  c.num_epochs = 300.0
  c.num_train_steps = -1
  c.batch_size = 2048  # global, over all devices and processes
  c.eval_batch_size = -1  # -1: batch_size
  c.grad_accum_steps = 1  # the global batch is split into this many sequential microbatches
  # Start from existing weights ('' = from scratch): a .pth/.bin/.safetensors file, a HF directory,
  # a converted model directory or a training workdir. Ignored when resuming.
  c.init_from = ''
  # PyTorch init_from only: the architecture ('cvt-13' or an official YAML / JSON spec file) when
  # it cannot be inferred from the weights ('' = infer, or the HF config.json).
  c.init_from_spec = ''
  c.init_new_head = False  # True: train a fresh head (needed when the checkpoint's classes differ)
  # Scale: one mesh over all devices, data parallel; fsdp also shards weights and optimizer state.
  c.fsdp = False
  c.fsdp_min_size = 2 ** 16  # arrays with fewer elements stay replicated under fsdp
  # Logging, evaluation, checkpoints (steps are optimizer steps).
  c.log_every_steps = 50
  c.eval_every_steps = 5000  # 0: only at the end
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.checkpoint_async = True
  c.peak_flops_per_device = 0.0  # for the MFU estimate; 0 = unknown, no MFU (e.g. 197e12 TPU v4)
  # > 0: write a jax.profiler trace (TensorBoard / XProf) of this many train steps, from the second
  # step after the start or resume (the first one compiles), to WORKDIR/profile.
  c.profile_steps = 0
  return c


def validate_config(c: ConfigDict) -> None:
  """Raises ConfigError naming the first field whose value cannot work."""
  def fail(field, why):
    raise ConfigError(f'config.{field}: {why}')

  compute.check_config(c)
  if c.batch_size <= 0:
    fail('batch_size', 'must be positive')
  if c.grad_accum_steps < 1:
    fail('grad_accum_steps', 'must be >= 1')
  if c.num_train_steps <= 0 and c.num_epochs <= 0:
    fail('num_train_steps', 'set num_train_steps > 0 or num_epochs > 0')
  if c.profile_steps < 0:
    fail('profile_steps', 'must be >= 0 (0: no trace)')
  for field in ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints'):
    if c[field] < 1:
      fail(field, 'must be >= 1')
  if c.eval_every_steps < 0:
    fail('eval_every_steps', 'must be >= 0 (0: evaluate only at the end)')
  if c.model.get('variant') == 'init_from' and not c.init_from:
    fail('model.variant', "'init_from' needs config.init_from")
