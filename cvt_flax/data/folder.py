"""Custom datasets from a directory of images: `input.dataset = 'imagefolder:/path/to/root'`.

The layout is TFDS's `ImageFolder` (and torchvision's, one level up): one directory per split, one
sub-directory per class, image files (.jpg, .jpeg, .png) inside:

    root/train/cat/0001.jpg  root/train/dog/0002.png  ...  root/test/cat/0100.jpg  ...

Class ids are the class directory names, sorted, over all splits (so a class seen only in `test`
still gets an id). Images go through the same decode/augment path as any TFDS dataset; the example
id of an image, used in error messages, is its file path.
"""
import os

import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import splits as splits_lib

PREFIX = 'imagefolder:'


def is_image_folder(dataset: str) -> bool:
  return dataset.startswith(PREFIX)


def image_folder_builder(dataset: str) -> tfds.folder_dataset.ImageFolder:
  """The TFDS ImageFolder of `imagefolder:/path`, after checking that it holds images."""
  root = os.path.expanduser(dataset[len(PREFIX):])
  if not os.path.isdir(root):
    raise FileNotFoundError(f"input.dataset={dataset!r}: {root} is not a directory.")
  builder = tfds.folder_dataset.ImageFolder(root)
  if not builder.info.splits:
    raise ValueError(f'input.dataset={dataset!r}: no images found; expected '
                     f'{root}/<split>/<class>/<image>.jpg|.jpeg|.png.')
  return builder


def read_image_folder(builder: tfds.folder_dataset.ImageFolder, split) -> tf.data.Dataset:
  """Records {'image': encoded bytes, 'label', 'tfds_id': file path} of `split`, in a fixed order.

  `split` is anything TFDS accepts (a name, 'train[:10%]', `tfds.split_for_jax_process(...)`);
  ImageFolder itself only reads whole splits, so slices are taken here.
  """
  spec = split if isinstance(split, splits_lib.AbstractSplit) else (
      splits_lib.AbstractSplit.from_spec(split))
  parts = []
  for part in spec.to_absolute(builder.info.splits):
    size = builder.info.splits[part.splitname].num_examples
    start, stop = part.from_ or 0, size if part.to is None else part.to
    ds = builder.as_dataset(split=part.splitname, shuffle_files=False,
                            decoders={'image': tfds.decode.SkipDecoding()})
    parts.append(ds.skip(start).take(stop - start))
  ds = parts[0]
  for more in parts[1:]:
    ds = ds.concatenate(more)
  return ds.map(lambda ex: {'image': ex['image'], 'label': ex['label'],
                            'tfds_id': ex['image/filename']})
