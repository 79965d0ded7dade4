"""Input pipelines on TFDS mock data (ImageNet, CIFAR) and on the real, locally built digits dataset."""
import collections
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import cvt_flax.data as data
from cvt_flax.data import digits, synthetic
from helpers import ROOT, input_config, subprocess_env

NUM_CLASSES = {'imagenet2012': 1000, 'cifar10': 10, 'cifar100': 100}


@pytest.fixture(scope='module')
def auto_prepared_dir(tmp_path_factory):
  """An empty TFDS data dir: the pipeline prepares `digits` in it on first use (unlike conftest's
  `digits_dir`, which is built up front)."""
  return str(tmp_path_factory.mktemp('tfds'))


def _take(iterator, num):
  return [next(iterator) for _ in range(num)]


@pytest.mark.parametrize('dataset', sorted(NUM_CLASSES))
def test_mock_dataset_train_and_eval(dataset):
  with tfds.testing.mock_data(num_examples=10):
    cfg = input_config(dataset, random_erasing=0.0)  # No boxes: checked below.
    info = data.get_dataset_info(cfg)
    assert info[:3] == (NUM_CLASSES[dataset], 10, 10)
    assert len(info.class_names) == NUM_CLASSES[dataset]  # TFDS's label names
    for batch in _take(data.make_train_iterator(cfg, global_batch_size=4, seed=0), 4):
      assert set(batch) == {'image', 'label'}
      assert batch['image'].shape == (4, 16, 16, 3) and batch['image'].dtype == np.uint8
      assert batch['label'].shape == (4,) and batch['label'].dtype == np.int32
      assert np.all((batch['label'] >= 0) & (batch['label'] < info.num_classes))

    batches = list(data.make_eval_iterator(cfg, global_batch_size=4))
    assert len(batches) == 3  # 10 examples in batches of 4: the last one has 2 real, 2 padding.
    for batch in batches:
      assert batch['image'].shape == (4, 16, 16, 3) and batch['image'].dtype == np.uint8
      assert batch['mask'].dtype == np.float32
      assert batch['label'].dtype == np.int32
    np.testing.assert_array_equal(batches[-1]['mask'], [1, 1, 0, 0])
    assert np.all(batches[-1]['image'][2:] == 0) and np.all(batches[-1]['label'][2:] == 0)
    real = np.concatenate([b['image'][b['mask'] == 1] for b in batches]).reshape(-1, 3)
    assert real.shape[0] == 10 * 16 * 16
    assert real.std() > 10  # Actual images, not padding.


def test_mock_random_erasing_sends_boxes_inside_the_images():
  with tfds.testing.mock_data(num_examples=8):
    cfg = input_config('imagenet2012', random_erasing=1.0)
    boxes = next(data.make_train_iterator(cfg, global_batch_size=8, seed=0))['erase']
  assert boxes.shape == (8, 4) and boxes.dtype == np.int32
  top, left, height, width = boxes.T
  assert np.all(height > 0)  # probability 1: a box fits on 16 x 16 almost always
  assert np.all((top >= 0) & (left >= 0) & (top + height <= 16) & (left + width <= 16))
  assert len({tuple(b) for b in boxes}) > 1


def test_digits_builder(auto_prepared_dir):
  cfg = input_config('digits', auto_prepared_dir)
  assert data.get_dataset_info(cfg) == data.DatasetInfo(  # Builds on first use.
      10, 1437, 360, tuple(str(i) for i in range(10)))
  builder = digits.Digits(data_dir=auto_prepared_dir)
  assert builder.info.features['image'].shape == (8, 8, 1)
  splits = {name: tfds.as_numpy(builder.as_dataset(split=name, batch_size=-1))
            for name in ('train', 'test')}
  sk_images, sk_labels = digits.load_sklearn_digits()
  assert sk_images.max() == 255 and sk_images.min() == 0
  # Together the splits are exactly scikit-learn's 1,797 images (as a multiset, with labels).
  key = lambda images, labels: collections.Counter(
      (img.tobytes(), int(lab)) for img, lab in zip(images, labels))
  built = key(splits['train']['image'], splits['train']['label'])
  built.update(key(splits['test']['image'], splits['test']['label']))
  assert built == key(sk_images, sk_labels)
  # Stratified: every class has ~20% of its images in test, and all 10 classes are present.
  class_counts = np.bincount(sk_labels, minlength=10)
  test_fraction = np.bincount(splits['test']['label'], minlength=10) / class_counts
  assert np.all(np.abs(test_fraction - 360 / 1797) < 0.01)


