"""Helpers shared by the training tests: a tiny CvT on the offline digits data, subprocess runs."""
import os
import pathlib
import subprocess
import sys

import pytest

from cvt_flax.training.config import default_config
from cvt_flax.training.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Two stages (16x16 px -> 8x8 -> 4x4 tokens), BatchNorm projections, a cls token, stochastic depth
# and dropout, so every kind of state (params, batch stats, RNG streams) is exercised.
TINY_MODEL = dict(
    dim_embed=(16, 32), num_heads=(1, 2), depth=(1, 1), patch_size=(3, 3), patch_stride=(2, 2),
    patch_padding=(1, 1), cls_token=(False, True), qkv_proj_method=('dw_bn', 'dw_bn'),
    kernel_qkv=(3, 3), stride_kv=(2, 2), stride_q=(1, 1), padding_kv=(1, 1), padding_q=(1, 1),
    qkv_bias=(True, True), mlp_ratio=(2.0, 2.0), drop_rate=(0.0, 0.1),
    attn_drop_rate=(0.0, 0.0), drop_path_rate=(0.0, 0.2))


def tiny_config(data_dir: str, **overrides):
  """A few-step run of TINY_MODEL on digits at 16 px with Mixup/CutMix on; `overrides` are fields."""
  c = default_config()
  c.model = TINY_MODEL
  c.input.dataset = 'digits'
  c.input.data_dir = data_dir
  c.input.eval_split = 'test'
  c.input.image_size = 16
  c.input.eval_resize = 'warp'
  c.input.crop_scale = (0.5, 1.0)
  c.input.randaugment_num_ops = 0
  c.input.random_erasing = 0.0
  c.input.cache = True
  c.input.shuffle_buffer = 2000
  c.input.num_parallel_calls = 1  # the machine has 2 cores; tests run two at a time
  c.batch_size = 16
  c.eval_batch_size = 120
  c.num_epochs = 0.0
  c.num_train_steps = 6
  c.optimizer.base_lr = 1e-3
  c.optimizer.base_batch_size = 16
  c.optimizer.warmup_steps = 2
  c.log_every_steps = 1
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 3
  c.keep_checkpoints = 10
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def train_losses(workdir) -> dict[int, float]:
  """step -> train/loss from a workdir's metrics.jsonl."""
  return {r['step']: r['train/loss'] for r in read_metrics(os.path.join(workdir, 'metrics.jsonl'))
          if 'train/loss' in r}


def build_digits(data_dir: str) -> str:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import cvt_flax.data  # pylint: disable=g-import-not-at-top,unused-import  (registers `digits`)
  tfds.builder('digits', data_dir=data_dir).download_and_prepare()
  return data_dir


# Test modules import these fixtures by name, and pytest then registers one session fixture per
# module; the memo makes them all share one dataset build and one compilation cache per process.
_SESSION_MEMO = {}


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory):
  if 'digits_dir' not in _SESSION_MEMO:
    _SESSION_MEMO['digits_dir'] = build_digits(str(tmp_path_factory.mktemp('tfds')))
  return _SESSION_MEMO['digits_dir']


_CACHE_SETTINGS = {'jax_persistent_cache_min_compile_time_secs': 0,
                   'jax_persistent_cache_min_entry_size_bytes': 0}


@pytest.fixture(scope='session')
def compile_cache(tmp_path_factory):
  """A persistent XLA compilation cache for this test session (and its subprocesses).

  The training tests run the same tiny config many times; on 2 CPU cores compiling its train step
  takes ~20 s and loading it from the cache ~2 s. A cached executable is the same program a fresh
  compile of the same HLO produces, so results do not change. Returns env vars for subprocesses.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if 'cache_dir' not in _SESSION_MEMO:
    _SESSION_MEMO['cache_dir'] = str(tmp_path_factory.mktemp('jax_cache'))
  cache_dir = _SESSION_MEMO['cache_dir']
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  for key, value in _CACHE_SETTINGS.items():
    jax.config.update(key, value)
  env = {key.upper(): str(value) for key, value in _CACHE_SETTINGS.items()}
  env['JAX_COMPILATION_CACHE_DIR'] = cache_dir
  return env


def run_python(code: str, *, args=(), env: dict | None = None, timeout: float = 600) -> str:
  """Runs `code` in a fresh interpreter (so XLA/JAX flags apply from the start); returns stdout."""
  full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / 'tests'), str(ROOT)]))
  full_env.update(env or {})
  proc = subprocess.run([sys.executable, '-c', code, *args], env=full_env, cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)
  if proc.returncode:
    raise AssertionError(f'subprocess failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n'
                         f'{proc.stderr[-6000:]}')
  return proc.stdout
