"""Plain helpers and constants shared by the tests (the pytest fixtures live in conftest.py).

Golden data: `tests/data/` (see its README), made by the official PyTorch CvT in float32.

Numeric tolerances. Every comparison of two float32 computations states which two it compares;
the bounds below come from measured noise floors, not from what happened to pass:
  * One float32 forward pass of the tiny fixture models (either framework, any implementation
    switch) against the same model in float64 (`float64_reference`): stage maps (|x| <= 5) differ
    by <= 3.0e-6 (about 5 ulps), logits (|x| <= 0.5) by <= 8e-8. Measured on an Intel Xeon
    (family 6 model 207, Emerald Rapids, AVX-512) and in agreement with the 1.4e-6 seen between
    two CPUs of other generations (AMD Zen 3 vs Zen 4).
  * Two float32 computations (two frameworks, or one framework on two CPUs or thread counts) differ
    by at most the sum of their errors: <= 6e-6 on stages, <= 1.6e-7 on logits.
  * PARITY_ATOL = 1e-5 absolute, the project's parity bar on logits and stage maps, is above that
    on every machine; it is never loosened. Against the float64 reference (which every CPU
    computes to ~1e-15) the fixtures' own float32 error is a constant, 2.9e-6 at most.
"""
import functools
import importlib.util
import json
import os
import pathlib
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import jax
import numpy as np
import pytest
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / 'tests' / 'data'
PARITY_ATOL = 1e-5
# The TPU slices whose first device every kernel's Mosaic compile is checked on: v5e; TPU7x, whose
# XLA lays bfloat16 arrays out in (16, 128) tiles; and v4, whose 16 MiB of VMEM per core the
# kernels' plans must hold (`tpu.blocks.VMEM_BUDGET`; TPU7x has 64 MiB), in the slow suite.
MOSAIC_SLICES = ('v5e-1', 'tpu7x-8', pytest.param('v4-8', marks=pytest.mark.slow))
LOGITS_FP32_PAIR_ATOL = 1e-6  # two float32 logit computations: measured <= 1.6e-7 (see above)


# --------------------------------------------------------------------------------------------------
# Golden fixtures and model forward passes.

def load_fixture(name):
  """(meta json, io npz) of an official fixture, e.g. 'official_tiny'."""
  meta = json.loads((DATA / f'{name}.json').read_text())
  io = dict(np.load(DATA / f'{name}_io.npz'))
  return meta, io


def fixture_state_dict(name):
  """The fixture's official state dict as numpy arrays (read with torch, weights only)."""
  import torch  # pylint: disable=g-import-not-at-top
  return {k: v.numpy() for k, v in torch.load(DATA / f'{name}.pth', weights_only=True).items()}


@functools.partial(jax.jit, static_argnums=0)
def _logits_and_features(graphdef, state, images):
  model = nnx.merge(graphdef, state)
  return model(images), model.features(images)


def logits_and_features(model, images_nhwc):
  """One jitted forward, compiled once per architecture and input shape (dispatching every op
  eagerly is much slower on CPU)."""
  return jax.tree.map(np.asarray, _logits_and_features(*nnx.split(model), images_nhwc))


def fixture_model(name, **compute):
  """(model in eval mode, meta, io) of an official fixture, loaded through the strict low-level
  state-dict table; `compute` (dtype, implementation switches) goes to create_model."""
  import cvt_flax  # pylint: disable=g-import-not-at-top
  from cvt_flax.convert.official import load_official_state_dict  # pylint: disable=g-import-not-at-top
  meta, io = load_fixture(name)
  model = cvt_flax.create_model(meta['spec'], num_classes=meta['num_classes'], rngs=nnx.Rngs(0),
                                activation=meta['activation'], **compute)
  load_official_state_dict(model, fixture_state_dict(name))
  model.eval()
  return model, meta, io


def float64_reference(name):
  """The official PyTorch reference of a fixture in float64: the exact values that float32
  results are measured against (its float64 rounding, ~1e-15, is the same on every CPU)."""
  import torch  # pylint: disable=g-import-not-at-top
  from cvt_flax.convert.torch_reference import build_reference_model  # pylint: disable=g-import-not-at-top
  meta, _ = load_fixture(name)
  model = build_reference_model(meta['spec'], meta['num_classes'], activation=meta['activation'])
  model.load_state_dict(torch.load(DATA / f'{name}.pth', weights_only=True), strict=True)
  return model.double().eval()


def assert_same_weights(a, b):
  """The two models hold the same weights, bit for bit and of the same dtypes."""
  from cvt_flax.convert import to_official_state_dict  # pylint: disable=g-import-not-at-top
  wa, wb = to_official_state_dict(a), to_official_state_dict(b)
  assert sorted(wa) == sorted(wb)
  for key in wa:
    assert wa[key].dtype == wb[key].dtype and np.array_equal(wa[key], wb[key]), key


