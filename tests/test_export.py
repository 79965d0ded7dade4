"""`python -m cvt_flax.export`: a model as a JAX program, an ONNX graph or a TF SavedModel, each run
by its own runtime (jax without cvt_flax, onnxruntime, TensorFlow) against the model's logits."""
import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import cvt_flax
from cvt_flax import errors, export
from cvt_flax.data._tf import tf
from cvt_flax.export.__main__ import main
from helpers import DATA, PARITY_ATOL, exit_status, run_python

FORMATS = tuple(export.FORMATS)

# Runs the program in a process that never imports cvt_flax: argv = program, inputs .npz, output.
_SERVE_JAX = '''
import sys
import jax, numpy as np
exported = jax.export.deserialize(bytearray(open(sys.argv[1], 'rb').read()))
inputs = np.load(sys.argv[2])
np.savez(sys.argv[3], **{k: np.asarray(exported.call(inputs[k])) for k in inputs.files})
assert not any(m.startswith('cvt_flax') for m in sys.modules), 'cvt_flax was imported'
'''


def serve(out, tmp_path, **inputs) -> dict:
  """Each input batch through the exported program in OUT, run as a server would run it: the
  names and files come from OUT/model.json."""
  doc = json.loads((out / 'model.json').read_text())
  program = doc['program']
  if doc['format'] == 'cvt_flax.jax_export':
    np.savez(tmp_path / 'inputs.npz', **inputs)
    run_python(_SERVE_JAX, args=(str(out / program['file']), str(tmp_path / 'inputs.npz'),
                                 str(tmp_path / 'outputs.npz')), timeout=300)
    return dict(np.load(tmp_path / 'outputs.npz'))
  if doc['format'] == 'cvt_flax.onnx':
    runner = onnxruntime.InferenceSession(out / program['file'],
                                           providers=['CPUExecutionProvider'])
    return {k: runner.run([program['output_name']], {program['input_name']: x})[0]
            for k, x in inputs.items()}
  assert doc['format'] == 'cvt_flax.saved_model'
  signature = tf.saved_model.load(str(out)).signatures[program['signature']]
  return {k: signature(**{program['input_name']: tf.constant(x)})[program['output_name']].numpy()
          for k, x in inputs.items()}


def _op_types(path) -> set:
  return {node.op_type for node in onnx.load(path).graph.node}


@pytest.fixture(scope='module')
def official():
  model = cvt_flax.from_pretrained(DATA / 'official_tiny.pth', spec=DATA / 'official_tiny.json')
  return model, dict(np.load(DATA / 'official_tiny_io.npz'))


@pytest.mark.parametrize('size, index', [((64, 64), 0), ((48, 80), 1)])  # square, non-square
@pytest.mark.parametrize('format', FORMATS)
def test_every_format_reproduces_the_official_logits_at_any_batch(official, tmp_path, format,
                                                                  size, index):
  model, io = official
  out = tmp_path / 'exported'
  platforms = ('cpu',) if format == 'onnx' else ('cpu', 'cuda', 'tpu')
  export.export_model(model, out, format=format, image_size=size, platforms=platforms)
  images = io[f'input_{index}'].transpose(0, 2, 3, 1)  # batch 2, NHWC
  batches = {'one': images[:1], 'three': np.concatenate([images, images[:1]])}
  logits = serve(out, tmp_path, **batches)
  want = np.concatenate([io[f'logits_{index}'], io[f'logits_{index}'][:1]])
  np.testing.assert_allclose(logits['one'], want[:1], atol=PARITY_ATOL, rtol=0)
  np.testing.assert_allclose(logits['three'], want, atol=PARITY_ATOL, rtol=0)
  np.testing.assert_allclose(logits['three'], np.asarray(model(batches['three'])),
                             atol=PARITY_ATOL, rtol=0)
  doc = json.loads((out / 'model.json').read_text())
  assert doc['config'] == model.config.to_dict()
  assert doc['program']['input'] == {'layout': 'NHWC', 'dtype': 'float32', 'normalised': True,
                                     'shape': [None, *size, 3]}
  if format != 'onnx':  # lowered for all three here
    assert doc['program']['platforms'] == ['cpu', 'cuda', 'tpu']
  else:  # the official QuickGELU, x * sigmoid(1.702 x), as it is
    ops = _op_types(out / 'model.onnx')
    assert 'Sigmoid' in ops and not ops & {'Gelu', 'Erf', 'Tanh'}


