"""TFDS builder `digits`: scikit-learn's bundled handwritten digits as an offline image dataset.

`sklearn.datasets.load_digits` ships 1,797 real 8x8 grey images (values 0-16) of the digits 0-9
inside scikit-learn, so this dataset builds without any network access. It goes through exactly the
same TFDS / tf.data path as ImageNet, which makes it the offline stand-in for training end to end.

* Images: uint8 (8, 8, 1), value * 255 / 16 rounded, PNG-encoded like any TFDS image.
* Splits (fixed, stratified): 'test' holds 360 images, 20% of each class (per-class counts rounded
  with the largest-remainder method so they sum to 360), chosen by a permutation from
  `numpy.random.default_rng(SPLIT_SEED)`; 'train' holds the other 1,437.

    builder = Digits(data_dir=...)  # `input.dataset = 'digits'` in a config
    builder.download_and_prepare()  # Local; the input pipeline does this on first use.

The builder is not registered in TFDS's global catalog (importing cvt-flax adds nothing to it):
the input pipeline maps the name 'digits' to it (`pipeline.LOCAL_BUILDERS`).
"""
import numpy as np
import tensorflow_datasets as tfds

NAME = 'digits'
NUM_CLASSES = 10
NUM_TEST = 360
SPLIT_SEED = 0


def load_sklearn_digits():
  """All 1,797 images as uint8 (N, 8, 8, 1) in 0-255, and their int64 labels."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return images, digits.target.astype(np.int64)


def stratified_test_indices(labels, num_test=NUM_TEST, seed=SPLIT_SEED):
  """Sorted indices of a test split holding the same fraction of every class."""
  classes, counts = np.unique(labels, return_counts=True)
  exact = counts * num_test / len(labels)
  per_class = np.floor(exact).astype(int)
  # Largest remainders get the leftover slots so the split has exactly `num_test` examples.
  leftover = num_test - per_class.sum()
  per_class[np.argsort(-(exact - per_class), kind='stable')[:leftover]] += 1
  rng = np.random.default_rng(seed)
  chosen = [rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in zip(classes, per_class)]
  return np.sort(np.concatenate(chosen))


class Digits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """scikit-learn's 8x8 handwritten digits (UCI optdigits test set), 10 classes."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Stratified 1,437 / 360 train / test split.'}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1)),
            'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ships with scikit-learn.
    images, labels = load_sklearn_digits()
    is_test = np.zeros(len(labels), bool)
    is_test[stratified_test_indices(labels)] = True
    return {
        'train': self._generate_examples(images, labels, np.flatnonzero(~is_test)),
        'test': self._generate_examples(images, labels, np.flatnonzero(is_test)),
    }

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {'image': images[i], 'label': int(labels[i])}
