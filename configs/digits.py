r"""A small CvT trained from scratch on the offline `digits` dataset (the `make train` default).

1,797 real 8x8 handwritten digits from scikit-learn (1,437 train / 360 test, stratified; see
`cvt_flax/data/digits.py`), upsampled to 32x32. No download: the TFDS builder prepares itself
locally on first use (into TFDS's default data dir unless input.data_dir is set).

    python train.py --config configs/digits.py --workdir runs/digits

Expected: >= 97% test top-1; the measured accuracy and the time it takes are in the README.
Model: 3 stages, widths 32/64/128, 3x3 stride-2 first embedding (16x16 tokens), no stochastic
depth. Recipe: the official one (AdamW, warmup + cosine, label smoothing, no decay on
norms/biases/cls token) with light augmentation for 8x8 digits: a mild random resized crop, no flip
(digits are not mirror-symmetric), no RandAugment, no random erasing, no Mixup/CutMix.
"""
from cvt_flax.training.config import default_config


def get_config(arg=None):
  del arg
  c = default_config()
  c.model = dict(
      dim_embed=(32, 64, 128), num_heads=(1, 2, 4), depth=(1, 1, 2),
      patch_size=(3, 3, 3), patch_stride=(2, 2, 2), patch_padding=(1, 1, 1),
      drop_path_rate=(0.0, 0.0, 0.0))
  c.input.dataset = 'digits'
  c.input.train_split = 'train'
  c.input.eval_split = 'test'
  c.input.image_size = 32
  c.input.resize = 'warp'
  c.input.crop_scale = (0.6, 1.0)
  c.input.hflip = False
  c.input.randaugment_num_ops = 0
  c.input.random_erasing = 0.0
  c.input.mean = (0.5, 0.5, 0.5)
  c.input.std = (0.5, 0.5, 0.5)
  c.input.shuffle_buffer = 2000  # the whole split: an exact per-epoch permutation
  c.input.cache = True
  c.mixup.prob = 0.0  # label smoothing (0.1) stays
  c.batch_size = 64
  c.num_epochs = 40.0
  c.optimizer.base_lr = 1e-3
  c.optimizer.base_batch_size = 64
  c.optimizer.weight_decay = 0.05
  c.optimizer.warmup_epochs = 2.0
  c.log_every_steps = 50
  c.eval_every_steps = 300
  c.checkpoint_every_steps = 300
  c.keep_checkpoints = 2
  return c
