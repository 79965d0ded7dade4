"""`gs://` workdirs and models against a Cloud Storage emulator that the tests start on 127.0.0.1
(`tests/storage_emulator.py`): training, preemption and resume, the model read back by every entry
point, the commit protocols that stand in for a rename, and the errors before any work."""
import http.server
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import uuid

import jax
import numpy as np
import pytest

import cvt_flax
from cvt_flax import export, files, predict
from cvt_flax.convert.__main__ import main as convert_main
from cvt_flax.io import CheckpointError
from cvt_flax.preprocess import load_image
from cvt_flax.training import loop
from cvt_flax.training.checkpointing import WorkdirError, complete_steps
from cvt_flax.training.init_from import load_source_model
from cvt_flax.training.metrics import read_metrics
from helpers import (DATA, PARITY_ATOL, ROOT, assert_same_weights, photos, sigterm_before_step,
                     subprocess_env, tiny_config, train_losses)


def _fresh(gcs, name: str) -> str:
  """A URL no other test uses (one emulator serves every test of this process)."""
  return gcs.url_of(f'{name}-{uuid.uuid4().hex[:8]}')


def test_remote_files_basics(gcs, tmp_path):
  root = _fresh(gcs, 'files')
  files.write_json(f'{root}/a/doc.json', {'x': 1})
  assert files.read_json(f'{root}/a/doc.json') == {'x': 1}
  assert files.isfile(f'{root}/a/doc.json') and not files.isdir(f'{root}/a/doc.json')
  assert files.isdir(f'{root}/a') and not files.exists(f'{root}/b')
  files.atomic_write(f'{root}/a/blob', lambda tmp: pathlib.Path(tmp).write_bytes(b'\0' * 1000))
  assert sorted(files.listdir(f'{root}/a')) == ['blob', 'doc.json']
  with files.local_copy(f'{root}/a/doc.json', ('blob', 'missing')) as local:
    assert not files.is_remote(local) and sorted(os.listdir(os.path.dirname(local))) == [
        'blob', 'doc.json']
  files.rmtree(f'{root}/a')
  assert not files.exists(f'{root}/a/doc.json')


def test_a_remote_directory_is_complete_only_with_its_commit_file(gcs):
  url = _fresh(gcs, 'dir')
  with files.atomic_directory(url, commit_file='done', parts=('data',)) as d:
    files.write_text(f'{d}/data/x', 'old')
    assert not files.exists(f'{url}/done')
    files.write_text(f'{d}/done', '')
  with pytest.raises(FileExistsError, match=url):
    with files.atomic_directory(url, commit_file='done', parts=('data',)):
      pass
  with pytest.raises(RuntimeError):  # a failed write leaves nothing behind
    with files.atomic_directory(url, commit_file='done', parts=('data',), overwrite=True) as d:
      assert not files.exists(f'{url}/done')  # replaced: no longer complete from the start
      files.write_text(f'{d}/data/x', 'half')
      raise RuntimeError
  assert not files.exists(url)
  # What a killed write leaves (parts, no commit file) is replaced without overwrite=True ...
  files.write_text(f'{url}/data/x', 'debris')
  with files.atomic_directory(url, commit_file='done', parts=('data',)) as d:
    files.write_text(f'{d}/done', '')
  assert files.listdir(url) == ['done']
  # ... but a directory holding anything else is not.
  other = _fresh(gcs, 'other')
  files.write_text(f'{other}/notes.txt', 'mine')
  with pytest.raises(FileExistsError):
    with files.atomic_directory(other, commit_file='done', parts=('data',)):
      pass
  assert files.read_text(f'{other}/notes.txt') == 'mine'


def test_training_in_a_bucket_resumes_bitwise_after_preemption_and_a_killed_save(
    gcs, digits_dir, tmp_path, monkeypatch):
  cfg = tiny_config(digits_dir)  # 6 steps, checkpoints every 3
  full = loop.train_and_evaluate(cfg, str(tmp_path / 'local'))  # the same run on a local disk
  url = _fresh(gcs, 'run')
  with monkeypatch.context() as patch:
    sigterm_before_step(patch, 5)
    assert loop.train_and_evaluate(cfg, url) == {'step': 5, 'preempted': True}
  checkpoints = f'{url}/checkpoints'
  assert complete_steps(checkpoints) == [3, 5]
  assert sorted(train_losses(url)) == [1, 2, 3, 4, 5]  # uploaded with the checkpoint
  # A save killed before its commit file: never listed, and deleted by the next run.
  files.remove(f'{checkpoints}/5/commit_success.txt')
  assert complete_steps(checkpoints) == [3]

  assert loop.train_and_evaluate(cfg, url) == full  # resumed from step 3: same eval, bit for bit
  assert train_losses(url) == train_losses(str(tmp_path / 'local'))  # every loss, exactly
  assert [r['step'] for r in read_metrics(f'{url}/metrics.jsonl')] == [1, 2, 3, 4, 5, 6]
  assert sorted(files.listdir(checkpoints)) == ['3', '6']
  assert len(files.listdir(f'{url}/tensorboard')) == 2  # one event file per run
  assert files.read_json(f'{url}/train_config.json')['num_train_steps'] == 6


