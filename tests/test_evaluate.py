"""`python -m cvt_flax.evaluate`: a checkpoint's accuracy on an image folder or a TFDS dataset, with
the checkpoint's preprocessing, through the trainer's eval code; clear errors for bad input."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import cvt_flax
from cvt_flax import data, evaluate, predict
from cvt_flax.data import pipeline
from cvt_flax.training import loop
from helpers import (HUB_LABELS, ROOT, hf_probabilities, photos, subprocess_env, tiny_config,
                     train_losses)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """imagefolder root/test/<class>/<photo>: real photos of several sizes, JPEG and PNG, under the
  hub model's class names (a photo's label is its index modulo the number of classes)."""
  root = tmp_path_factory.mktemp('folder')
  paths = photos(root / 'staging')
  labelled = []
  for i, path in enumerate(paths):
    label = i % len(HUB_LABELS)
    target = root / 'test' / f'{label}_{HUB_LABELS[label].replace(" ", "_")}' / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path, target)
    labelled.append((target, label))
  for label, name in enumerate(HUB_LABELS):  # every class has a directory, empty or not
    (root / 'test' / f'{label}_{name.replace(" ", "_")}').mkdir(parents=True, exist_ok=True)
  shutil.rmtree(root / 'staging')
  return root, labelled


def _run(*args, env=None):
  proc = subprocess.run([sys.executable, '-m', 'cvt_flax.evaluate', *args], cwd=ROOT,
                        env=subprocess_env(env), capture_output=True, text=True, timeout=600)
  return proc


def test_image_folder_agrees_image_by_image_with_hf(hub_cache, folder):
  root, labelled = folder
  model = cvt_flax.from_pretrained(hub_cache['snapshot'])
  cfg = evaluate.input_config(f'imagefolder:{root}', 'test', None, model.preprocess)
  # Image by image: the evaluate pipeline's transform through cvt-flax vs HF's processor + model.
  pixels = np.stack([pipeline.eval_transform(cfg, tf.io.read_file(str(p))).numpy()
                     for p, _ in labelled])
  top, probs = predict.predict(model, model.preprocess.normalize(pixels), top_k=len(HUB_LABELS))
  ours = np.take_along_axis(probs, np.argsort(top, axis=1), axis=1)  # back to class order
  want = hf_probabilities(hub_cache['model'], hub_cache['processor'],
                          [np.asarray(Image.open(p).convert('RGB')) for p, _ in labelled])
  # The same PIL pixels as HF's processor: what is left is float32 rounding (2e-7 measured).
  np.testing.assert_allclose(ours, want, atol=1e-5)
  assert np.array_equal(np.argmax(ours, axis=1), np.argmax(want, axis=1))
  # The command: aggregates of the same per-image results.
  proc = _run('--checkpoint', hub_cache['snapshot'], '--dataset', f'imagefolder:{root}',
              '--split', 'test', '--batch-size', '4', '--json')
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  labels = np.array([label for _, label in labelled])
  assert result['num_examples'] == len(labelled)
  assert result['top1'] == pytest.approx(np.mean(np.argmax(want, axis=1) == labels))
  assert result['loss'] == pytest.approx(-np.mean(np.log(want[np.arange(len(labelled)), labels])),
                                         abs=2e-3)
  assert '5/5 batches' not in proc.stdout and 'batches' in proc.stderr  # progress on stderr


def test_tfds_dataset_equals_the_trainers_eval_of_the_same_checkpoint(digits_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  cfg = tiny_config(digits_dir, num_train_steps=4)
  result = loop.train_and_evaluate(cfg, workdir)
  assert sorted(train_losses(workdir)) == [1, 2, 3, 4]
  proc = _run('--checkpoint', workdir, '--dataset', 'digits', '--split', 'test', '--data-dir',
              digits_dir, '--batch-size', '120', '--json')
  assert proc.returncode == 0, proc.stderr[-3000:]
  ours = json.loads(proc.stdout.strip().splitlines()[-1])
  assert ours['num_examples'] == result['eval/num_examples'] == 360
  assert ours['top1'] == result['eval/top1'] and ours['top5'] == result['eval/top5']
  assert ours['loss'] == pytest.approx(result['eval/loss'], rel=1e-6)
  assert ours['preprocess'] == {**data.eval_preprocess(cfg.input).to_dict()}


def test_a_dataset_of_another_class_count_is_refused(hub_cache, digits_dir):
  proc = _run('--checkpoint', hub_cache['snapshot'], '--dataset', 'digits', '--split', 'test',
              '--data-dir', digits_dir)
  assert proc.returncode == 2
  assert ("dataset 'digits' has 10 classes, but the checkpoint's head has 5: evaluate a checkpoint "
          'trained on this dataset') in proc.stderr


def test_an_unreadable_image_is_named(hub_cache, folder, tmp_path):
  root = tmp_path / 'bad'
  shutil.copytree(folder[0], root)
  broken = next((root / 'test').glob('*/*.jpg'))
  broken.write_bytes(b'not a jpeg at all')
  proc = _run('--checkpoint', hub_cache['snapshot'], '--dataset', f'imagefolder:{root}',
              '--split', 'test', '--batch-size', '4')
  assert proc.returncode == 2
  assert str(broken) in proc.stderr and 'Remove or re-encode the file' in proc.stderr


def test_eval_batches_cover_each_example_once(hub_cache, folder):
  root, labelled = folder
  model = cvt_flax.from_pretrained(hub_cache['snapshot'])
  cfg = evaluate.input_config(f'imagefolder:{root}', 'test', None, model.preprocess)
  count = sum(int(b['mask'].sum()) for b in pipeline.make_eval_iterator(cfg, global_batch_size=3))
  assert count == len(labelled)
