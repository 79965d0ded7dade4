"""Throughput (images/s) of the ImageNet-style input pipeline on synthetic JPEGs built locally.

Writes `--num_images` random-content 500x375 JPEGs (ImageNet's typical size; ~80 KB each, ImageNet
averages ~110 KB) as a local TFDS dataset (in a temporary directory unless --data_dir), then times `make_train_iterator` (decode inside the crop window, RandomResizedCrop,
flip, RandAugment m9, normalise, random erasing, batch) and `make_eval_iterator` on it:

  .venv/bin/python benchmarks/bench_input_pipeline.py [--num_images 512 --batch_size 64 --batches 20]

Numbers scale with host cores; the table prints the count this process may use.
"""
import argparse
import io
import os
import tempfile
import time

import numpy as np
from PIL import Image

import cvt_flax.data as data
import tensorflow_datasets as tfds

WIDTH, HEIGHT = 500, 375
NUM_IMAGES = 512  # Read by the builder below (set from the flag before it is built).


def synthetic_jpeg(rng):
  """Smooth colour blobs plus noise: decodes like a photo, ~80 KB at JPEG quality 90."""
  coarse = rng.integers(0, 256, (HEIGHT // 25, WIDTH // 25, 3), dtype=np.uint8)
  image = np.asarray(Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.BICUBIC), np.int16)
  image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='JPEG', quality=90)
  return buffer.getvalue()


class SyntheticJpeg(tfds.core.GeneratorBasedBuilder):
  """`NUM_IMAGES` train and `NUM_IMAGES // 4` validation JPEGs with random labels."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description='Synthetic JPEGs for benchmarking.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(num_classes=1000),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(NUM_IMAGES, 0),
            'validation': self._generate_examples(NUM_IMAGES // 4, 1)}

  def _generate_examples(self, num, seed):
    rng = np.random.default_rng(seed)
    for i in range(num):
      yield i, {'image': io.BytesIO(synthetic_jpeg(rng)), 'label': int(rng.integers(1000))}


def images_per_second(iterator, batches, warmup):
  for _ in range(warmup):
    batch = next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(iterator)
  return batches * batch['image'].shape[0] / (time.perf_counter() - start)


def main():
  global NUM_IMAGES
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_images', type=int, default=NUM_IMAGES)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--batches', type=int, default=20, help='timed batches per row')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--data_dir', default=None, help='default: a fresh temporary directory')
  args = parser.parse_args()
  NUM_IMAGES = args.num_images

  if args.data_dir:
    run(args, args.data_dir)
  else:
    with tempfile.TemporaryDirectory(prefix='bench_input_') as data_dir:
      run(args, data_dir)


def run(args, data_dir):
  """Builds the dataset in `data_dir` (if needed) and prints the throughput table."""
  builder = tfds.builder('synthetic_jpeg', data_dir=data_dir)
  start = time.perf_counter()
  builder.download_and_prepare()
  print(f'dataset: {builder.info.splits["train"].num_examples} train JPEGs {WIDTH}x{HEIGHT}, '
        f'{builder.info.dataset_size / builder.info.splits.total_num_examples / 1e3:.0f} KB each, '
        f'in {data_dir} (built in {time.perf_counter() - start:.0f}s)')

  def config(**overrides):
    cfg = data.default_input_config()
    cfg.update(dataset='synthetic_jpeg', data_dir=data_dir, image_size=args.image_size, cache=True,
               **overrides)
    return cfg

  train = lambda cfg: data.make_train_iterator(cfg, global_batch_size=args.batch_size, seed=0)
  rows = [
      ('train: official recipe (crop, flip, RandAugment m9, erasing)', train(config())),
      ('train: crop + flip only', train(config(randaugment_num_ops=0, random_erasing=0.0))),
      ('eval: resize + center crop', data.make_eval_iterator(
          config(), global_batch_size=args.batch_size)),
  ]
  cores = len(os.sched_getaffinity(0))
  print(f'\nhost cores usable: {cores} (os.cpu_count() = {os.cpu_count()}), '
        f'batch {args.batch_size}, {args.image_size}px, {args.batches} timed batches\n')
  print(f'| {"pipeline":<62} | images/s | images/s/core |')
  print(f'|{"-" * 64}|----------|---------------|')
  for name, iterator in rows:
    warmup, timed = args.warmup, args.batches
    if name.startswith('eval'):  # Finite: one warm-up batch, then what the validation split holds.
      warmup, timed = 1, min(timed, -(-(NUM_IMAGES // 4) // args.batch_size) - 1)
      if timed < 1:
        raise SystemExit('--num_images too small for two eval batches of --batch_size')
    rate = images_per_second(iterator, timed, warmup)
    print(f'| {name:<62} | {rate:8.0f} | {rate / cores:13.0f} |')


if __name__ == '__main__':
  main()