def assert_same_gradients(want, got, relative=1e-5):
  """Two gradient states (`nnx.grad`'s) agree leaf by leaf, each within `relative` of the largest
  gradient of all: float32 reordering between two ways of computing one model."""
  pairs = [(path, np.asarray(w.get_value()), np.asarray(g.get_value()))
           for (path, w), (_, g) in zip(nnx.to_flat_state(want), nnx.to_flat_state(got))]
  largest = max(np.abs(w).max() for _, w, _ in pairs)
  for path, w, g in pairs:
    assert np.abs(g - w).max() <= relative * largest, path


def on_one_and_four_cpu_devices(code: str):
  """Runs `code`, which prints 'RESULT' and JSON of {'one': ..., 'four': ...}, in a process with
  four CPU devices; returns the two."""
  stdout = run_python(code, env={'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
                                 'JAX_PLATFORMS': 'cpu'})
  out = json.loads(stdout.split('RESULT', 1)[1])
  return out['one'], out['four']


def perturb_(model, seed):
  """Moves every tensor of a torch model away from its init, so that a wrong mapping shows."""
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in model.state_dict().items():
      if name.endswith('num_batches_tracked'):
        t.fill_(7)
      elif name.endswith('running_var'):
        t.copy_(0.5 + torch.rand(t.shape, generator=gen))
      else:
        t.add_(0.1 * torch.randn(t.shape, generator=gen))


# --------------------------------------------------------------------------------------------------
# Training runs on the offline digits data.

# Two stages (16x16 px -> 8x8 -> 4x4 tokens), BatchNorm projections, a cls token, stochastic depth
# and dropout, so every kind of state (params, batch stats, RNG streams) is exercised.
TINY_MODEL = dict(variant='tiny', drop_rate=(0.0, 0.1), drop_path_rate=(0.0, 0.2))


def load_module(path: pathlib.Path):
  """A Python file that is not in a package (a config, a benchmark) as a module."""
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config_module(name: str):
  """configs/<name>.py as a module (its get_config(arg) builds the config)."""
  return load_module(ROOT / 'configs' / f'{name}.py')


def input_config(dataset: str, data_dir: str | None = None, **overrides):
  """A locked input config for `dataset` at 16 px (TFDS's evaluation split of the datasets the
  configs name, else 'test'), with `overrides` (input config field -> value)."""
  import cvt_flax.data  # pylint: disable=g-import-not-at-top
  cfg = cvt_flax.data.default_input_config()
  cfg.dataset = dataset
  cfg.data_dir = data_dir
  cfg.eval_split = {'imagenet2012': 'validation'}.get(dataset, 'test')
  cfg.image_size = 16
  cfg.update(overrides)
  cfg.lock()
  return cfg


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
  """A PNG whose valid header declares width x height grey pixels, with no pixel data: what a
  decompression bomb shows a reader before it decodes (a real one of 30000 x 30000 is 109 KB)."""
  def chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack('>I', len(payload)) + kind + payload
            + struct.pack('>I', zlib.crc32(kind + payload)))
  header = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)  # 8-bit grey
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(b''))
          + chunk(b'IEND', b''))


# An all-white batch (uint8 255), normalised by ImageNet's mean and std, is above this everywhere;
# a batch of real images is not (the digits' black backgrounds normalise to about -2).
WHITE = 2.0


def white_images_at_step(monkeypatch, step: int):
  """The trainer's train iterator, with the batch of `step` (1-based) all white."""
  from cvt_flax.training import loop  # pylint: disable=g-import-not-at-top
  real = loop.data.make_train_iterator

  def wrapped(*args, start_step=0, **kwargs):
    for i, batch in enumerate(real(*args, start_step=start_step, **kwargs), start=start_step):
      yield dict(batch, image=np.full_like(batch['image'], 255)) if i + 1 == step else batch

  monkeypatch.setattr(loop.data, 'make_train_iterator', wrapped)


def tiny_config(data_dir: str, **overrides):
  """A few-step run of TINY_MODEL on digits at 16 px with Mixup/CutMix on; `overrides` are
  dotted field names ('input.image_size') -> values."""
  from cvt_flax.training.config import default_config  # pylint: disable=g-import-not-at-top
  c = default_config()
  c.model = TINY_MODEL
  c.input.dataset = 'digits'
  c.input.data_dir = data_dir
  c.input.eval_split = 'test'
  c.input.image_size = 16
  c.input.resize = 'warp'
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
  from cvt_flax.training.metrics import read_metrics  # pylint: disable=g-import-not-at-top
  return {r['step']: r['train/loss'] for r in read_metrics(os.path.join(workdir, 'metrics.jsonl'))
          if 'train/loss' in r}


