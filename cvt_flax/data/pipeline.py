"""tf.data input pipelines over TFDS datasets, yielding numpy batches for a JAX training loop.

Determinism (train): the batch at step t is a pure function of (input config, seed, t, process_index,
process_count). Each process reads its own disjoint, equal-sized part of the train split (the last
`num_train_examples % process_count` examples are dropped). Within a process, the examples form one
endless stream, epoch after epoch; epoch e is that part of the split shuffled with a seed derived from
(seed, e) (full permutation if the part fits in `shuffle_buffer`, else tf.data's buffered shuffle of the
records in file order), and example i of epoch e is augmented with stateless random ops seeded by
(seed, process_index, e, i). Step t's batch is stream positions [t * B, (t + 1) * B) with
B = global_batch_size // process_count; batches run across epoch boundaries. Resuming at `start_step`
starts the stream at the right epoch and skips the records before the start position in that epoch
*before* decoding (it reads up to one epoch of encoded bytes, decodes nothing), so the resumed
iterator yields exactly the same batches.

Not deterministic: anything across different `process_count`s (the data is split differently), and
across TFDS/TF versions or a re-prepared dataset (record order, op numerics may change).

Eval: each process reads its own part of the eval split (the parts cover every example exactly once),
in file order, unshuffled and without randomness. All processes yield the same number of batches; the
tail is padded with zero images whose `mask` is 0.

Batches carry uint8 pixels (a quarter of float32's bytes to copy and ship); the train and eval
steps normalise them on the device, and the train step fills random erasing's boxes (drawn here,
per example) with noise there (`cvt_flax.training.erasing`).
"""
import difflib
import math
from typing import NamedTuple

import tensorflow as tf
import tensorflow_datasets as tfds

from cvt_flax.data import augment
from cvt_flax.data import checks
from cvt_flax.data import digits
from cvt_flax.data import folder
from cvt_flax.data import randaugment
from cvt_flax.data.config import eval_preprocess, validate_input_config

# Datasets of cvt-flax's own, built without a download: prepared automatically on first use.
LOCAL_BUILDERS = {digits.NAME: digits.Digits}
_MAX_EPOCHS = 2**40  # "Forever" for the epoch counter of the endless train stream.
_SHUFFLE_TAG = 0x5EED  # Keeps the shuffle seeds apart from the augmentation seeds.


class DatasetInfo(NamedTuple):
  """Classes and split sizes, as the pipelines read them (a mocked TFDS reports its mock sizes)."""
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  class_names: tuple[str, ...] | None = None  # the label feature's names, if it has any


# The evaluation split a dataset is taken to have when none is named, in this order.
EVAL_SPLITS = ('validation', 'val', 'test')