def test_digits_pipeline_shapes_grey_to_rgb_and_upsampling(auto_prepared_dir):
  cfg = input_config('digits', auto_prepared_dir, image_size=24, randaugment_num_ops=0,
                     random_erasing=0.0, hflip=False, crop_scale=(1.0, 1.0),
                     crop_ratio=(1.0, 1.0))
  batch = next(data.make_train_iterator(cfg, global_batch_size=8, seed=0))
  assert batch['image'].shape == (8, 24, 24, 3)
  # Grey -> RGB: the three channels carry the same 0-255 values.
  pixels = batch['image']
  np.testing.assert_array_equal(pixels[..., 0], pixels[..., 1])
  np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])
  eval_batch = next(data.make_eval_iterator(cfg, global_batch_size=8))
  assert eval_batch['image'].shape == (8, 24, 24, 3) and eval_batch['mask'].all()


def test_resume_equals_uninterrupted_run(auto_prepared_dir):
  # Full augmentation: crop, flip, RandAugment, erasing.
  cfg = input_config('digits', auto_prepared_dir)
  uninterrupted = _take(data.make_train_iterator(cfg, global_batch_size=64, seed=3), 25)
  # 1,437 examples per epoch: batch 22 spans the end of epoch 0 and the start of epoch 1.
  for start in (2, 21):
    resumed = _take(data.make_train_iterator(cfg, global_batch_size=64, seed=3, start_step=start), 3)
    for expected, got in zip(uninterrupted[start:start + 3], resumed):
      for key in ('image', 'label', 'erase'):
        np.testing.assert_array_equal(got[key], expected[key])
  other_seed = next(data.make_train_iterator(cfg, global_batch_size=64, seed=4))
  assert not np.array_equal(other_seed['image'], uninterrupted[0]['image'])
  # Epochs are reshuffled: the label sequence of epoch 1 differs from epoch 0's.
  labels = np.concatenate([b['label'] for b in uninterrupted])
  assert not np.array_equal(labels[:400], labels[1437:1837])


