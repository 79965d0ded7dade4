"""The config files: every variant resolves, the official recipe values, locked overrides."""
import subprocess
import sys

import pytest

from cvt_flax.training.run import resolve_model_config
from cvt_flax.training.config import validate_config
from helpers import ROOT, load_config_module as _load


@pytest.mark.parametrize('arg,wd,drop_path,fsdp,eval_resize', [
    ('cvt-13,224', 0.05, 0.1, False, 'crop'), ('cvt-13,384', 0.05, 0.1, False, 'warp'),
    ('cvt-21,224', 0.1, 0.1, False, 'crop'), ('cvt-21,384', 0.1, 0.1, False, 'warp'),
    ('cvt-w24,384', 0.1, 0.3, True, 'warp')])
def test_imagenet_recipe(arg, wd, drop_path, fsdp, eval_resize):
  c = _load('imagenet').get_config(arg)
  validate_config(c)
  variant, size = arg.split(',')
  assert c.input.image_size == int(size) and c.input.resize == eval_resize
  assert c.optimizer.weight_decay == wd and c.fsdp == fsdp
  assert (c.optimizer.base_lr, c.optimizer.base_batch_size, c.batch_size) == (2e-3, 2048, 2048)
  assert (c.optimizer.warmup_epochs, c.optimizer.warmup_init_lr, c.optimizer.min_lr) == (5, 1e-6, 1e-5)
  assert (c.optimizer.b1, c.optimizer.b2, c.num_epochs, c.dtype) == (0.9, 0.999, 300, 'bfloat16')
  assert (c.mixup.mixup_alpha, c.mixup.cutmix_alpha, c.mixup.switch_prob,
          c.mixup.label_smoothing) == (0.8, 1.0, 0.5, 0.1)
  assert (c.input.randaugment_num_ops, c.input.randaugment_magnitude, c.input.randaugment_mstd,
          c.input.random_erasing, c.input.crop_pct) == (2, 9, 0.5, 0.25, 0.875)
  model = resolve_model_config(c, 1000)
  assert model.drop_path_rate == (0.0, 0.0, drop_path)
  assert model.depth == {'cvt-13': (1, 2, 10), 'cvt-21': (1, 4, 16), 'cvt-w24': (2, 2, 20)}[variant]
  assert model.num_classes == 1000


@pytest.mark.parametrize('arg', ['cifar10', 'cifar100', 'oxford_flowers102', 'oxford_iiit_pet',
                                 'imagenet384'])
def test_finetune_configs(arg):
  c = _load('finetune').get_config(arg)
  c.init_from = '/some/checkpoint'
  validate_config(c)
  assert c.model.variant == 'init_from' and c.input.image_size == 384
  assert c.init_new_head == (arg != 'imagenet384')  # ImageNet at 384 keeps its 1000-class head
  with pytest.raises(ValueError, match='init_from'):
    c.init_from = ''
    validate_config(c)


def test_digits_config_is_complete():
  c = _load('digits').get_config(None)
  validate_config(c)
  assert c.input.dataset == 'digits' and not c.input.hflip and c.mixup.prob == 0
  model = resolve_model_config(c, 10)
  assert model.dim_embed == (32, 64, 128) and model.num_classes == 10


def test_bad_config_arguments_fail_clearly():
  with pytest.raises(ValueError, match='cvt-13'):
    _load('imagenet').get_config('cvt-99,224')
  c = _load('digits').get_config(None)
  c.dtype = 'float16'
  with pytest.raises(ValueError, match='config.dtype'):
    validate_config(c)
  c.dtype, c.attention_impl = 'float32', 'splash'
  with pytest.raises(ValueError, match="config.attention_impl: 'splash' is not one of"):
    validate_config(c)
  c.attention_impl = 'auto'
  c.model.attention_impl = 'softmax'  # a compute setting where the architecture goes
  with pytest.raises(ValueError, match='are compute settings, not part of the architecture'):
    resolve_model_config(c, 10)


def test_misspelt_override_is_rejected():
  """The config is locked: a typo in --config.<field> is an error, not a silent no-op."""
  proc = subprocess.run([sys.executable, 'train.py', '--config', 'configs/digits.py', '--workdir',
                         '/nonexistent/never-created', '--config.num_epocs=3'],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert 'did you mean --config.num_epochs?' in proc.stderr
