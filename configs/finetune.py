r"""Fine-tuning a trained or converted CvT: a new head and/or a new resolution.

    python train.py --config configs/finetune.py:cifar100 --workdir $WORKDIR \
        --config.init_from=/path/CvT-21-384x384-IN-22k.pth --config.input.data_dir=$TFDS_DATA_DIR

`arg`: cifar10 | cifar100 | oxford_flowers102 | oxford_iiit_pet (new head, trained at 384 px),
imagenet384 (ImageNet-1k at 384 from a 224 model: same 1000-class head, new resolution), or
imagefolder:ROOT (your own images, ROOT/<split>/<class>/<image>: trains on ROOT/train, evaluates
on ROOT/validation, val or test, whichever it has; no download). `init_from`: an official/HF
PyTorch file or directory, a converted model directory (`python -m cvt_flax.convert`) or a
training workdir. The architecture comes from that checkpoint (`model.variant='init_from'`); CvT
has no position embeddings, so the weights work at any resolution as they are. The new head is
explicit (`init_new_head=True`), so a wrong dataset does not silently discard a trained head.

The warmup (a twentieth of the run) and the evaluation interval (a fifth) are references to
`num_train_steps`, so `--config.num_train_steps=N` shortens the run and keeps its shape (an
explicit `--config.optimizer.warmup_steps` wins). Offline on an image folder, from the workdir
that `make train` writes, at its 32 px:

    python train.py --config configs/finetune.py:imagefolder:$ROOT --workdir runs/folder \
        --config.init_from=runs/digits --config.input.image_size=32 --config.num_train_steps=200 \
        --config.batch_size=32 --config.optimizer.base_batch_size=32 --config.dtype=float32

Expected: the CvT paper's transfer results (its Table 5, ImageNet-22k pre-trained models at 384)
and 83.0 / 83.3 top-1 for CvT-13 / CvT-21 on ImageNet at 384. Not reproduced on the dev machine (no
accelerator); the step counts and learning rates below are starting points in the style of ViT /
big_vision transfer runs (short AdamW schedule, light augmentation, no Mixup), not tuned values.
"""
from cvt_flax.errors import ConfigError
from cvt_flax.training.config import default_config

# dataset -> (train split, eval split, optimizer steps at batch 512)
_TASKS = {
    'cifar10': ('train', 'test', 10_000),
    'cifar100': ('train', 'test', 10_000),
    'oxford_flowers102': ('train+validation', 'test', 1_000),
    'oxford_iiit_pet': ('train', 'test', 1_000),
}


_FOLDER = 'imagefolder:'
_FOLDER_STEPS = 1_000


def get_config(arg='cifar10'):
  if arg not in ('imagenet384', *_TASKS) and not (arg.startswith(_FOLDER) and arg != _FOLDER):
    raise ConfigError(f'configs/finetune.py:{arg}: expected one of {", ".join(_TASKS)}, '
                      'imagenet384 or imagefolder:ROOT')
  c = default_config()
  c.model = dict(variant='init_from', drop_path_rate=(0.0, 0.0, 0.1))
  c.init_from = ''  # required: --config.init_from=...
  c.dtype = 'bfloat16'
  c.input.image_size = 384
  c.input.resize = 'warp'
  c.batch_size = 512
  c.optimizer.base_batch_size = 512
  c.optimizer.warmup_init_lr = 0.0
  c.optimizer.min_lr = 1e-6
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2
  if arg == 'imagenet384':
    c.input.dataset = 'imagenet2012'
    c.num_epochs = 30.0
    c.optimizer.base_lr = 5e-5
    c.optimizer.weight_decay = 1e-8
    c.optimizer.warmup_epochs = 1.0
    c.eval_every_steps = 2500
    return c
  train_split, eval_split, steps = _TASKS.get(arg, ('train', '', _FOLDER_STEPS))
  c.input.dataset = arg
  c.input.train_split = train_split
  c.input.eval_split = eval_split
  c.input.crop_scale = (0.5, 1.0)
  c.input.randaugment_num_ops = 0
  c.input.random_erasing = 0.0
  c.mixup.prob = 0.0  # label smoothing stays
  c.init_new_head = True
  c.num_epochs = 0.0
  c.num_train_steps = steps
  c.optimizer.base_lr = 1e-4
  c.optimizer.weight_decay = 0.05
  # Derived when the command line is applied, not now: they follow --config.num_train_steps.
  c.optimizer.warmup_steps = c.get_ref('num_train_steps') // 20
  c.eval_every_steps = c.get_ref('num_train_steps') // 5
  return c