def _epoch_records(cfg, process_index, process_count, epoch_size):
  """The images of the first epoch of one process's stream (augmentation off: images identify
  records), as a multiset of (image bytes, label)."""
  batch = 64 // process_count
  iterator = data.make_train_iterator(cfg, global_batch_size=64, seed=0,
                                      process_index=process_index, process_count=process_count)
  batches = _take(iterator, -(-epoch_size // batch))
  images = np.concatenate([b['image'] for b in batches])[:epoch_size]
  labels = np.concatenate([b['label'] for b in batches])[:epoch_size]
  assert all(b['image'].shape[0] == batch for b in batches)
  return collections.Counter((img.tobytes(), int(lab)) for img, lab in zip(images, labels))


def test_two_processes_read_disjoint_train_data(auto_prepared_dir):
  cfg = input_config('digits', auto_prepared_dir, image_size=8, randaugment_num_ops=0,
                     random_erasing=0.0, hflip=False, crop_scale=(1.0, 1.0),
                     crop_ratio=(1.0, 1.0))
  everything = _epoch_records(cfg, 0, 1, 1437)
  first, second = (_epoch_records(cfg, p, 2, 1437 // 2) for p in (0, 1))
  both = first + second
  assert sum(both.values()) == 1436  # 1,437 // 2 each; the odd example is dropped.
  # Multiset inclusion: any record read by both processes would be counted twice here.
  assert not both - everything


def test_two_processes_cover_eval_once(auto_prepared_dir):
  cfg = input_config('digits', auto_prepared_dir, image_size=8)
  def records(process_index, process_count):
    batches = list(data.make_eval_iterator(cfg, global_batch_size=64, process_index=process_index,
                                           process_count=process_count))
    assert all(b['image'].shape[0] == 64 // process_count for b in batches)
    found = collections.Counter()
    for b in batches:
      for img, lab in zip(b['image'][b['mask'] == 1], b['label'][b['mask'] == 1]):
        found[(img.tobytes(), int(lab))] += 1
    return len(batches), found
  num_single, single = records(0, 1)
  (num_first, first), (num_second, second) = records(0, 2), records(1, 2)
  assert num_single == 6 and num_first == num_second == 6  # 180 per process, 32 per batch.
  assert sum(single.values()) == 360
  assert first + second == single


def test_config_is_lockable_and_overridable():
  cfg = data.default_input_config()
  cfg.lock()
  cfg.data_dir = '/x'
  cfg.num_parallel_calls = 4
  cfg.randaugment_magnitude = 10  # An int for a float field is fine.
  assert (cfg.data_dir, cfg.num_parallel_calls) == ('/x', 4)
  with pytest.raises(AttributeError):
    cfg.data_dri = '/x'
  with pytest.raises(TypeError):
    cfg.data_dir = 3


def test_bad_inputs_raise_clear_errors(auto_prepared_dir, tmp_path):
  cfg = input_config('digits', auto_prepared_dir)
  with pytest.raises(ValueError, match='process_count=3'):
    data.make_train_iterator(cfg, global_batch_size=64, seed=0, process_count=3)
  with pytest.raises(ValueError, match='process_index=2'):
    data.make_eval_iterator(cfg, global_batch_size=64, process_index=2, process_count=2)
  with pytest.raises(ValueError, match=r"no split 'validation'; its splits: train, test"):
    data.get_dataset_info(input_config('digits', auto_prepared_dir, eval_split='validation'))
  with pytest.raises(ValueError, match='resize'):
    data.make_eval_iterator(input_config('digits', auto_prepared_dir, resize='squash'),
                            global_batch_size=8)
  with pytest.raises(FileNotFoundError, match='cifar10.*not prepared'):  # Never downloads.
    data.get_dataset_info(input_config('cifar10', str(tmp_path)))


def test_synthetic_jpegs_time_the_train_pipeline(tmp_path):
  """What `python -m cvt_flax.aot --measure_host` runs, at a small size."""
  builder = synthetic.build(str(tmp_path), num_images=16)
  assert (builder.info.splits['train'].num_examples,
          builder.info.splits['validation'].num_examples) == (16, 8)
  cfg = input_config('imagenet2012', image_size=32)  # the recipe's augmentation at 32 px
  rate = synthetic.train_images_per_sec(cfg, str(tmp_path), batch_size=8, batches=2, warmup=1)
  assert rate > 0
  assert cfg.dataset == 'imagenet2012'  # the caller's config is left as it was


@pytest.mark.bench  # four TensorFlow processes, two at a time: ~1 min on 2 cores
def test_input_benchmark_side_by_side_pins_each_side_to_a_core(tmp_path):
  """`bench_input_pipeline.py --side_by_side` runs the yardstick and a row at once, one core each,
  the cores swapped on the second repeat, and prints the row's ratio."""
  command = [sys.executable, 'benchmarks/bench_input_pipeline.py', '--side_by_side', '--rows',
             'crop + flip', '--repeats', '2', '--seconds', '1', '--num_images', '32',
             '--batch_size', '4', '--warmup', '1', '--image_size', '32', '--data_dir',
             str(tmp_path)]
  proc = subprocess.run(command, cwd=ROOT, env=subprocess_env({'PYTHONPATH': str(ROOT)}),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'side by side on cores' in proc.stdout
  row = re.search(r'\| train: crop \+ flip only +\| +(\d+) \| +(\d+) \| +([\d.]+)x \| '
                  r'([\d.]+)-([\d.]+) \|', proc.stdout)
  assert row, proc.stdout
  rate, stick, ratio, low, high = (float(v) for v in row.groups())
  assert rate > 0 and stick > 0 and low <= ratio <= high
