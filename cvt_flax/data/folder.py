"""Custom datasets from a directory of images: `input.dataset = 'imagefolder:/path/to/root'`.

The layout is TFDS's `ImageFolder` (and torchvision's, one level up): one directory per split, one
sub-directory per class, image files (.jpg, .jpeg, .png) inside:

    root/train/cat/0001.jpg  root/train/dog/0002.png  ...  root/test/cat/0100.jpg  ...

Class ids are the class directory names, sorted, over all splits (so a class seen only in `test`
still gets an id, and an empty class directory keeps the ids of the others in step with a model's
head). A split whose class directories hold no image at all is an error naming it. Images go through the same decode/augment path as any TFDS dataset; the example
id of an image, used in error messages, is its file path.
"""
import os

import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import splits as splits_lib

from cvt_flax.data.checks import DataError

PREFIX = 'imagefolder:'


def is_image_folder(dataset: str) -> bool:
  return dataset.startswith(PREFIX)


def image_folder_builder(dataset: str) -> tfds.folder_dataset.ImageFolder:
  """The TFDS ImageFolder of `imagefolder:/path`, after checking that it holds images."""
  root = os.path.expanduser(dataset[len(PREFIX):])
  if not os.path.isdir(root):
    raise FileNotFoundError(f"input.dataset={dataset!r}: {root} is not a directory.")
  builder = tfds.folder_dataset.ImageFolder(root)
  if not any(split.num_examples for split in builder.info.splits.values()):
    raise DataError(f'input.dataset={dataset!r}: no images in {root}; expected '
                    f'{root}/<split>/<class>/<image>.jpg|.jpeg|.png.')
  return builder


def read_image_folder(builder: tfds.folder_dataset.ImageFolder, split) -> tf.data.Dataset:
  """Records {'image': encoded bytes, 'label', 'tfds_id': file path} of `split`, in a fixed order.

  `split` is anything TFDS accepts (a name, 'train[:10%]', `tfds.split_for_jax_process(...)`);
  ImageFolder itself only reads whole splits, so slices are taken here.
  """
  spec = split if isinstance(split, splits_lib.AbstractSplit) else (
      splits_lib.AbstractSplit.from_spec(split))
  root = builder.data_dir  # ImageFolder's data dir is the root itself
  try:
    absolute = spec.to_absolute(builder.info.splits)
  except ValueError as e:
    raise DataError(f'{PREFIX}{root} has no split {str(split)!r}; its splits (the directories '
                    f'under {root}): {", ".join(builder.info.splits)}.') from e
  parts = []
  for part in absolute:
    size = builder.info.splits[part.splitname].num_examples
    if size == 0:
      classes = ', '.join(sorted(os.listdir(os.path.join(root, part.splitname))))
      raise DataError(f'{os.path.join(root, part.splitname)} holds no images (its class '
                      f'directories {classes} are empty); expected '
                      f'{root}/{part.splitname}/<class>/<image>.jpg|.jpeg|.png.')
    start, stop = part.from_ or 0, size if part.to is None else part.to
    ds = builder.as_dataset(split=part.splitname, shuffle_files=False,
                            decoders={'image': tfds.decode.SkipDecoding()})
    parts.append(ds.skip(start).take(stop - start))
  ds = parts[0]
  for more in parts[1:]:
    ds = ds.concatenate(more)
  return ds.map(lambda ex: {'image': ex['image'], 'label': ex['label'],
                            'tfds_id': ex['image/filename']})