def _builder(cfg):
  if folder.is_image_folder(cfg.dataset):
    return folder.image_folder_builder(cfg.dataset)
  if cfg.dataset not in LOCAL_BUILDERS:
    try:
      return tfds.builder(cfg.dataset, data_dir=cfg.data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise checks.DataError(_unknown_dataset_message(cfg.dataset)) from e
  builder = LOCAL_BUILDERS[cfg.dataset](data_dir=cfg.data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare()
  return builder


def _unknown_dataset_message(name: str) -> str:
  known = sorted(LOCAL_BUILDERS) + sorted(tfds.list_builders(with_community_datasets=False))
  close = difflib.get_close_matches(name, known, n=1)
  return (f'input.dataset={name!r}: no such dataset' + (f'; did you mean {close[0]!r}?' if close
                                                        else '.')
          + f' Use a TFDS name, {", ".join(LOCAL_BUILDERS)} (offline), or imagefolder:ROOT '
          '(ROOT/<split>/<class>/<image>).')


def _splits(builder) -> list[str]:
  return list(builder.info.splits)


def default_eval_split(input_cfg) -> str:
  """The split to evaluate on when none is named: the first of EVAL_SPLITS the dataset has."""
  return _eval_split(_builder(input_cfg), input_cfg.dataset, '')


def _eval_split(builder, dataset: str, split: str) -> str:
  """`split`, or if '' the first of EVAL_SPLITS that `builder` has."""
  if split:
    return split
  available = _splits(builder)
  for name in EVAL_SPLITS:
    if name in available:
      return name
  raise checks.DataError(f'dataset {dataset!r} has no {", ".join(EVAL_SPLITS)} split to evaluate '
                         f'on: name one of its splits ({", ".join(available)}) with --split '
                         '(evaluate) or --config.input.eval_split (train.py).')


def _read(builder, split, cache):
  """The encoded records of `split`, in file order: {'image': encoded bytes, 'label': int32,
  checked to be a class id when read, 'id': the example's TFDS id or file path}."""
  if isinstance(builder, tfds.folder_dataset.ImageFolder):
    return _with_ids(builder, folder.read_image_folder(builder, split), cache)
  try:
    ds = builder.as_dataset(
        split=split, shuffle_files=False, decoders={'image': tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(try_autocache=False, add_tfds_id=True))
  except AssertionError as e:  # TFDS's way of saying the dataset was never prepared.
    raise FileNotFoundError(
        f'TFDS dataset {builder.name!r} is not prepared in {builder.data_dir_root}: build it first '
        f'(e.g. `tfds build {builder.name} --data_dir=...`, ImageNet needs its manual_dir), then '
        f'set input.data_dir. TFDS said: {e}') from e
  except (KeyError, ValueError) as e:
    available = ', '.join(_splits(builder)) or 'unknown'
    raise checks.DataError(f'dataset {builder.name!r} has no split {str(split)!r}; its splits: '
                           f'{available}.') from e
  return _with_ids(builder, ds, cache)


def _with_ids(builder, ds, cache):
  num_classes = _num_classes(builder)
  ds = ds.map(lambda ex: {
      'image': ex['image'], 'id': ex['tfds_id'],
      'label': checks.checked_label(ex['label'], ex['tfds_id'], num_classes, builder.name)})
  return ds.cache() if cache else ds


def _num_records(ds, what):
  count = int(ds.cardinality())
  if count < 0:
    raise ValueError(f'{what}: the number of examples is unknown to TFDS')
  return count


def _label_feature(builder):
  label = builder.info.features['label'] if 'label' in builder.info.features else None
  if not isinstance(label, tfds.features.ClassLabel):
    raise ValueError(f'dataset {builder.name!r} has no ClassLabel feature named "label"')
  return label


def _num_classes(builder):
  return _label_feature(builder).num_classes


def get_dataset_info(input_cfg) -> DatasetInfo:
  """Classes and split sizes of the configured dataset (as the pipelines will read them)."""
  return _dataset_info(_builder(input_cfg), input_cfg, count=True)


def get_dataset_info_unprepared(input_cfg) -> DatasetInfo:
  """What TFDS knows of the configured dataset without its data: the classes from the dataset's
  definition; split sizes only if prepared, else 0 (for compiling ahead of time, where only the
  shapes matter)."""
  builder = _builder(input_cfg)
  prepared = isinstance(builder, tfds.folder_dataset.ImageFolder) or builder.is_prepared()
  return _dataset_info(builder, input_cfg, count=prepared)


def _dataset_info(builder, input_cfg, count: bool) -> DatasetInfo:
  names = tuple(_label_feature(builder).names)
  train_split = input_cfg.train_split
  return DatasetInfo(
      num_classes=_num_classes(builder),
      num_train_examples=(_num_records(_read(builder, train_split, False), 'train split')
                          if count and train_split else 0),
      num_eval_examples=(_num_records(_read(builder, _eval_split(builder, input_cfg.dataset,
                                                                 input_cfg.eval_split), False),
                                       'eval split') if count else 0),
      class_names=names or None)


def _local_batch_size(global_batch_size, process_index, process_count):
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, process_count={process_count})')
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} must be a positive multiple of '
                     f'process_count={process_count}')
  return global_batch_size // process_count


def _hash_seed(a, b):
  """A well-mixed int64 from two int64 scalars (stateless, so identical eagerly and in tf.data)."""
  return tf.random.stateless_uniform([], tf.stack([tf.cast(a, tf.int64), tf.cast(b, tf.int64)]),
                                     minval=None, maxval=None, dtype=tf.int64)


def example_seed(seed, process_index, epoch, index):
  """The stateless seed ([2] int64) of example `index` of `epoch` on `process_index`."""
  return tf.stack([_hash_seed(_hash_seed(seed, process_index), epoch), tf.cast(index, tf.int64)])