def test_a_bucket_workdir_serves_its_model_to_every_entry_point(gcs, digits_dir, tmp_path,
                                                                capsys):
  url = _fresh(gcs, 'serve')
  result = loop.train_and_evaluate(tiny_config(digits_dir, num_train_steps=3), url)
  env = {'STORAGE_EMULATOR_HOST': gcs.url}
  proc = subprocess.run(
      [sys.executable, '-m', 'cvt_flax.evaluate', '--checkpoint', url, '--dataset', 'digits',
       '--split', 'test', '--data-dir', digits_dir, '--batch-size', '120', '--json'],
      cwd=ROOT, env=subprocess_env(env), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  evaluated = json.loads(proc.stdout.strip().splitlines()[-1])
  assert (evaluated['top1'], evaluated['top5']) == (result['eval/top1'], result['eval/top5'])

  model = cvt_flax.from_pretrained(url)
  assert_same_weights(load_source_model(url), model)  # --config.init_from=gs://...
  model_url = _fresh(gcs, 'model')
  cvt_flax.save_model(model, model_url)
  loaded = cvt_flax.load_checkpoint(model_url)
  assert_same_weights(model, loaded)
  assert (loaded.preprocess, loaded.class_names) == (model.preprocess, model.class_names)
  images = [str(p) for p in photos(tmp_path)[:2]]
  capsys.readouterr()
  assert predict.main(['--checkpoint', model_url, '--top-k', '2', '--json', *images]) == 0
  answers = json.loads(capsys.readouterr().out)
  expected = predict.classify(model, [load_image(p) for p in images], top_k=2)
  assert [[e['index'] for e in a['top_k']] for a in answers] == [
      [e['index'] for e in x] for x in expected]

  with pytest.raises(FileExistsError):
    cvt_flax.save_model(model, model_url)
  # A save killed before its config.json: not a model, and the next save replaces it.
  files.remove(f'{model_url}/config.json')
  with pytest.raises(CheckpointError, match='config.json: missing'):
    cvt_flax.load_checkpoint(model_url)
  cvt_flax.save_model(model, model_url)
  assert_same_weights(model, cvt_flax.load_checkpoint(model_url))


def test_convert_reads_and_writes_urls(gcs, capsys):
  root = _fresh(gcs, 'convert')
  for name in os.listdir(DATA / 'hf_tiny'):
    files.atomic_write(f'{root}/hf/{name}',
                       lambda tmp, n=name: shutil.copyfile(DATA / 'hf_tiny' / n, tmp))
  local = cvt_flax.from_pretrained(str(DATA / 'hf_tiny'))
  assert convert_main([f'{root}/hf', f'{root}/flax']) == 0
  assert_same_weights(cvt_flax.load_checkpoint(f'{root}/flax'), local)
  # A PyTorch source at a URL is --check'ed against PyTorch from the same local copy.
  assert convert_main([f'{root}/hf', f'{root}/small.pth', '--format', 'official', '--check',
                       '--check-size', '32']) == 0
  printed = capsys.readouterr().out
  assert float(printed.split('max |logit difference| = ')[1].split()[0]) < 1e-5
  assert files.isfile(f'{root}/small.pth')


def test_export_writes_a_program_and_a_saved_model_to_a_bucket(gcs, tmp_path):
  root = _fresh(gcs, 'export')
  model = cvt_flax.from_pretrained(str(DATA / 'hf_tiny'))
  images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  for format in ('jax', 'savedmodel'):
    export.export_model(model, f'{root}/{format}', format=format, image_size=64)
    assert files.read_json(f'{root}/{format}/model.json')['program']['input']['shape'] == [
        None, 64, 64, 3]
  with files.local_copy(f'{root}/jax/model.jax') as local:
    exported = jax.export.deserialize(bytearray(pathlib.Path(local).read_bytes()))
  np.testing.assert_allclose(exported.call(images), model(images), atol=PARITY_ATOL, rtol=0)
  # The SavedModel's tree, uploaded file by file (its empty assets/ is no object).
  assert sorted(files.listdir(f'{root}/savedmodel')) == [
      'fingerprint.pb', 'model.json', 'saved_model.pb', 'variables']
  assert sorted(files.listdir(f'{root}/savedmodel/variables')) == [
      'variables.data-00000-of-00001', 'variables.index']


class _Refusing(http.server.BaseHTTPRequestHandler):
  """Cloud Storage refusing every request, as it does a service account without access."""

  def _refuse(self):
    body = json.dumps({'error': {'code': 403, 'message': 'caller does not have '
                                 'storage.objects.create access to the Google Cloud Storage '
                                 'object.'}}).encode()
    self.send_response(403)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  do_GET = do_POST = do_PUT = do_DELETE = _refuse

  def log_message(self, *args):
    pass


def test_a_missing_bucket_or_refused_write_fails_before_any_work(gcs, digits_dir, monkeypatch):
  def no_work(*args, **kwargs):
    raise AssertionError('reached model building / compilation')
  monkeypatch.setattr(loop, 'initial_or_restored_state', no_work)
  cfg = tiny_config(digits_dir)
  with pytest.raises(WorkdirError, match='workdir gs://no-such-bucket/run is not writable: '
                                         'FileNotFoundError.*bucket exists'):
    loop.train_and_evaluate(cfg, 'gs://no-such-bucket/run')

  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Refusing)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    monkeypatch.setenv('STORAGE_EMULATOR_HOST', f'http://127.0.0.1:{server.server_port}')
    with pytest.raises(WorkdirError, match=r'workdir gs://bucket/run is not writable: OSError: '
                                           r'Forbidden: .* storage.objects.create access'):
      loop.train_and_evaluate(cfg, 'gs://bucket/run')
  finally:
    server.shutdown()
