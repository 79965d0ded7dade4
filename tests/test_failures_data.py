"""Bad input data: every image mode decodes to the right RGB, broken files and bad labels are named.

Custom datasets come in as `input.dataset = 'imagefolder:<root>'` (root/<split>/<class>/<file>).
"""
import io
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

import cvt_flax.data as data
from helpers import input_config, png_bomb

COLOUR = (200, 40, 90)  # every test image is this solid colour, so the right answer is known
SIZE = 8


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def _solid(mode: str, size=(12, 10)) -> Image.Image:
  return Image.new('RGB', size, COLOUR).convert(mode)


_GREY = round(0.299 * COLOUR[0] + 0.587 * COLOUR[1] + 0.114 * COLOUR[2])  # ITU-R 601 luma, as PIL

# class (= file) name -> (encoded image, the RGB a PIL-based pipeline would see, tolerance).
# JPEG is lossy (a few levels); 16-bit PNG is scaled to 8 bits (PIL would clip it to 255: wrong).
IMAGES = {
    'a_rgb_jpeg': (_encode(_solid('RGB'), 'JPEG', quality=95), COLOUR, 3),
    'b_grey_jpeg': (_encode(_solid('L'), 'JPEG', quality=95), (_GREY,) * 3, 3),
    'c_cmyk_jpeg': (_encode(_solid('CMYK'), 'JPEG', quality=95), COLOUR, 3),
    'd_rgba_png': (_encode(_solid('RGBA'), 'PNG'), COLOUR, 0),
    'd_grey_alpha_png': (_encode(_solid('LA'), 'PNG'), (_GREY,) * 3, 0),
    'e_palette_png': (_encode(_solid('RGB').convert('P', palette=Image.Palette.ADAPTIVE), 'PNG'),
                      COLOUR, 0),
    'f_grey16_png': (_encode(Image.fromarray(np.full((10, 12), 257 * 123, np.uint16)), 'PNG'),
                     (123,) * 3, 1),
    'g_tiny_jpeg': (_encode(_solid('RGB', (1, 1)), 'JPEG', quality=95), COLOUR, 3),
    'h_sliver_png': (_encode(_solid('RGB', (300, 2)), 'PNG'), COLOUR, 0),
}


def _image_folder(root, files_by_split) -> str:
  """Writes root/<split>/<class>/<file> from {split: {class: {file name: bytes}}}."""
  for split, classes in files_by_split.items():
    for name, files in classes.items():
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
      for filename, blob in files.items():
        with open(os.path.join(root, split, name, filename), 'wb') as f:
          f.write(blob)
  return f'imagefolder:{root}'


def _config(dataset, **overrides):
  """Small images, no augmentation that would hide which pixels came from which file."""
  return input_config(dataset, **dict(dict(image_size=SIZE, resize='warp', randaugment_num_ops=0,
                                            random_erasing=0.0), **overrides))


def test_image_modes_and_sizes_become_the_right_rgb(tmp_path):
  """Grey, CMYK, RGBA, grey+alpha, palette, 16-bit, 1x1 and 300x2 images: each its true colour."""
  files = {name: {f'{name}.{"png" if "png" in name else "jpg"}': blob}
           for name, (blob, _, _) in IMAGES.items()}
  cfg = _config(_image_folder(tmp_path, {'train': files, 'test': files}))
  names = sorted(IMAGES)
  assert data.get_dataset_info(cfg) == data.DatasetInfo(len(names), len(names), len(names),
                                                        tuple(names))  # the class folders
  batches = list(data.make_eval_iterator(cfg, global_batch_size=4))
  seen = set()
  for batch in batches:
    for image, label, mask in zip(batch['image'].astype(float), batch['label'], batch['mask']):
      if mask:
        name = names[label]  # one image per class: the label says which file this is
        _, want, tolerance = IMAGES[name]
        np.testing.assert_allclose(image.reshape(-1, 3), np.broadcast_to(want, (SIZE * SIZE, 3)),
                                   atol=tolerance + 0.01, err_msg=name)
        seen.add(name)
  assert seen == set(names)
  # The train path (decode-and-crop for JPEGs, crop otherwise) agrees.
  batch = next(data.make_train_iterator(cfg, global_batch_size=len(names), seed=0))
  for image, label in zip(batch['image'].astype(float), batch['label']):
    _, want, tolerance = IMAGES[names[label]]
    np.testing.assert_allclose(image.reshape(-1, 3), np.broadcast_to(want, (SIZE * SIZE, 3)),
                               atol=tolerance + 0.01, err_msg=names[label])


