"""The input config; its defaults are the official CvT ImageNet recipe.

It is lockable: every field has its final type from the start (`placeholder` fields hold
None but accept a value of the declared type), so `--config.input.data_dir=/x` works on a locked
config and a mistyped field name fails.

The eval transform is the fields named as `cvt_flax.preprocess.Preprocess`'s (image_size, resize,
crop_pct, interpolation, mean, std, crop_offset), which `Preprocess` itself validates; image_size,
mean and std apply to training too.
"""
import dataclasses

import ml_collections
from ml_collections import config_dict

from cvt_flax.errors import ConfigError
from cvt_flax.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, PreprocessError


def default_input_config() -> ml_collections.ConfigDict:
  """The input pipeline config (see `validate_input_config` for the constraints)."""
  cfg = ml_collections.ConfigDict()
  # Any TFDS name with 'image' and 'label' features, 'digits', or 'imagefolder:/root' (a directory
  # root/<split>/<class>/<image>, see cvt_flax/data/folder.py).
  cfg.dataset = 'imagenet2012'
  cfg.data_dir = config_dict.placeholder(str)  # None: TFDS's default data dir.
  cfg.train_split = 'train'
  cfg.eval_split = 'validation'  # '': the dataset's validation, val or test split, the first it has
  cfg.image_size = 224
  # The eval transform (`cvt_flax.preprocess.Preprocess`, also written into the checkpoints):
  # 'crop': resize the shorter side to image_size / crop_pct, then center crop (224 models).
  # 'warp': resize straight to image_size x image_size (the official 384 models' eval).
  cfg.resize = 'crop'
  cfg.crop_pct = 0.875
  cfg.interpolation = 'bicubic'  # or 'bilinear' (eval resize; train crops are always bicubic)
  # The centre crop's offset of an odd margin: 'round' (torchvision, timm), 'floor' (HF).
  cfg.crop_offset = 'round'
  cfg.crop_scale = (0.08, 1.0)  # RandomResizedCrop area fraction.
  cfg.crop_ratio = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio (w / h).
  cfg.hflip = True
  cfg.randaugment_num_ops = 2  # 0 disables RandAugment.
  cfg.randaugment_magnitude = 9.0  # timm's 'rand-m9-mstd0.5'.
  cfg.randaugment_mstd = 0.5
  cfg.random_erasing = 0.25  # Probability; 0 disables.
  cfg.mean = IMAGENET_MEAN  # In 0-1 units.
  cfg.std = IMAGENET_STD
  # Encoded records held in the shuffle buffer (~110 KB each for ImageNet, ~1.1 GB per process).
  cfg.shuffle_buffer = 10_000
  cfg.cache = False  # Keep the encoded train records in memory after epoch 0 (small datasets).
  cfg.num_parallel_calls = config_dict.placeholder(int)  # None: tf.data AUTOTUNE.
  return cfg


def validate_input_config(cfg) -> None:
  """Raises ConfigError naming the first field of `cfg` whose value cannot work."""
  def fail(field, why):
    raise ConfigError(f'input config: {field}={getattr(cfg, field)!r}: {why}')

  try:
    eval_preprocess(cfg)
  except PreprocessError as e:
    raise ConfigError(f'input config: {e}') from e
  for field, low in (('crop_scale', 0), ('crop_ratio', 0)):
    values = tuple(getattr(cfg, field))
    if len(values) != 2 or not low < values[0] <= values[1]:
      fail(field, 'must be a (min, max) pair with 0 < min <= max')
  if cfg.crop_scale[1] > 1:
    fail('crop_scale', 'the area fraction cannot exceed 1')
  if cfg.randaugment_num_ops < 0:
    fail('randaugment_num_ops', 'must be >= 0')
  if not 0 <= cfg.random_erasing <= 1:
    fail('random_erasing', 'is a probability')
  if cfg.shuffle_buffer < 1:
    fail('shuffle_buffer', 'must be >= 1')


EVAL_FIELDS = tuple(field.name for field in dataclasses.fields(Preprocess))


def eval_preprocess(cfg) -> Preprocess:
  """The eval transform the input config describes (what a trained model expects)."""
  return Preprocess(**{field: cfg[field] for field in EVAL_FIELDS})


def with_eval_preprocess(cfg, preprocess: Preprocess) -> None:
  """Sets the eval transform fields of `cfg` (a ConfigDict, unlocked or locked) to `preprocess`."""
  for field in EVAL_FIELDS:
    cfg[field] = getattr(preprocess, field)
