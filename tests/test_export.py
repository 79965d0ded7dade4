"""`python -m cvt_flax.export`: a model as a serialized JAX program that runs without cvt-flax."""
import json

import numpy as np
import pytest

import cvt_flax
from cvt_flax import export
from helpers import DATA, PARITY_ATOL, run_python

# Runs the program in a process that never imports cvt_flax: argv = program, inputs .npz, output.
_SERVE = '''
import sys
import jax, numpy as np
exported = jax.export.deserialize(bytearray(open(sys.argv[1], 'rb').read()))
inputs = np.load(sys.argv[2])
np.savez(sys.argv[3], **{k: np.asarray(exported.call(inputs[k])) for k in inputs.files})
assert not any(m.startswith('cvt_flax') for m in sys.modules), 'cvt_flax was imported'
'''


def _serve(program, tmp_path, **inputs):
  np.savez(tmp_path / 'inputs.npz', **inputs)
  run_python(_SERVE, args=(str(program), str(tmp_path / 'inputs.npz'),
                           str(tmp_path / 'outputs.npz')), timeout=300)
  return dict(np.load(tmp_path / 'outputs.npz'))


@pytest.fixture(scope='module')
def official():
  model = cvt_flax.from_pretrained(DATA / 'official_tiny.pth', spec=DATA / 'official_tiny.json')
  return model, dict(np.load(DATA / 'official_tiny_io.npz'))


@pytest.mark.parametrize('size, index', [((64, 64), 0), ((48, 80), 1)])  # square, non-square
def test_program_reproduces_the_official_logits_at_any_batch_without_cvt_flax(official, tmp_path,
                                                                              size, index):
  model, io = official
  out = tmp_path / 'exported'
  export.export_model(model, out, image_size=size, platforms=('cpu', 'cuda', 'tpu'))
  images = io[f'input_{index}'].transpose(0, 2, 3, 1)  # batch 2, NHWC
  batches = {'one': images[:1], 'three': np.concatenate([images, images[:1]])}
  logits = _serve(out / 'model.jax', tmp_path, **batches)
  want = np.concatenate([io[f'logits_{index}'], io[f'logits_{index}'][:1]])
  np.testing.assert_allclose(logits['one'], want[:1], atol=PARITY_ATOL, rtol=0)
  np.testing.assert_allclose(logits['three'], want, atol=PARITY_ATOL, rtol=0)
  np.testing.assert_allclose(logits['three'], np.asarray(model(batches['three'])),
                             atol=PARITY_ATOL, rtol=0)
  doc = json.loads((out / 'model.json').read_text())
  assert doc['format'] == export.FORMAT and doc['config'] == model.config.to_dict()
  assert doc['program']['input'] == {'layout': 'NHWC', 'dtype': 'float32', 'normalised': True,
                                     'shape': [None, *size, 3]}
  assert doc['program']['platforms'] == ['cpu', 'cuda', 'tpu']  # lowered for all three here


def test_command_exports_an_hf_checkpoint_with_its_preprocess_and_names(tmp_path, capsys):
  out = tmp_path / 'hf'
  assert export.main([str(DATA / 'hf_tiny'), str(out), '--batch', '3', '--image-size', '64']) == 0
  assert 'float32[3,64,64,3] -> float32[3,10]' in capsys.readouterr().out
  model = cvt_flax.from_pretrained(DATA / 'hf_tiny')
  doc = json.loads((out / 'model.json').read_text())
  assert doc['preprocess'] == model.preprocess.to_dict()
  assert doc['program']['input']['shape'][0] == 3
  images = np.random.default_rng(0).normal(size=(3, 64, 64, 3)).astype(np.float32)
  logits = _serve(out / 'model.jax', tmp_path, three=images)['three']
  np.testing.assert_allclose(logits, np.asarray(model(images)), atol=PARITY_ATOL, rtol=0)


def test_bad_input_gets_one_line(tmp_path, capsys):
  (tmp_path / 'taken').mkdir()
  for argv, message in [
      ([str(DATA / 'hf_tiny'), str(tmp_path / 'taken')], 'exists; pass --overwrite'),
      ([str(tmp_path / 'nothing.pth'), str(tmp_path / 'a')], 'nothing.pth'),
      ([str(DATA / 'hf_tiny'), str(tmp_path / 'b'), '--platforms', 'gpu'], "expected some of"),
      ([str(DATA / 'hf_tiny'), str(tmp_path / 'c'), '--batch', '0'], 'positive batch size')]:
    assert export.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: ') and message in err, err
  assert sorted(p.name for p in tmp_path.iterdir()) == ['taken']  # nothing half-written
