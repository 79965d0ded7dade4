r"""CvT on ImageNet-1k from scratch with the official recipe (Wu et al. 2021, microsoft/CvT).

    python train.py --config configs/imagenet.py:cvt-13,224 --workdir $WORKDIR \
        --config.input.data_dir=$TFDS_DATA_DIR [--jax_distributed]

`arg` = '<variant>,<resolution>': variant cvt-13 | cvt-21 | cvt-w24, resolution 224 | 384.

Expected ImageNet-1k val top-1 (paper): CvT-13 81.6 (224) / 83.0 (384); CvT-21 82.5 (224) / 83.3
(384). CvT-W24 reaches 87.7 at 384 only with ImageNet-22k pre-training: pre-train it on
`imagenet21k`-style data, then use configs/finetune.py:imagenet384. (Not reproduced on the dev
machine, which has no accelerator; the recipe below is the official one.)

Recipe: AdamW (0.9, 0.999), peak lr 2e-3 at global batch 2048 scaled linearly with the batch,
weight decay 0.05 (CvT-13) / 0.1 (CvT-21, W24), none on biases, LayerNorm/BatchNorm parameters
and the cls token; 300 epochs, 5 warmup epochs from 1e-6, cosine to 1e-5. Augmentation:
RandomResizedCrop, flip, RandAugment rand-m9-mstd0.5, Mixup 0.8 / CutMix 1.0 (switch 0.5), label
smoothing 0.1, random erasing 0.25; stochastic depth 0.1 (0.3 for W24). Eval: resize to 224/0.875
+ center crop (224 models), warp to 384x384 (384 models). bfloat16 compute, float32 weights.
W24 shards weights and optimizer state (FSDP).
"""
from cvt_flax.errors import ConfigError
from cvt_flax.training.config import default_config

_VARIANTS = ('cvt-13', 'cvt-21', 'cvt-w24')


def get_config(arg='cvt-13,224'):
  variant, _, resolution = (arg or 'cvt-13,224').partition(',')
  if variant not in _VARIANTS or resolution not in ('224', '384'):
    raise ConfigError(f'configs/imagenet.py:{arg}: expected <{"|".join(_VARIANTS)}>,<224|384>, '
                      'e.g. configs/imagenet.py:cvt-13,224')
  resolution = int(resolution)
  c = default_config()
  c.model = dict(variant=variant,
                 drop_path_rate=(0.0, 0.0, 0.3 if variant == 'cvt-w24' else 0.1))
  c.dtype = 'bfloat16'
  c.input.dataset = 'imagenet2012'
  c.input.image_size = resolution
  c.input.resize = 'crop' if resolution == 224 else 'warp'
  c.batch_size = 2048
  c.num_epochs = 300.0
  c.optimizer.base_lr = 2e-3
  c.optimizer.base_batch_size = 2048
  c.optimizer.weight_decay = 0.05 if variant == 'cvt-13' else 0.1
  c.fsdp = variant == 'cvt-w24'
  c.log_every_steps = 100
  c.eval_every_steps = 6250  # every 10 epochs (625 steps per epoch at batch 2048)
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  return c
