"""The core install (`pip install cvt-flax`, no extras) in a fresh virtual environment: it loads the
HF-format fixture by path and reproduces the official logits, predicts, saves, converts and exports
(the jax format), from Python and from the commands, without TensorFlow or torch; what needs an
extra says which one.

Slow: it builds the package and installs its dependencies (from pip's cache where they are).
"""
import json
import shutil
import subprocess
import sys

import pytest

from helpers import DATA, PARITY_ATOL, ROOT, photos

pytestmark = pytest.mark.slow

# Packages of the extras: none may be importable in the core install (optax and absl are there:
# flax and orbax-checkpoint themselves require them).
EXTRA_PACKAGES = ('tensorflow', 'tensorflow_datasets', 'torch', 'transformers', 'ml_collections',
                  'tensorboardX', 'sklearn', 'gcsfs', 'onnx', 'onnxruntime', 'orbax.export')

_CORE_USE = '''
import importlib, json, sys
import jax
import numpy as np
from flax import nnx
from PIL import Image
import cvt_flax
from cvt_flax import predict
from cvt_flax.runtime import compiler

hf_dir, io_path, image_path, out_dir, extra_packages = sys.argv[1:]
model = cvt_flax.from_pretrained(hf_dir)
golden = np.load(io_path)
graphdef, state = nnx.split(model)
forward = compiler.jit(lambda state, x: nnx.merge(graphdef, state)(x))
diff = max(float(np.max(np.abs(np.asarray(forward(state, golden[f'input_{i}'].transpose(0, 2, 3, 1)))
                               - golden[f'logits_{i}']))) for i in (0, 1))
top = predict.classify(model, [Image.open(image_path)], top_k=3)[0]
cvt_flax.save_model(model, out_dir)
again = cvt_flax.load_checkpoint(out_dir)
weights = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param)) + jax.tree.leaves(nnx.state(m, nnx.BatchStat))
bitwise = all(np.array_equal(a, b) for a, b in zip(weights(model), weights(again)))
importable = []
for name in extra_packages.split(','):
  try:
    importlib.import_module(name)
    importable.append(name)
  except ModuleNotFoundError:
    pass
print(json.dumps({'max_logit_diff': diff, 'top': top, 'save_load_bitwise': bitwise,
                  'importable_extras': importable}))
'''


def _run(args, **kwargs):
  return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=900,
                        cwd=kwargs.pop('cwd', None), **kwargs)


@pytest.fixture(scope='module')
def core_venv(tmp_path_factory):
  venv = tmp_path_factory.mktemp('core') / 'venv'
  assert _run([sys.executable, '-m', 'venv', venv]).returncode == 0
  python = venv / 'bin' / 'python'
  # A copy of what the package is built from, so that the build leaves nothing in the work tree.
  source = tmp_path_factory.mktemp('source')
  for name in ('cvt_flax', 'configs'):
    shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns('__pycache__'))
  for name in ('pyproject.toml', 'README.md', 'train.py'):
    shutil.copy(ROOT / name, source / name)
  install = _run([python, '-m', 'pip', 'install', '-q', str(source)])
  assert install.returncode == 0, install.stderr[-3000:]
  return python, source


def test_core_install_loads_predicts_saves_without_the_extras(core_venv, tmp_path):
  python, _ = core_venv
  image = photos(tmp_path / 'photos', formats=('png',))[0]
  out = _run([python, '-c', _CORE_USE, DATA / 'hf_tiny', DATA / 'official_tiny_io.npz', image,
              tmp_path / 'saved', ','.join(EXTRA_PACKAGES)], cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.splitlines()[-1])
  assert result['importable_extras'] == []
  assert result['max_logit_diff'] <= PARITY_ATOL  # the official PyTorch logits, via safetensors
  assert result['save_load_bitwise']

  # The predict command: the same answer, and nothing on stderr but what it was asked for.
  cli = _run([python, '-m', 'cvt_flax.predict', '--checkpoint', DATA / 'hf_tiny', '--top-k', '3',
              '--json', image], cwd=tmp_path)
  assert cli.returncode == 0 and cli.stderr == '', cli.stderr
  [answer] = json.loads(cli.stdout)
  assert [e['index'] for e in answer['top_k']] == [e['index'] for e in result['top']]
  for got, want in zip(answer['top_k'], result['top']):
    assert got['prob'] == pytest.approx(want['prob'], abs=1e-6)

  convert = _run([python, '-m', 'cvt_flax.convert', DATA / 'hf_tiny', tmp_path / 'converted'],
                 cwd=tmp_path)
  assert convert.returncode == 0 and convert.stderr == '', convert.stderr
  assert (tmp_path / 'converted' / 'config.json').is_file()

  served = _run([python, '-m', 'cvt_flax.export', DATA / 'hf_tiny', tmp_path / 'served',
                 '--image-size', '64'], cwd=tmp_path)  # the jax format needs no extra
  assert served.returncode == 0 and served.stderr == '', served.stderr
  assert (tmp_path / 'served' / 'model.jax').is_file()


@pytest.mark.parametrize('command,extra,status', [
    (['-m', 'cvt_flax.evaluate', '--checkpoint', DATA / 'hf_tiny', '--dataset', 'digits'], 'train',
     2),
    (['-m', 'cvt_flax.convert', DATA / 'official_tiny.pth', 'out'], 'torch', 2),
    (['train.py', '--config', 'digits.py', '--workdir', 'run'], 'train', 2),
    (['-m', 'cvt_flax.convert', 'gs://bucket/model', 'out'], 'gcs', 2),
    (['-m', 'cvt_flax.export', DATA / 'hf_tiny', 'out', '--format', 'onnx'], 'torch', 2),
    (['-m', 'cvt_flax.export', DATA / 'hf_tiny', 'out', '--format', 'savedmodel'], 'train', 2),
])
def test_core_install_names_the_missing_extra_in_one_line(core_venv, tmp_path, command, extra,
                                                          status):
  python, source = core_venv
  if command[0] == 'train.py':
    command = [source / 'train.py', '--config', source / 'configs' / command[2], *command[3:]]
  out = _run([python, *command], cwd=tmp_path)
  assert out.returncode == status, (out.stdout, out.stderr)
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and f"pip install 'cvt-flax[{extra}]'" in lines[0], out.stderr
