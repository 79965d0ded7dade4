"""The building blocks behind cvt-flax's CPU fast paths, each implementation timed on CvT-13 shapes.

  .venv/bin/python benchmarks/bench_kernels.py [--batch 32] [--repeats 10]

Dense matmul throughput (XLA vs PyTorch), the depthwise conv of the q/k/v projections ('xla' grouped
conv vs 'shifts', forward and gradient, vs PyTorch), and the attention cores ('softmax', 'deferred',
'blocked') of the three CvT-13 stages. Minimum over `--repeats` runs after a warm-up (the minimum is
the least disturbed by other processes on a shared machine).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from cvt_flax.models import Compute, compute

import common


def _best_ms(fn, repeats):
  return 1e3 * min(common.wall_times(fn, repeats))


def _jax_ms(fn, args, repeats):
  compiled = jax.jit(fn).lower(*args).compile()
  return _best_ms(lambda: jax.block_until_ready(compiled(*args)), repeats)


def matmuls(repeats):
  import torch  # pylint: disable=import-outside-toplevel
  print('| matmul (M, K, N) | XLA GFLOP/s | PyTorch GFLOP/s |\n|---|---:|---:|')
  for m, k, n in [(2048, 2048, 2048), (6304, 384, 1536), (6304, 1536, 384), (100352, 64, 256)]:
    a, b = np.random.rand(m, k).astype(np.float32), np.random.rand(k, n).astype(np.float32)
    flops = 2 * m * k * n / 1e6
    ours = _jax_ms(lambda a, b: a @ b, (jnp.asarray(a), jnp.asarray(b)), repeats)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    theirs = _best_ms(lambda: ta @ tb, repeats)
    print(f'| {(m, k, n)} | {flops / ours:.0f} | {flops / theirs:.0f} |')


def depthwise(batch, repeats):
  import torch  # pylint: disable=import-outside-toplevel
  print('\n| depthwise 3x3, input | stride | xla fwd / grad (ms) | shifts fwd / grad (ms) |'
        ' PyTorch fwd / grad (ms) |\n|---|---:|---:|---:|---:|')
  for shape in [(batch, 56, 56, 64), (batch, 28, 28, 192), (batch, 14, 14, 384)]:
    for stride in (1, 2):
      x = jax.random.normal(jax.random.key(0), shape)
      w = jax.random.normal(jax.random.key(1), (3, 3, 1, shape[-1]))
      cells = []
      for impl in ('xla', 'shifts'):
        settings = Compute(dwconv_impl=impl, platform='cpu').resolved()
        conv = lambda x, w, settings=settings: compute.depthwise_conv(settings, x, w, stride, 1)
        grad = jax.grad(lambda x, w, conv=conv: jnp.sum(conv(x, w)), argnums=(0, 1))
        cells.append(f'{_jax_ms(conv, (x, w), repeats):.1f} / {_jax_ms(grad, (x, w), repeats):.1f}')
      tconv = torch.nn.Conv2d(shape[-1], shape[-1], 3, stride, 1, groups=shape[-1], bias=False)
      tx = torch.randn(shape[0], shape[3], shape[1], shape[2])
      with torch.no_grad():
        forward = _best_ms(lambda: tconv(tx), repeats)
      tx.requires_grad_()
      backward = _best_ms(lambda: tconv(tx).sum().backward(), repeats)
      cells.append(f'{forward:.1f} / {backward:.1f}')
      print(f'| {shape} | {stride} | ' + ' | '.join(cells) + ' |')


def attention(batch, repeats):
  print('\n| attention (b, heads, q, kv), d = 64 | softmax fwd / grad (ms) | deferred fwd / grad (ms) |'
        ' blocked fwd / grad (ms) |\n|---|---:|---:|---:|')
  for heads, nq, nk in [(1, 3136, 784), (3, 784, 196), (6, 197, 50)]:
    q, k, v = (jax.random.normal(jax.random.key(i), (batch, heads, n, 64))
               for i, n in enumerate((nq, nk, nk)))
    cells = []
    for impl in ('softmax', 'deferred', 'blocked'):
      settings = Compute(attention_impl=impl, platform='cpu').resolved()
      core = lambda q, k, v, settings=settings: compute.attention(settings, q, k, v, 0.125)
      grad = jax.grad(lambda q, k, v, core=core: jnp.sum(core(q, k, v)), argnums=(0, 1, 2))
      cells.append(f'{_jax_ms(core, (q, k, v), repeats):.1f} / '
                   f'{_jax_ms(grad, (q, k, v), repeats):.1f}')
    print(f'| {(batch, heads, nq, nk)} | ' + ' | '.join(cells) + ' |')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--repeats', type=int, default=10)
  args = parser.parse_args(argv)
  common.start_jax()
  import torch  # pylint: disable=import-outside-toplevel
  print(f'jax {jax.__version__} {jax.devices()}, torch {torch.__version__} '
        f'with {torch.get_num_threads()} threads\n')
  matmuls(args.repeats)
  depthwise(args.batch, args.repeats)
  attention(args.batch, args.repeats)


if __name__ == '__main__':
  main()
