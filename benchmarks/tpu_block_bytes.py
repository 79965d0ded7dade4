r"""What XLA:TPU charges one transformer block of each CvT-13 stage, forward and backward.

    .venv/bin/python benchmarks/tpu_block_bytes.py [--topology v5e-1] [--batch 256] \
        [--set attention_impl=recompute ...]

Compiles, deviceless on this CPU (libtpu), one block of each stage at 224 px in training mode
(BatchNorm's batch statistics, stochastic depth), bf16, on one chip: its forward pass and the
gradients of its parameters and input. Prints XLA's estimate of the bytes it moves and the FLOPs
it computes. Ten times faster to compile than the whole train step (`python -m cvt_flax.aot`), so
a change to one block's computation can be tried in seconds; the step's figure still decides.
`--set` takes `Compute` settings (`cvt_flax/models/compute.py`), TPU's `auto` for the rest.
Every figure is the compiler's estimate, not a measurement.
"""
import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from cvt_flax.aot import compile as aot_compile, tpus
from cvt_flax.models import compute as compute_lib, config as config_lib, cvt
from cvt_flax.runtime import compiler

import common

IMAGE_SIZE = 224


def block_step(block, hw: int):
  """(params, batch statistics, tokens, output gradient) -> (parameter and input gradients, new
  batch statistics)."""
  graphdef, params, rest = nnx.split(block, nnx.Param, ...)

  def step(params, rest, tokens, grad):
    def forward(params, tokens):
      merged = nnx.merge(graphdef, params, rest, copy=True)
      return merged(tokens, hw, hw), nnx.state(merged, nnx.BatchStat)

    _, vjp, stats = jax.vjp(forward, params, tokens, has_aux=True)
    return vjp(grad), stats

  return step, params, rest


def stage_block_cost(stage_index: int, compute, device, batch: int) -> dict:
  cfg = config_lib.make_config('cvt-13')
  stage = {name: getattr(cfg, name)[stage_index] for name in config_lib.STAGE_FIELDS.values()}
  hw = IMAGE_SIZE // 4 // 2 ** stage_index
  dim = stage['dim_embed']
  block = cvt.Block(dim, stage['num_heads'], stage['drop_path_rate'], stage, cfg, compute,
                    nnx.Rngs(0))
  step, params, rest = block_step(block, hw)
  placed = jax.sharding.SingleDeviceSharding(device)
  abstract = lambda tree: jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=placed), tree)
  tokens = jax.ShapeDtypeStruct((batch, hw * hw + int(stage['cls_token']), dim), jnp.bfloat16,
                                sharding=placed)
  start = time.perf_counter()
  cost = compiler.cost_analysis(
      jax.jit(step).lower(abstract(params), abstract(rest), tokens, tokens).compile())
  return {'stage': stage_index + 1, 'tokens': tokens.shape[1], 'width': dim,
          'blocks': stage['depth'], 'gb': cost['bytes accessed'] / 1e9,
          'tflop': cost['flops'] / 1e12, 'compile_s': time.perf_counter() - start}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--topology', default='v5e-1')
  parser.add_argument('--batch', type=int, default=256, help='images on the chip')
  parser.add_argument('--set', nargs='*', default=[], metavar='FIELD=VALUE')
  args = parser.parse_args()
  common.start_jax()
  settings = dict(setting.split('=', 1) for setting in args.set)
  compute = compute_lib.Compute(dtype='bfloat16', platform='tpu', **settings).resolved()
  device = aot_compile.slice_devices(tpus.parse_slice(args.topology))[0]
  print(f'CvT-13 at {IMAGE_SIZE} px, one block per stage, {args.batch} images on one '
        f'{args.topology} chip, bf16, training mode; {compute}')
  print('| stage | tokens x width | GB per block | TFLOP | blocks in CvT-13 | GB, all its blocks |')
  print('|---:|---|---:|---:|---:|---:|')
  total = 0.0
  for stage_index in range(3):
    row = stage_block_cost(stage_index, compute, device, args.batch)
    total += row['gb'] * row['blocks']
    print(f"| {row['stage']} | {row['tokens']} x {row['width']} | {row['gb']:.2f} | "
          f"{row['tflop']:.3f} | {row['blocks']} | {row['gb'] * row['blocks']:.1f} |")
  print(f'all 13 blocks: {total:.1f} GB')


if __name__ == '__main__':
  main()
