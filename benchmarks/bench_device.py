"""CvT on one accelerator: cvt-flax (bf16, the backend's 'auto' paths) next to HF PyTorch with
bf16 autocast, eager and `torch.compile`. Training step and inference; images/s, MFU, peak device
memory, compile time.

  .venv/bin/python benchmarks/bench_device.py --out $OUT           # on a GPU machine, < 8 min
  .venv/bin/python benchmarks/bench_device.py --tiny --out /tmp/b  # a tiny model on CPU (tests)

Needs jax (with CUDA: `.venv/bin/pip install 'cvt-flax[cuda]'`), flax, optax and, for the PyTorch
rows, torch and transformers; not TensorFlow. A Python without the venv that has these runs it
the same from the repository root with PYTHONPATH=. (cvt-flax need not be installed). Every (model,
framework, mode) runs in its own subprocess, so each peak memory is its own (JAX without
preallocation). Writes OUT/bench_device.json and OUT/bench_device.md.

MFU = XLA's FLOP count of the compiled cvt-flax step / step time / the chip's peak dense bf16
FLOP/s (--peak-tflops; default from the device name: H100/H200 989). The PyTorch rows use the
same FLOP count (same model, same batch), so their MFU is comparable.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np

import common

# (variant, image size, batch): CvT-13 and -21 at ImageNet training batch sizes per chip, W24 at 384.
CASES = (('cvt-13', 224, 256), ('cvt-21', 224, 256), ('cvt-w24', 384, 32))
PEAK_TFLOPS = {'H200': 989.0, 'H100': 989.0, 'A100': 312.0}  # dense bf16
NUM_CLASSES = 1000


def _model_config(args):
  from cvt_flax.models import make_config  # pylint: disable=import-outside-toplevel
  if args.tiny:  # two blocks in stage 1: HF's CvT cannot build a stage i of depth <= i
    return make_config('tiny', depth=(1, 2), num_classes=NUM_CLASSES)
  return make_config(args.variant, num_classes=NUM_CLASSES)


def _batch(args):
  rng = np.random.default_rng(0)
  images = rng.standard_normal((args.batch, args.image_size, args.image_size, 3), np.float32)
  return images, rng.integers(0, NUM_CLASSES, (args.batch,)).astype(np.int32)


def _flax(args, mode):
  """(seconds per step, compile seconds, XLA FLOPs per step, peak device bytes)."""
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from cvt_flax.models import CvT, make_compute  # pylint: disable=import-outside-toplevel
  from cvt_flax.runtime import compiler  # pylint: disable=import-outside-toplevel
  from cvt_flax import preprocess  # pylint: disable=import-outside-toplevel
  from cvt_flax.training import steps  # pylint: disable=import-outside-toplevel
  compute = make_compute(dtype='bfloat16', remat=args.remat)
  model = CvT(_model_config(args), rngs=nnx.Rngs(0), compute=compute)
  images, labels = (jax.device_put(a) for a in _batch(args))
  if mode == 'infer':
    model.eval()
    graphdef, variables = nnx.split(model)
    fn, inputs = compiler.jit(lambda v, x: nnx.merge(graphdef, v)(x)), (variables, images)
  else:
    tx = optax.adamw(1e-3, weight_decay=0.05)
    step = steps.make_train_step(nnx.graphdef(model), tx, optax.constant_schedule(1e-3),
                                 num_classes=NUM_CLASSES, mixup=dict(prob=0.0), seed=0,
                                 **preprocess.PASS_THROUGH)  # the images are model inputs
    fn = compiler.jit(step, donate_argnums=(0,))
    inputs = (steps.init_train_state(model, tx), {'image': images, 'label': labels})
  start = time.perf_counter()
  compiled = fn.lower(*inputs).compile()
  compile_s = time.perf_counter() - start
  flops = float(compiler.cost_analysis(compiled).get('flops', 0.0))
  carry = list(inputs)

  def run():
    out = compiled(*carry)
    if mode == 'train':
      carry[0] = out[0]  # the donated state's successor
    jax.block_until_ready(out)
  seconds = common.median_seconds(run, args.steps)
  stats = jax.devices()[0].memory_stats() or {}
  return seconds, compile_s, flops, stats.get('peak_bytes_in_use')


def _hf(args, mode, compiled: bool):
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import CvtConfig, CvtForImageClassification  # pylint: disable=import-outside-toplevel
  from cvt_flax.convert.hf import config_to_hf  # pylint: disable=import-outside-toplevel
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  cfg = dataclasses.replace(_model_config(args), activation='gelu')
  model = CvtForImageClassification(CvtConfig(**config_to_hf(cfg))).to(device)
  images, labels = _batch(args)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
  y = torch.from_numpy(labels.astype(np.int64)).to(device)
  forward = torch.compile(model) if compiled else model
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  autocast = lambda: torch.autocast(device, dtype=torch.bfloat16)
  if mode == 'infer':
    model.eval()

    def run():
      with torch.inference_mode(), autocast():
        forward(pixel_values=x).logits
      sync()
  else:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

    def run():
      opt.zero_grad(set_to_none=True)
      with autocast():
        loss = torch.nn.functional.cross_entropy(forward(pixel_values=x).logits, y)
      loss.backward()
      opt.step()
      sync()
  start = time.perf_counter()
  run()  # torch.compile compiles here
  compile_s = time.perf_counter() - start if compiled else None
  seconds = common.median_seconds(run, args.steps)
  peak = torch.cuda.max_memory_allocated() if device == 'cuda' else None
  return seconds, compile_s, None, peak


def _worker(args):
  if args.framework == 'flax':
    result = _flax(args, args.mode)
  else:
    result = _hf(args, args.mode, compiled=args.framework == 'hf-compile')
  print('RESULT' + json.dumps(dict(zip(('seconds', 'compile_s', 'flops', 'peak_bytes'), result))))


def _spawn(args, variant, size, batch, framework, mode):
  cmd = [sys.executable, os.path.abspath(__file__), '--worker', '--framework', framework,
         '--mode', mode, '--variant', variant, '--image-size', str(size), '--batch', str(batch),
         '--steps', str(args.steps), '--remat', args.remat] + (['--tiny'] if args.tiny else [])
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE='false')
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
  if proc.returncode != 0 or 'RESULT' not in proc.stdout:
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return {'error': lines[-1][:200] if lines else f'exit {proc.returncode}'}
  return json.loads(proc.stdout.split('RESULT', 1)[1])


def _peak_flops(args) -> float | None:
  if args.peak_tflops:
    return args.peak_tflops * 1e12
  import jax  # pylint: disable=import-outside-toplevel
  kind = jax.devices()[0].device_kind
  return next((t * 1e12 for name, t in PEAK_TFLOPS.items() if name in kind), None)


def _table(rows, peak) -> str:
  lines = ['| model | size | batch | framework | mode | images/s | ms/step | MFU | peak memory '
           '(GiB) | compile (s) | flax speed-up |',
           '|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|']
  by_key = {(r['variant'], r['mode'], r['framework']): r for r in rows}
  for r in rows:
    if 'error' in r:
      lines.append(f"| {r['variant']} | {r['size']} | {r['batch']} | {r['framework']} | "
                   f"{r['mode']} | error: {r['error']} | | | | | |")
      continue
    flax = by_key.get((r['variant'], r['mode'], 'flax'), {})
    flops = flax.get('flops')
    mfu = f"{flops / r['seconds'] / peak:.1%}" if flops and peak else '-'
    ratio = (f"{r['seconds'] / flax['seconds']:.2f}x" if r['framework'] != 'flax'
             and flax.get('seconds') else '')
    memory = f"{r['peak_bytes'] / 2 ** 30:.1f}" if r.get('peak_bytes') else '-'
    compile_s = f"{r['compile_s']:.1f}" if r.get('compile_s') is not None else '-'
    lines.append(f"| {r['variant']} | {r['size']} | {r['batch']} | {r['framework']} | "
                 f"{r['mode']} | {r['batch'] / r['seconds']:.0f} | {1e3 * r['seconds']:.1f} | "
                 f"{mfu} | {memory} | {compile_s} | {ratio} |")
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default=os.environ.get('OUT', '.'), help='directory for the results')
  parser.add_argument('--frameworks', default='flax,hf-eager,hf-compile')
  parser.add_argument('--modes', default='train,infer')
  parser.add_argument('--steps', type=int, default=10, help='timed steps (median)')
  parser.add_argument('--remat', default='none', help='cvt-flax remat setting')
  parser.add_argument('--peak-tflops', type=float, help='the chip\'s peak dense bf16 TFLOP/s')
  parser.add_argument('--tiny', action='store_true', help='a tiny model, batch 4 (a CPU check)')
  parser.add_argument('--timeout', type=int, default=300, help='seconds per measurement')
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  for flag in ('--framework', '--mode', '--variant'):
    parser.add_argument(flag, help=argparse.SUPPRESS)
  parser.add_argument('--image-size', type=int, help=argparse.SUPPRESS)
  parser.add_argument('--batch', type=int, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  common.start_jax()
  if args.worker:
    return _worker(args)
  cases = (('tiny', 64, 4),) if args.tiny else CASES
  rows = []
  for variant, size, batch in cases:
    for mode in args.modes.split(','):
      for framework in args.frameworks.split(','):
        result = _spawn(args, variant, size, batch, framework, mode)
        rows.append(dict(result, variant=variant, size=size, batch=batch, framework=framework,
                         mode=mode))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  import jax  # pylint: disable=import-outside-toplevel
  peak = _peak_flops(args)
  header = (f'## CvT on {jax.devices()[0].device_kind} (jax {jax.__version__}), bf16, median of '
            f'{args.steps} steps; MFU against {peak / 1e12 if peak else "unknown"} TFLOP/s\n\n')
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'bench_device.json'), 'w') as f:
    json.dump({'device': jax.devices()[0].device_kind, 'peak_flops': peak, 'rows': rows}, f, indent=1)
  with open(os.path.join(args.out, 'bench_device.md'), 'w') as f:
    f.write(header + _table(rows, peak) + '\n')
  print(header + _table(rows, peak))


if __name__ == '__main__':
  main()