def train_transform(cfg, image_bytes, seed):
  """Encoded image -> {'image': uint8 (S, S, 3)} and, if `cfg.random_erasing`, {'erase': int32 (4,)
  the box to erase}: the official CvT/timm train augmentation up to the normalisation. The train
  step normalises and fills the box with noise on the device (`cvt_flax.training.erasing`)."""
  seeds = augment.split_seed(seed, 4)
  image = augment.decode_and_random_resized_crop(
      image_bytes, seeds[0], cfg.image_size, tuple(cfg.crop_scale), tuple(cfg.crop_ratio))
  if cfg.hflip:
    image = augment.random_flip(image, seeds[1])
  if cfg.randaugment_num_ops > 0:
    fill = tuple(min(255, round(255 * m)) for m in cfg.mean)  # timm fills with the mean colour.
    image = randaugment.rand_augment(image, seeds[2], cfg.randaugment_num_ops,
                                     cfg.randaugment_magnitude, cfg.randaugment_mstd, fill)
  out = {'image': tf.cast(image, tf.uint8)}
  if cfg.random_erasing > 0:
    out['erase'] = augment.erasing_box(seeds[3], cfg.image_size, cfg.image_size,
                                       cfg.random_erasing)
  return out


def eval_transform(cfg, image_bytes):
  """Encoded image -> uint8 (S, S, 3): the eval transform `eval_preprocess(cfg)` up to the
  normalisation. TF decodes (the same pixels as PIL's decoder, without Python) and predict's own
  PIL code resizes and crops (`Preprocess.pixels`; PIL releases the GIL while it resizes)."""
  preprocess = eval_preprocess(cfg)
  decoded = augment.decode_any(augment.refuse_bombs(image_bytes))
  image = tf.numpy_function(preprocess.pixels, [decoded], tf.uint8, stateful=False)
  size = cfg.image_size
  return tf.ensure_shape(image, [size, size, 3])


def _with_options(ds):
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return ds.with_options(options)


def _parallelism(cfg):
  return cfg.num_parallel_calls if cfg.num_parallel_calls is not None else tf.data.AUTOTUNE


def _train_records(cfg, *, batch, seed, start_step, process_index, process_count):
  """The encoded records of the endless train stream from batch `start_step` on, each with its
  `epoch` and `index` in the epoch (which seed its augmentation)."""
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0')
  builder = _builder(cfg)
  split = tfds.split_for_jax_process(cfg.train_split, process_index=process_index,
                                     process_count=process_count, drop_remainder=True)
  records = _read(builder, split, cfg.cache)
  epoch_size = _num_records(records, f'train split {cfg.train_split!r}')
  if epoch_size == 0:
    raise ValueError(f'train split {cfg.train_split!r} of {cfg.dataset!r} has no examples for '
                     f'process {process_index} of {process_count}')
  start_epoch, skip = divmod(start_step * batch, epoch_size)
  buffer_size = min(cfg.shuffle_buffer, epoch_size)
  shuffle_key = _hash_seed(seed, _SHUFFLE_TAG)

  def one_epoch(epoch):
    shuffled = records.shuffle(buffer_size, seed=_hash_seed(shuffle_key, epoch),
                               reshuffle_each_iteration=False)
    return shuffled.enumerate().map(lambda i, ex: dict(ex, epoch=epoch, index=i))

  ds = tf.data.Dataset.range(start_epoch, _MAX_EPOCHS).flat_map(one_epoch)
  return ds.skip(skip)  # Encoded records only: nothing before the start position is decoded.


def _train_example_fn(cfg, seed, process_index):
  def preprocess(ex):
    ex_seed = example_seed(seed, process_index, ex['epoch'], ex['index'])
    return dict(train_transform(cfg, ex['image'], ex_seed), label=ex['label'])
  return preprocess


def make_train_dataset(input_cfg, *, global_batch_size, seed, start_step=0, process_index=0,
                       process_count=1) -> tf.data.Dataset:
  """The tf.data pipeline behind `make_train_iterator` (see the module docstring)."""
  validate_input_config(input_cfg)
  batch = _local_batch_size(global_batch_size, process_index, process_count)
  ds = _train_records(input_cfg, batch=batch, seed=seed, start_step=start_step,
                      process_index=process_index, process_count=process_count)
  ds = ds.map(_train_example_fn(input_cfg, seed, process_index),
              num_parallel_calls=_parallelism(input_cfg), deterministic=True)
  ds = ds.batch(batch, drop_remainder=True)
  return _with_options(ds.prefetch(tf.data.AUTOTUNE))


