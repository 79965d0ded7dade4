r"""Measure a checkpoint's accuracy on a dataset: top-1, top-5, loss, images/s.

  python -m cvt_flax.evaluate --checkpoint REF --dataset NAME [--split S] [--data-dir D]
      [--batch-size N] [--json]

REF: any checkpoint reference (a model directory, a training workdir, an official `.pth`, an HF
directory or weights file, a hub name such as `microsoft/cvt-13`). NAME: a prepared TFDS dataset
(`imagenet2012`, `cifar10`, the offline `digits`...) or `imagefolder:ROOT` (ROOT/<split>/<class>/
<image>). The split: --split, else the dataset's evaluation split (validation, val or test, the first
it has); the result line names it. Images get the checkpoint's own preprocessing (the flags below override it) through the
trainer's eval pipeline and eval step, sharded over all devices as in training; each example is
counted once. A progress line goes to stderr; with --json the last line of stdout is one JSON
object: {"top1", "top5", "loss", "num_examples", "images_per_sec", ...}.

    python -m cvt_flax.evaluate --checkpoint microsoft/cvt-13 --dataset imagenet2012 \
        --split validation --data-dir $TFDS_DATA_DIR       # the paper: 81.6% top-1
"""
from __future__ import annotations

import argparse
import json
import sys

import jax

from cvt_flax import errors, io
from cvt_flax import preprocess as preprocess_lib
from cvt_flax.models import with_compute
from cvt_flax.models.compute import DTYPES
from cvt_flax.runtime import eval_step as eval_step_lib, platforms, sharding


class EvaluateError(errors.CvtFlaxError, ValueError):
  """The checkpoint and the dataset do not go together; the message says why and what to do."""


def _input_pipeline():
  """`cvt_flax.data`: the trainer's TensorFlow eval pipeline, so that evaluate and the trainer's
  eval give the same number for the same checkpoint (it needs the `train` extra)."""
  return errors.require('cvt_flax.data', 'train')


def input_config(dataset: str, split: str | None, data_dir: str | None,
                 preprocess: preprocess_lib.Preprocess):
  """The eval input config of `dataset`/`split` (None: the dataset's evaluation split) with the
  eval transform `preprocess`."""
  data = _input_pipeline()
  cfg = data.default_input_config()
  cfg.dataset, cfg.train_split, cfg.data_dir = dataset, '', data_dir
  cfg.eval_split = split or data.default_eval_split(cfg)
  data.with_eval_preprocess(cfg, preprocess)
  cfg.lock()
  return cfg


def evaluate_model(model, input_cfg, *, batch_size: int, devices=None,
                   progress: bool = False) -> dict[str, float]:
  """Top-1 etc. of an eval-mode `model` over `input_cfg.eval_split`, on a mesh of `devices`."""
  info = _input_pipeline().get_dataset_info(input_cfg)
  if info.num_classes != model.config.num_classes:
    raise EvaluateError(
        f'dataset {input_cfg.dataset!r} has {info.num_classes} classes, but the checkpoint\'s head '
        f'has {model.config.num_classes}: evaluate a checkpoint trained on this dataset (fine-tune '
        'one with configs/finetune.py and --config.init_new_head=True).')
  mesh = sharding.make_mesh(devices)
  try:
    sharding.check_batch_size(batch_size, mesh)
  except errors.ConfigError as e:
    raise EvaluateError(f'--batch-size: {e}') from e
  model = with_compute(model, platform=mesh.devices.flat[0].platform, mesh=mesh)
  graphdef, *variables = eval_step_lib.split_model(model)
  replicated = jax.tree.map(lambda _: sharding.replicated(mesh), tuple(variables))
  variables = jax.device_put(tuple(variables), replicated)
  step = eval_step_lib.jit_eval_step(graphdef, replicated, mesh, mean=input_cfg.mean,
                                     std=input_cfg.std)
  evaluation = errors.require('cvt_flax.runtime.evaluation', 'train')
  metrics = evaluation.evaluate_dataset(step, variables, input_cfg, batch_size=batch_size,
                                        mesh=mesh, progress=progress)
  return {k.split('/', 1)[1]: v for k, v in metrics.items()}


def _parse_args(argv):
  parser = argparse.ArgumentParser(prog='python -m cvt_flax.evaluate',
                                   description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('--checkpoint', required=True, help='checkpoint reference')
  parser.add_argument('--revision', help='hub revision (branch, tag or commit)')
  parser.add_argument('--dataset', required=True, help='TFDS name or imagefolder:ROOT')
  parser.add_argument('--split', help="default: the dataset's validation, val or test split")
  parser.add_argument('--data-dir', help='TFDS data dir (default: TFDS\'s)')
  parser.add_argument('--batch-size', type=int, default=64, help='global, over all devices')
  parser.add_argument('--dtype', choices=DTYPES, default='float32', help='compute dtype')
  parser.add_argument('--json', action='store_true', help='end stdout with one JSON object')
  preprocess_lib.add_flags(parser)
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = _parse_args(argv)
  platforms.cpu_only_without_accelerator()
  platforms.quiet_tensorflow()
  with errors.reported():
    _input_pipeline()  # without the `train` extra: its one line, before any model is loaded
    model = with_compute(io.from_pretrained(args.checkpoint, revision=args.revision),
                         dtype=args.dtype)
    transform = preprocess_lib.from_flags(model.preprocess, args)
    cfg = input_config(args.dataset, args.split, args.data_dir, transform)
    result = evaluate_model(model, cfg, batch_size=args.batch_size, progress=True)
  result.update(checkpoint=args.checkpoint, dataset=args.dataset, split=cfg.eval_split,
                preprocess=transform.to_dict())
  print(f'{args.checkpoint} on {args.dataset} {cfg.eval_split}: top-1 {result["top1"]:.2%}, top-5 '
        f'{result["top5"]:.2%}, loss {result["loss"]:.4f}, {int(result["num_examples"])} images, '
        f'{result["images_per_sec"]:.1f} images/s')
  if args.json:
    print(json.dumps(result))
  return 0


if __name__ == '__main__':
  sys.exit(main())
