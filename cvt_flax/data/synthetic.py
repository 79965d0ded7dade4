"""ImageNet-like synthetic JPEGs as a local TFDS dataset, and the train pipeline's speed on them.

The images are smooth colour blobs plus noise, 500 x 375 (ImageNet's typical size), about 80 KB at
JPEG quality 90 (ImageNet averages ~110 KB): they decode like photos. They stand in for a dataset
wherever only the host's work per image matters: `python -m cvt_flax.aot --measure_host` and
benchmarks/bench_input_pipeline.py.
"""
import io
import os
import time

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from cvt_flax.data import pipeline

NAME = 'synthetic_jpeg'
WIDTH, HEIGHT = 500, 375


def synthetic_jpeg(rng: np.random.Generator) -> bytes:
  """One image: smooth colour blobs plus noise, JPEG quality 90."""
  coarse = rng.integers(0, 256, (HEIGHT // 25, WIDTH // 25, 3), dtype=np.uint8)
  image = np.asarray(Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.BICUBIC), np.int16)
  image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='JPEG', quality=90)
  return buffer.getvalue()


class SyntheticJpeg(tfds.core.GeneratorBasedBuilder):
  """`num_images` train and `num_images // 2` validation JPEGs with random labels of 1,000."""

  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, num_images: int = 512, **kwargs):
    self.num_images = num_images
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description='Synthetic ImageNet-like JPEGs (cvt_flax.data.synthetic).',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(num_classes=1000),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(self.num_images, 0),
            'validation': self._generate_examples(self.num_images // 2, 1)}

  def _generate_examples(self, num, seed):
    rng = np.random.default_rng(seed)
    for i in range(num):
      yield i, {'image': io.BytesIO(synthetic_jpeg(rng)), 'label': int(rng.integers(1000))}


def build(data_dir: str, num_images: int = 512) -> SyntheticJpeg:
  """The dataset in `data_dir`, written there first if it is not."""
  builder = SyntheticJpeg(data_dir=data_dir, num_images=num_images)
  if not builder.is_prepared():
    builder.download_and_prepare()
  return builder


def usable_cpus() -> int:
  return len(os.sched_getaffinity(0))


def train_images_per_sec(input_cfg, data_dir: str, *, batch_size: int = 64, batches: int = 40,
                         warmup: int = 5) -> float:
  """The train pipeline of `input_cfg` (its augmentation, image size) on the synthetic JPEGs in
  `data_dir` (`build`), on every CPU this process may use: images per second."""
  cfg = input_cfg.copy_and_resolve_references()
  cfg.unlock()
  cfg.update(dataset=NAME, data_dir=data_dir, train_split='train', cache=True)
  iterator = pipeline.make_train_iterator(cfg, global_batch_size=batch_size, seed=0)
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * batch_size / (time.perf_counter() - start)
