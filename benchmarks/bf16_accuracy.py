"""What bfloat16 compute costs in accuracy: logits on the official fixtures, and a short training run.

  .venv/bin/python benchmarks/bf16_accuracy.py [--steps 300]

1. The official fixtures (`tests/data`, PyTorch fp32 logits) through cvt-flax in float32 and
   in bfloat16 compute (parameters stay float32; LayerNorm, BatchNorm statistics and softmax run in
   float32): the largest logit difference, absolute and relative to the largest logit.
2. A small CvT trained from the same initialisation on the same batches in float32 and in bfloat16:
   scikit-learn's bundled handwritten digits (1,797 real 8x8 images, offline), upsampled to 32x32,
   AdamW. Prints both loss curves and the test accuracies.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np
import optax
from flax import nnx

import cvt_flax
from cvt_flax import preprocess
from cvt_flax.convert.official import load_official_state_dict
from cvt_flax.runtime import compiler
from cvt_flax.training.steps import init_train_state, make_train_step

import common

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests', 'data')
DTYPES = ('float32', 'bfloat16')
# A 2-stage CvT small enough to train on 2 CPU cores in a minute: the tiny variant, wider.
SMALL = dict(variant='tiny', dim_embed=(32, 64), depth=(1, 2), mlp_ratio=(4.0, 4.0),
             drop_path_rate=(0.0, 0.0), num_classes=10)


def fixture_logits(name: str, dtype: str):
  """(cvt-flax logits per input, PyTorch fixture logits per input) for one official fixture."""
  import json  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  with open(os.path.join(FIXTURES, f'{name}.json')) as f:
    meta = json.load(f)
  io = dict(np.load(os.path.join(FIXTURES, f'{name}_io.npz')))
  state = {k: v.numpy() for k, v in
           torch.load(os.path.join(FIXTURES, f'{name}.pth'), weights_only=True).items()}
  model = cvt_flax.create_model(meta['spec'], num_classes=meta['num_classes'], rngs=nnx.Rngs(0),
                                activation=meta['activation'], dtype=dtype)
  load_official_state_dict(model, state, source=name)
  model.eval()
  n = len(meta['input_shapes'])
  ours = [np.asarray(model(io[f'input_{i}'].transpose(0, 2, 3, 1))) for i in range(n)]
  return ours, [io[f'logits_{i}'] for i in range(n)]


def digits(image_size=32, seed=0):
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  data = load_digits()
  images = (data.images / 16.0 - 0.5) / 0.5  # [-1, 1]
  images = jax.image.resize(images[..., None], (len(images), image_size, image_size, 1), 'bilinear')
  images = np.repeat(np.asarray(images, np.float32), 3, axis=-1)
  order = np.random.default_rng(seed).permutation(len(images))
  split = int(0.8 * len(images))
  return ((images[order[:split]], data.target[order[:split]]),
          (images[order[split:]], data.target[order[split:]]))


def train_curve(dtype: str, steps: int, batch: int = 64, lr: float = 2e-3, seed: int = 0):
  """Loss per step and final test accuracy of SMALL trained in `dtype` compute."""
  (x_train, y_train), (x_test, y_test) = digits()
  model = cvt_flax.create_model(SMALL, rngs=nnx.Rngs(seed), dtype=dtype)
  schedule = optax.cosine_decay_schedule(lr, steps)
  tx = optax.adamw(schedule, weight_decay=0.05)
  # The trainer's own step, without mixup and label smoothing.
  step = compiler.jit(make_train_step(nnx.graphdef(model), tx, schedule, num_classes=10,
                                     mixup=dict(prob=0.0, label_smoothing=0.0), seed=seed,
                                     **preprocess.PASS_THROUGH))
  state = init_train_state(model, tx)
  rng = np.random.default_rng(seed)
  losses = []
  for _ in range(steps):
    idx = rng.choice(len(x_train), batch, replace=False)
    state, metrics = step(state, {'image': x_train[idx], 'label': y_train[idx].astype(np.int32)})
    losses.append(float(metrics['loss']))
  model = nnx.merge(nnx.graphdef(model), state.params, state.batch_stats, state.rngs)
  model.eval()
  accuracy = float(np.mean(np.argmax(model(x_test), -1) == y_test))
  return np.array(losses), accuracy


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=300)
  args = parser.parse_args(argv)
  common.start_jax()
  print('## bfloat16 vs float32 logits on the official fixtures\n')
  print('| fixture | input | max abs diff fp32 vs PyTorch | max abs diff bf16 vs fp32 | '
        'relative to max abs logit |')
  print('|---|---|---:|---:|---:|')
  for name in ('official_tiny', 'official_tiny_avg'):
    fp32, reference = fixture_logits(name, 'float32')
    bf16, _ = fixture_logits(name, 'bfloat16')
    for i, (a, b, ref) in enumerate(zip(fp32, bf16, reference)):
      diff = np.abs(b - a).max()
      print(f'| {name} | {i} {tuple(ref.shape)} | {np.abs(a - ref).max():.1e} | {diff:.1e} | '
            f'{diff / np.abs(a).max():.2%} |')
  print(f'\n## Training curves: small CvT on scikit-learn digits, {args.steps} steps, batch 64\n')
  curves = {dtype: train_curve(dtype, args.steps) for dtype in DTYPES}
  marks = sorted({0, 9, 49, 99, args.steps // 2 - 1, args.steps - 1} & set(range(args.steps)))
  print('| step | ' + ' | '.join(f'loss {d}' for d in DTYPES) + ' |')
  print('|---:|' + '---:|' * len(DTYPES))
  for s in marks:
    # Mean over a 10-step window around the mark: single-batch losses are noisy.
    window = slice(max(0, s - 9), s + 1)
    print(f'| {s + 1} | ' + ' | '.join(f'{curves[d][0][window].mean():.4f}' for d in DTYPES) + ' |')
  print('\n| | ' + ' | '.join(DTYPES) + ' |\n|---|' + '---:|' * len(DTYPES))
  print('| test accuracy (360 images) | ' +
        ' | '.join(f'{curves[d][1]:.2%}' for d in DTYPES) + ' |')
  gap = np.abs(curves['bfloat16'][0] - curves['float32'][0])
  print(f'\nmax |loss bf16 - loss fp32| over the run: {gap.max():.4f}; mean: {gap.mean():.4f}',
        file=sys.stdout)


if __name__ == '__main__':
  main()