def sigterm_before_step(monkeypatch, step):
  """Makes training send its own process a real SIGTERM when the batch of optimizer step `step` is
  taken (as a preemption notice would arrive)."""
  from cvt_flax.training import loop  # pylint: disable=g-import-not-at-top
  real = loop.data.make_train_iterator

  def wrapped(*args, start_step=0, **kwargs):
    for i, batch in enumerate(real(*args, start_step=start_step, **kwargs), start=start_step):
      if i + 1 == step:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(loop.data, 'make_train_iterator', wrapped)


def build_digits(data_dir: str) -> str:
  from cvt_flax.data import digits  # pylint: disable=g-import-not-at-top
  digits.Digits(data_dir=data_dir).download_and_prepare()
  return data_dir


# --------------------------------------------------------------------------------------------------
# Subprocesses.

def exit_status(main, argv) -> int:
  """What a command's `main(argv)` returns, or the status it exits with (`errors.fail`)."""
  try:
    return main(argv)
  except SystemExit as e:
    return e.code


def subprocess_env(extra: dict | None = None) -> dict:
  """The environment for a Python subprocess that imports cvt_flax and these helpers, on CPU."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([str(ROOT / 'tests'), str(ROOT)]))
  env.pop('XLA_FLAGS', None)
  env.update(extra or {})
  return env


def run_python(code: str, *, args=(), env: dict | None = None, timeout: float = 600) -> str:
  """Runs `code` in a fresh interpreter (so XLA/JAX flags apply from the start); returns stdout."""
  proc = subprocess.run([sys.executable, '-c', code, *args], env=subprocess_env(env), cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  if proc.returncode:
    raise AssertionError(f'subprocess failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n'
                         f'{proc.stderr[-6000:]}')
  return proc.stdout


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


TRAIN_PROCESS_TIMEOUT = 300  # seconds; a tiny run takes ~15 s (plus ~20 s to compile, cold cache)

_TRAIN_WORKER = textwrap.dedent('''
    import os, runpy, sys, time
    hang_step = os.environ.get('FAILTEST_HANG_SAVE_OF_STEP')
    if hang_step:
      # Holds the save of that step just before Orbax renames its temporary directory into place:
      # all files are written (commit_success.txt too), but the checkpoint is not final yet.
      from orbax.checkpoint._src.path import atomicity
      rename = atomicity.async_path.rename
      async def hanging_rename(src, dst, *args, **kwargs):
        if os.path.basename(str(dst)) == hang_step:
          open(os.environ['FAILTEST_MARKER'], 'w').close()
          time.sleep(3600)
        return await rename(src, dst, *args, **kwargs)
      atomicity.async_path.rename = hanging_rename
    hold_step = os.environ.get('FAILTEST_HOLD_COMMIT_OF_STEP')
    if hold_step:
      # On Cloud Storage: holds the save of that step just before its commit_success.txt is
      # written (every other file is), until the file FAILTEST_RELEASE exists.
      from orbax.checkpoint._src.path import atomicity
      finalize = atomicity.CommitFileTemporaryPath.finalize
      async def held_finalize(self, *args, **kwargs):
        if self._final_path.name == hold_step:
          open(os.environ['FAILTEST_MARKER'], 'w').close()
          while not os.path.exists(os.environ['FAILTEST_RELEASE']):
            time.sleep(0.1)
        return await finalize(self, *args, **kwargs)
      atomicity.CommitFileTemporaryPath.finalize = held_finalize
    delay = float(os.environ.get('FAILTEST_BATCH_DELAY', '0'))  # slows every step down
    mark_step = int(os.environ.get('FAILTEST_MARK_STEP', '0'))  # creates FAILTEST_MARKER then
    if delay or mark_step:
      from cvt_flax.training import loop
      make_train_iterator = loop.data.make_train_iterator
      def hooked(*args, start_step=0, **kwargs):
        batches = make_train_iterator(*args, start_step=start_step, **kwargs)
        for step, batch in enumerate(batches, start_step + 1):
          if step == mark_step:
            open(os.environ['FAILTEST_MARKER'], 'w').close()
          time.sleep(delay)
          yield batch
      loop.data.make_train_iterator = hooked
    sys.argv = ['train.py', *sys.argv[1:]]
    runpy.run_path('train.py', run_name='__main__')
''')


def write_config_file(directory, name: str, data_dir: str, **overrides) -> pathlib.Path:
  """A configs/*.py-style file whose get_config() is `tiny_config(data_dir, **overrides)`."""
  path = pathlib.Path(directory) / f'{name}.py'
  path.write_text(textwrap.dedent(f'''
      from helpers import tiny_config
      def get_config():
        return tiny_config({data_dir!r}, **{overrides!r})
  '''))
  return path


class TrainProcess:
  """A `train.py` subprocess whose stdout/stderr go to files (readable while it runs).

  `hooks`: FAILTEST_* environment variables for the fault hooks of `_TRAIN_WORKER`.
  """

  def __init__(self, tmp_path, name, config, workdir, cache_env, *flags, **hooks):
    self.out, self.err = tmp_path / f'{name}.out', tmp_path / f'{name}.err'
    env = subprocess_env({**cache_env, **hooks})
    with open(self.out, 'w') as out, open(self.err, 'w') as err:
      self.proc = subprocess.Popen(
          [sys.executable, '-c', _TRAIN_WORKER, '--config', str(config), '--workdir',
           str(workdir), *flags], cwd=ROOT, env=env, stdout=out, stderr=err)

  def stderr(self) -> str:
    return self.err.read_text()

  def stdout(self) -> str:
    return self.out.read_text()

  def wait_for(self, condition, what: str) -> None:
    deadline = time.monotonic() + TRAIN_PROCESS_TIMEOUT
    while not condition():
      if self.proc.poll() is not None:
        raise AssertionError(f'train.py exited ({self.proc.returncode}) before {what}:\n'
                             f'{self.stdout()[-2000:]}\n{self.stderr()[-4000:]}')
      if time.monotonic() > deadline:
        self.proc.kill()
        raise AssertionError(f'timed out waiting for {what}')
      time.sleep(0.1)

  def finish(self, expect_returncode=0, timeout=TRAIN_PROCESS_TIMEOUT) -> str:
    try:
      self.proc.wait(timeout=timeout)
    finally:
      if self.proc.poll() is None:
        self.proc.kill()
    assert self.proc.returncode == expect_returncode, (
        f'returncode {self.proc.returncode}:\n{self.stdout()[-2000:]}\n{self.stderr()[-4000:]}')
    return self.stdout()


# --------------------------------------------------------------------------------------------------
# The Hugging Face hub, offline.

def lay_out_hub_cache(cache_dir, repo_id: str, files_dir, commit: str = '0123456789abcdef' * 2
                      + '01234567') -> str:
  """Puts the files of `files_dir` into a hub cache as huggingface_hub lays it out
  (models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>,
  refs/main}); returns the snapshot directory."""
  import hashlib  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  repo = pathlib.Path(cache_dir) / ('models--' + repo_id.replace('/', '--'))
  snapshot = repo / 'snapshots' / commit
  for d in (repo / 'blobs', repo / 'refs', snapshot):
    d.mkdir(parents=True, exist_ok=True)
  (repo / 'refs' / 'main').write_text(commit)
  for path in sorted(pathlib.Path(files_dir).iterdir()):
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    shutil.copyfile(path, repo / 'blobs' / digest)
    (snapshot / path.name).symlink_to(pathlib.Path('..', '..', 'blobs', digest))
  return str(snapshot)


HUB_LABELS = ('tabby cat', 'espresso', 'rocket', 'astronaut', 'teapot')


def save_random_hf_cvt(directory, image_size: int = 224, seed: int = 0):
  """A small random HF CvtForImageClassification (perturbed, with named labels) saved as on the
  hub: config.json, model.safetensors, preprocessor_config.json. Returns (model, processor)."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import CvtConfig, CvtForImageClassification  # pylint: disable=g-import-not-at-top
  from transformers.models.convnext.image_processing_pil_convnext import (  # pylint: disable=g-import-not-at-top
      ConvNextImageProcessorPil)
  torch.manual_seed(seed)
  model = CvtForImageClassification(CvtConfig(
      embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3],
      id2label=dict(enumerate(HUB_LABELS)), label2id={n: i for i, n in enumerate(HUB_LABELS)}))
  perturb_(model, seed=seed + 1)
  model.eval().save_pretrained(directory)
  processor = ConvNextImageProcessorPil(size={'shortest_edge': image_size}, crop_pct=0.875)
  processor.save_pretrained(directory)
  return model, processor


def hf_probabilities(model, processor, images) -> np.ndarray:
  """Softmax outputs of HF's image processor + model, one row per image."""
  import torch  # pylint: disable=g-import-not-at-top
  pixels = processor(images=list(images), return_tensors='pt')['pixel_values']
  with torch.no_grad():
    return torch.softmax(model(pixel_values=pixels).logits, dim=-1).numpy()


def photos(directory, formats=('jpg', 'png')) -> list[pathlib.Path]:
  """scikit-image's real photos written as files in several sizes and aspect ratios."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  out = []
  for i, (name, scale) in enumerate([('chelsea', 1.0), ('coffee', 0.7), ('rocket', 1.0),
                                      ('astronaut', 0.5), ('chelsea', 0.6)]):
    img = Image.fromarray(getattr(skimage.data, name)())
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    path = directory / f'{name}_{i}.{formats[i % len(formats)]}'
    img.save(path, quality=95) if path.suffix == '.jpg' else img.save(path)
    out.append(path)
  return out
