"""Input pipelines: TFDS datasets -> tf.data (decode, augment, batch) -> numpy batches.

Importing this package first hides every GPU/TPU from TensorFlow (`_tf`), and points etils.epath's
URLs at gcsfs (`files.use_gcsfs_for_urls`). Both must happen at import: TensorFlow accepts the
change only before its runtime starts, epath decides at the first URL (TFDS reads its catalog
bucket through it), and this package is the only place cvt-flax imports TensorFlow and TFDS, so
its import is the one moment that comes before either.
Importing it is the choice to use cvt-flax's TensorFlow input pipelines. The offline dataset
`digits` is cvt-flax's own builder, not registered in TFDS's catalog (`digits`).
"""
from cvt_flax import errors

errors.require_installed('train', 'tensorflow', 'tensorflow_datasets', 'ml_collections')

from cvt_flax.data import _tf  # pylint: disable=unused-import  (must come before any TF use)
from cvt_flax.data.checks import DataError
from cvt_flax.data.config import default_input_config, eval_preprocess, with_eval_preprocess
from cvt_flax.data.pipeline import (DatasetInfo, default_eval_split, get_dataset_info,
                                    get_dataset_info_unprepared, make_eval_iterator,
                                    make_train_iterator, num_eval_batches)