@pytest.fixture
def folder_with_bad_files(tmp_path):
  good = _encode(_solid('RGB'), 'JPEG')
  files = {'cat': {f'{i}.jpg': good for i in range(6)}, 'dog': {f'{i}.png': good for i in range(5)}}
  files['dog']['truncated.jpg'] = good[:len(good) // 2]
  test_files = {'cat': {'0.jpg': good, 'notes.jpg': b'not an image at all\n'},
                'dog': {'1.jpg': good}}
  dataset = _image_folder(tmp_path, {'train': files, 'test': test_files})
  return dataset, str(tmp_path)


def test_corrupt_train_image_is_named(folder_with_bad_files):
  dataset, root = folder_with_bad_files
  cfg = _config(dataset)
  batches = data.make_train_iterator(cfg, global_batch_size=4, seed=0)
  with pytest.raises(data.DataError) as err:
    for _ in range(4):  # 12 examples: the broken one is in one of the first 3 batches
      next(batches)
  message = str(err.value)
  assert f"'{dataset}' split 'train': cannot read 1 example(s) of batch " in message
  assert f'{root}/train/dog/truncated.jpg: ' in message and 'Invalid JPEG data' in message
  assert 'Remove or re-encode' in message
  # A run resumed at that batch fails at once with the same message (the batch is re-derived from
  # the start step, not counted from 0).
  bad_batch = int(message.split('of batch ')[1].split(':')[0])
  assert bad_batch > 0  # (2 with this seed) so the resumed iterator skips batches
  resumed = data.make_train_iterator(cfg, global_batch_size=4, seed=0, start_step=bad_batch)
  with pytest.raises(data.DataError) as again:
    next(resumed)
  assert str(again.value) == message


def test_corrupt_eval_image_is_named(folder_with_bad_files):
  dataset, root = folder_with_bad_files
  cfg = _config(dataset)
  with pytest.raises(data.DataError) as err:
    list(data.make_eval_iterator(cfg, global_batch_size=2))
  message = str(err.value)
  assert f'{root}/test/cat/notes.jpg: Unknown image file format' in message
  assert 'truncated.jpg' not in message  # only the eval split is read


def test_decompression_bomb_is_named_before_it_is_decoded(tmp_path):
  good = _encode(_solid('RGB'), 'PNG')
  dataset = _image_folder(tmp_path, {'test': {'cat': {'0.png': good, 'bomb.png': png_bomb()},
                                              'dog': {'1.png': good}}})
  with pytest.raises(data.DataError) as err:
    list(data.make_eval_iterator(_config(dataset), global_batch_size=3))
  message = str(err.value)
  assert f'{tmp_path}/test/cat/bomb.png: image of too many pixels, more than the 178,956,970 ' \
         'allowed (a decompression bomb?)' in message
  assert 'PIL.Image.MAX_IMAGE_PIXELS' in message and '0.png' not in message


def _records_with_labels(labels, num_images=None):
  """An `as_dataset_fn` for tfds.testing.mock_data: PNG records with the given labels."""
  blob = _encode(_solid('RGB'), 'PNG')

  def as_dataset(self, **kwargs):
    del self, kwargs
    ids = [f'custom.tfrecord__{i}' for i in range(len(labels))]
    return tf.data.Dataset.from_tensor_slices({
        'image': [blob] * len(labels), 'label': np.asarray(labels, np.int64), 'tfds_id': ids})
  return as_dataset


@pytest.mark.parametrize('bad_label', [10, -1])
def test_label_out_of_range_names_the_example(bad_label):
  """cifar10 has 10 classes; a record labelled 10 or -1 (unlabelled split) is refused by id."""
  labels = [3, 1, 4, 1, 5, bad_label, 2, 6]
  with tfds.testing.mock_data(as_dataset_fn=_records_with_labels(labels)):
    cfg = _config('cifar10')
    with pytest.raises(data.DataError) as err:
      list(data.make_eval_iterator(cfg, global_batch_size=4))
    assert str(err.value) == (
        f"'cifar10' split 'test': dataset cifar10: example custom.tfrecord__5 has label "
        f'{bad_label} but the classes are 0 to 9 (an unlabelled split, or a class id the dataset '
        'info does not declare?).')
    with pytest.raises(data.DataError,
                       match=f"split 'train': .* custom.tfrecord__5 has label {bad_label}"):
      next(data.make_train_iterator(cfg, global_batch_size=8, seed=0))
    good = [0 if label == bad_label else label for label in labels]
  with tfds.testing.mock_data(as_dataset_fn=_records_with_labels(good)):
    batch = next(data.make_train_iterator(cfg, global_batch_size=8, seed=0))
    assert sorted(batch['label']) == sorted(good)


def test_image_folder_layout_errors_and_process_split(tmp_path):
  with pytest.raises(FileNotFoundError, match='is not a directory'):
    data.get_dataset_info(_config(f'imagefolder:{tmp_path}/missing'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(data.DataError, match=r'no images in .*empty; expected .*/<split>/<class>/<image>'):
    data.get_dataset_info(_config(f'imagefolder:{tmp_path}/empty'))
  for split in ('train', 'test'):  # class directories, and not one image in the eval split
    for name in ('a', 'b'):
      (tmp_path / 'hollow' / split / name).mkdir(parents=True)
  (tmp_path / 'hollow' / 'train' / 'a' / '0.png').write_bytes(_encode(_solid('RGB'), 'PNG'))
  with pytest.raises(data.DataError, match=r'hollow/test holds no images \(its class directories '
                     r'a, b are empty\)'):
    data.get_dataset_info(_config(f'imagefolder:{tmp_path}/hollow'))
  good = _encode(_solid('RGB'), 'PNG')
  files = {name: {f'{i}.png': good for i in range(n)} for name, n in (('a', 3), ('b', 4))}
  cfg = _config(_image_folder(tmp_path / 'ok', {'train': files, 'test': files}))
  # Two processes each evaluate their part; together every test image counts exactly once.
  counts = [sum(b['mask'].sum() for b in data.make_eval_iterator(
      cfg, global_batch_size=4, process_index=i, process_count=2)) for i in range(2)]
  assert counts == [4, 3]
