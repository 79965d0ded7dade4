"""Parameters and compute of CvT models: an analytic multiply-add count and XLA's cost analysis.

  python -m cvt_flax.flops                       # the paper's table (Wu et al. 2021, Table 2)
  python -m cvt_flax.flops --variants cvt-13 --sizes 224,384 --no-xla

The paper counts multiply-adds (MACs) of convolutions, linear layers and the two attention matmuls;
normalisation, activations, softmax and residual additions are not counted. `analytic_macs` follows
the same convention. XLA's cost analysis counts 2 FLOPs per multiply-add and also every elementwise
operation, so its FLOPs / 2 lands a little above the analytic count.
"""
from __future__ import annotations

import argparse
import sys
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from cvt_flax import errors
from cvt_flax.models import layers
from cvt_flax.models import (Compute, CvTConfig, abstract_model, count_params,
                             make_config)
from cvt_flax.models.released import paper_cost
from cvt_flax.runtime import compiler, platforms

# (variant, image size) -> (parameters in millions, GMACs) as printed in the paper's Table 2.
PAPER = paper_cost()


def analytic_macs(cfg: CvTConfig, image_size: int | tuple[int, int]) -> dict[str, int]:
  """Multiply-adds for one image, by kind of layer, plus their 'total'.

  Depthwise projections count k*k MACs per output element; 'avg' pooling and BatchNorm count none
  (BatchNorm folds into the conv at inference). The cls token takes part in the linear layers, the
  MLP and attention (as a query and as a key) but not in the spatial projections.
  """
  height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
  macs = dict.fromkeys(('conv_embed', 'conv_proj', 'qkv_linear', 'attention', 'attn_out', 'mlp',
                        'head'), 0)
  channels = cfg.in_chans
  for i, (h, w, q_hw, kv_hw) in enumerate(layers.stage_sizes(cfg, height, width)):
    k = cfg.patch_size[i]
    dim = cfg.dim_embed[i]
    macs['conv_embed'] += h * w * dim * channels * k * k
    channels = dim
    extra = 1 if cfg.cls_token[i] else 0
    kq = cfg.kernel_qkv[i]
    method = cfg.qkv_proj_method[i]
    n_tokens, n_q, n_kv = h * w + extra, q_hw + extra, kv_hw + extra
    hidden = int(dim * cfg.mlp_ratio[i])
    per_block = {
        'conv_proj': (q_hw + 2 * kv_hw) * dim * kq * kq if method == 'dw_bn' else 0,
        'qkv_linear': (n_q + 2 * n_kv) * dim * dim,
        'attention': 2 * n_q * n_kv * dim,  # q k^T and attn v over all heads
        'attn_out': n_q * dim * dim,
        'mlp': 2 * n_tokens * dim * hidden,
    }
    for key, value in per_block.items():
      macs[key] += cfg.depth[i] * value
  if cfg.num_classes > 0:
    macs['head'] = channels * cfg.num_classes
  macs['total'] = sum(macs.values())
  return macs


def xla_cost(cfg: CvTConfig, image_size: int, batch: int = 1) -> dict[str, float]:
  """XLA's cost analysis of the compiled eval-mode forward pass, per image ('flops', ...).

  Works on abstract shapes: no weights are materialised, so even CvT-W24 costs only a compile.
  Attention is compiled without the 'blocked' loop: XLA counts a loop's body once, not once per
  iteration (the same arithmetic, so the count is that of every implementation).
  """
  model = abstract_model(cfg, Compute(attention_impl='deferred'))
  model.eval()
  graphdef, state = nnx.split(model)
  forward = compiler.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, cfg.in_chans), jnp.float32)
  cost = compiler.cost_analysis(forward.lower(state, images).compile())
  return {key: float(cost[key]) / batch for key in ('flops', 'transcendentals') if key in cost}


def report_rows(variants_and_sizes, with_xla: bool = True) -> Iterator[str]:
  """A Markdown table, line by line as each row is computed: parameters and compute next to the
  paper's numbers (XLA's count compiles each model, seconds to a minute per row)."""
  yield ('| model | size | params (M) | paper params (M) | paper GMACs | analytic GMACs |'
         ' XLA GFLOP | XLA GFLOP / 2 |')
  yield '|---|---:|---:|---:|---:|---:|---:|---:|'
  for variant, size in variants_and_sizes:
    cfg = make_config(variant)
    params = count_params(abstract_model(cfg)) / 1e6
    paper_params, paper_gmacs = PAPER.get((variant, size), ('-', '-'))
    macs = analytic_macs(cfg, size)['total'] / 1e9
    xla = f"{xla_cost(cfg, size)['flops'] / 1e9:.2f}" if with_xla else '-'
    half = f'{float(xla) / 2:.2f}' if with_xla else '-'
    yield (f'| {variant} | {size} | {params:.2f} | {paper_params} | {paper_gmacs} | '
           f'{macs:.2f} | {xla} | {half} |')


def _rows(args) -> list[tuple[str, int]]:
  if not args.variants:
    return list(PAPER)
  try:
    sizes = [int(s) for s in args.sizes.split(',')]
  except ValueError as e:
    raise errors.ConfigError(f'--sizes {args.sizes}: expected image sizes such as 224,384') from e
  return [(v, s) for v in args.variants.split(',') for s in sizes]


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m cvt_flax.flops',
                                   description='CvT parameters and GMACs vs the paper.')
  parser.add_argument('--variants', help='comma-separated, e.g. cvt-13,cvt-21 (default: paper table)')
  parser.add_argument('--sizes', default='224,384', help='image sizes used with --variants')
  parser.add_argument('--no-xla', action='store_true', help="skip XLA's cost analysis (compiles)")
  args = parser.parse_args(argv)
  platforms.cpu_only_without_accelerator()
  with errors.reported():
    rows = _rows(args)
    if not args.no_xla:
      print(f'XLA compiles each of the {len(rows)} models for its count (--no-xla skips it); '
            'the rows follow as they are done.', file=sys.stderr, flush=True)
    for line in report_rows(rows, with_xla=not args.no_xla):
      print(line, flush=True)


if __name__ == '__main__':
  main()