def make_train_iterator(input_cfg, *, global_batch_size, seed, start_step=0, process_index=0,
                        process_count=1):
  """Endless iterator of {'image': uint8 (B, S, S, 3), 'label': int32 (B,)} numpy batches, plus
  'erase': int32 (B, 4) if the config erases (`train_transform`), with B = global_batch_size //
  process_count; the first one is batch `start_step` of the stream. The train step normalises.

  Raises `DataError` naming the example(s) if an image does not decode or a label is out of range.
  """
  kwargs = dict(seed=seed, process_index=process_index, process_count=process_count)
  ds = make_train_dataset(input_cfg, global_batch_size=global_batch_size, start_step=start_step,
                          **kwargs)
  batch = _local_batch_size(global_batch_size, process_index, process_count)

  def diagnose(k):  # the records of batch `start_step + k`, re-run one by one
    records = _train_records(input_cfg, batch=batch, start_step=start_step + k, **kwargs)
    return checks.failing_examples(records.take(batch),
                                   _train_example_fn(input_cfg, seed, process_index))

  return checks.NamedErrors(iter(tfds.as_numpy(ds)), diagnose,
                            f'{input_cfg.dataset!r} split {input_cfg.train_split!r}', start_step)


def num_eval_batches(num_examples, global_batch_size, process_count):
  """Batches per process: TFDS's even split gives at most ceil(n / processes) examples to one."""
  per_process = math.ceil(num_examples / process_count)
  return math.ceil(per_process / (global_batch_size // process_count))


def _eval_records(cfg, process_index, process_count):
  """(this process's encoded eval records, the size of the whole eval split)."""
  builder = _builder(cfg)
  name = _eval_split(builder, cfg.dataset, cfg.eval_split)
  total = _num_records(_read(builder, name, False), f'eval split {name!r}')
  split = tfds.split_for_jax_process(name, process_index=process_index,
                                     process_count=process_count, drop_remainder=False)
  return _read(builder, split, cache=False), total  # One pass per iterator: nothing to reuse.


def make_eval_dataset(input_cfg, *, global_batch_size, process_index=0,
                      process_count=1) -> tf.data.Dataset:
  """The tf.data pipeline behind `make_eval_iterator`."""
  validate_input_config(input_cfg)
  cfg = input_cfg
  batch = _local_batch_size(global_batch_size, process_index, process_count)
  records, total = _eval_records(cfg, process_index, process_count)
  size = cfg.image_size
  ds = records.map(
      lambda ex: {'image': eval_transform(cfg, ex['image']), 'label': ex['label'],
                  'mask': tf.constant(1.0)},
      num_parallel_calls=_parallelism(cfg), deterministic=True)
  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros([size, size, 3], tf.uint8), 'label': tf.constant(0),
      'mask': tf.constant(0.0)})
  num_batches = num_eval_batches(total, global_batch_size, process_count)
  ds = ds.concatenate(padding.repeat()).take(num_batches * batch).batch(batch)
  return _with_options(ds.prefetch(tf.data.AUTOTUNE))


def make_eval_iterator(input_cfg, *, global_batch_size, process_index=0, process_count=1):
  """Finite iterator of {'image': uint8, 'label', 'mask'} numpy batches of global_batch_size //
  process_count examples (the eval step normalises); every process yields the same number of
  batches, and over all processes each eval example appears once with mask 1 (padding has mask 0
  and label 0).

  Raises `DataError` naming the example(s) if an image does not decode or a label is out of range.
  """
  ds = make_eval_dataset(input_cfg, global_batch_size=global_batch_size,
                         process_index=process_index, process_count=process_count)
  batch = _local_batch_size(global_batch_size, process_index, process_count)

  def diagnose(k):
    records, _ = _eval_records(input_cfg, process_index, process_count)
    return checks.failing_examples(records.skip(k * batch).take(batch),
                                   lambda ex: eval_transform(input_cfg, ex['image']))

  return checks.NamedErrors(iter(tfds.as_numpy(ds)), diagnose,
                            f'{input_cfg.dataset!r} split {input_cfg.eval_split!r}')