@pytest.mark.parametrize('format', FORMATS)
def test_command_exports_uint8_pixels_at_a_fixed_batch_with_preprocess_and_names(tmp_path, capsys,
                                                                                 format):
  out = tmp_path / 'hf'
  assert main([str(DATA / 'hf_tiny'), str(out), '--format', format, '--batch', '3',
                      '--image-size', '64', '--input', 'uint8']) == 0
  assert 'uint8[3,64,64,3] -> float32[3,10]' in capsys.readouterr().out
  model = cvt_flax.from_pretrained(DATA / 'hf_tiny')
  doc = json.loads((out / 'model.json').read_text())
  assert doc['preprocess'] == model.preprocess.to_dict() and doc['class_names'] is None
  assert doc['program']['input'] == {'layout': 'NHWC', 'dtype': 'uint8', 'normalised': False,
                                     'shape': [3, 64, 64, 3]}
  pixels = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
  logits = serve(out, tmp_path, three=pixels)['three']
  want = model(model.preprocess.normalize(pixels.astype(np.float32)))
  np.testing.assert_allclose(logits, np.asarray(want), atol=PARITY_ATOL, rtol=0)


def test_onnx_from_a_hub_name_matches_transformers_with_exact_gelu(hub_cache, monkeypatch,
                                                                   tmp_path):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setenv('HF_HUB_CACHE', hub_cache['cache_dir'])
  out = tmp_path / 'onnx'
  assert main(['microsoft/cvt-13', str(out), '--format', 'onnx']) == 0
  doc = json.loads((out / 'model.json').read_text())
  assert doc['class_names'] == list(hub_cache['model'].config.id2label.values())
  assert doc['preprocess']['image_size'] == 224 and doc['program']['opset'] >= 18
  images = np.random.default_rng(1).normal(size=(2, 224, 224, 3)).astype(np.float32)
  logits = serve(out, tmp_path, two=images)['two']
  with torch.no_grad():
    want = hub_cache['model'](pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
  np.testing.assert_allclose(logits, want.logits.numpy(), atol=PARITY_ATOL, rtol=0)
  gelus = [n for n in onnx.load(out / 'model.onnx').graph.node if n.op_type == 'Gelu']
  assert gelus and all(a.s == b'none' for n in gelus for a in n.attribute
                       if a.name == 'approximate')  # erf GELU, never tanh's
  assert 'Tanh' not in _op_types(out / 'model.onnx')


def test_bad_input_gets_one_line(tmp_path, capsys, monkeypatch):
  (tmp_path / 'taken').mkdir()
  hf = str(DATA / 'hf_tiny')
  for argv, message in [
      ([hf, str(tmp_path / 'taken')], 'exists; pass --overwrite'),
      ([str(tmp_path / 'nothing.pth'), str(tmp_path / 'a')], 'nothing.pth'),
      ([hf, str(tmp_path / 'b'), '--platforms', 'gpu'], "expected some of"),
      ([hf, str(tmp_path / 'c'), '--batch', '0'], 'positive batch size'),
      ([hf, str(tmp_path / 'd'), '--format', 'tflite'], 'expected one of jax, onnx, savedmodel'),
      ([hf, str(tmp_path / 'e'), '--format', 'onnx', '--dtype', 'bfloat16'], 'float32 only'),
      ([hf, str(tmp_path / 'f'), '--format', 'onnx', '--platforms', 'tpu'], 'drop --platforms'),
      ([hf, str(tmp_path / 'g'), '--dtype', 'float16'], "expected 'float32' or 'bfloat16'")]:
    assert exit_status(main, argv) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: ') and message in err, err
  find_spec = errors.importlib.util.find_spec
  monkeypatch.setattr(errors.importlib.util, 'find_spec',
                      lambda name: None if name == 'onnxscript' else find_spec(name))
  assert exit_status(main, [hf, str(tmp_path / 'h'), '--format', 'onnx']) == 2
  err = capsys.readouterr().err
  assert "onnxscript is not installed" in err and "pip install 'cvt-flax[export]'" in err
  assert sorted(p.name for p in tmp_path.iterdir()) == ['taken']  # nothing half-written
