"""Where the time of a CvT step goes, per kind of layer, in cvt-flax (XLA:CPU) and HF PyTorch.

  .venv/bin/python benchmarks/profile_ops.py --variant cvt-13 --batch 32 [--modes infer,train]

Each framework runs in its own process on the same model (random weights), fp32, and is profiled
over `--steps` steps after a warm-up:
  * cvt-flax: a `jax.profiler` trace; every XLA thunk (fusion, dot, convolution) is put in the
    category of the named scope in its HLO `op_name` (the model labels patch_embed, conv_proj,
    qkv_linear, attention_core, attn_out_linear, mlp, layer_norm); `transpose(...)` in the name is
    the backward pass; the AdamW update has no jvp. Times are wall clock: an instant in which
    several thunks run (two cores) is shared among them, and one in which none runs goes to the
    last matmul started (XLA:CPU runs matmuls asynchronously on Eigen's threads, outside the
    thunk's traced span). Scaled to the unprofiled step time; the table prints the time found /
    step time, which is near 1 when nothing is missed.
  * PyTorch: `torch.profiler`, with a record_function range around each module of a category;
    every top-level aten op counts in its innermost range; backward ops count in the category of
    the forward op that created them (autograd sequence numbers); `Optimizer.step` is the update.
Prints one markdown table per mode: ms per step and share of the step, both frameworks.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

import bench_model  # the same inputs and cvt-flax step as the throughput benchmark
import common

CATEGORIES = ('patch_embed', 'conv_proj', 'qkv_linear', 'attention_core', 'attn_out_linear', 'mlp',
              'layer_norm')
_JAX_IDLE = ('ThunkExecutor::Execute', 'SlinkyThreadPool::Await')


_SCOPES = re.compile(r'\b(' + '|'.join(CATEGORIES) + r')\b')


def _label(op_name: str, mode: str) -> str:
  """The category of an HLO op from its op_name, e.g. 'jit(step)/transpose(jvp(mlp))/dot_general'
  (the innermost named scope; scopes show up inside transformation names)."""
  scopes = _SCOPES.findall(op_name)
  category = scopes[-1] if scopes else 'other'
  if mode == 'train' and op_name and 'jvp(' not in op_name:
    return 'optimizer' if category == 'other' else category
  return category + (' (backward)' if 'transpose(' in op_name else '')


# --------------------------------------------------------------------------------------------------
# cvt-flax

def _jax_step(args, mode):
  """bench_model's compiled step (no donation: the same arguments run every profiled step)."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import cvt_flax  # pylint: disable=import-outside-toplevel
  model = cvt_flax.create_model(args.variant, rngs=nnx.Rngs(0))
  images, labels = (jax.device_put(a) for a in bench_model.inputs(args))
  compiled, call_args, _ = bench_model.compiled_flax_step(model, images, labels, mode,
                                                           donate=False)
  return compiled, call_args


def _op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> its op_name metadata."""
  return {m.group(1): m.group(2) for m in re.finditer(
      r'^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?metadata=\{[^}]*op_name="([^"]*)"', hlo_text, re.M)}


def profile_jax(args, mode) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=import-outside-toplevel
  compiled, inputs = _jax_step(args, mode)
  jax.block_until_ready(compiled(*inputs))
  names = _op_names(compiled.as_text())
  with tempfile.TemporaryDirectory() as trace_dir:
    start = time.perf_counter()
    jax.profiler.start_trace(trace_dir)
    for _ in range(args.steps):
      jax.block_until_ready(compiled(*inputs))
    jax.profiler.stop_trace()
    wall = (time.perf_counter() - start) / args.steps
    space = xplane_pb2.XSpace()
    with open(glob.glob(f'{trace_dir}/plugins/profile/*/*.xplane.pb')[0], 'rb') as f:
      space.ParseFromString(f.read())
  intervals = []  # (start ps, end ps, category, is a matmul)
  for plane in space.planes:
    events = {k: v.name for k, v in plane.event_metadata.items()}
    for line in plane.lines:
      if 'XLAEigen' not in line.name:  # the worker threads that run the thunks
        continue
      for ev in line.events:
        thunk = events.get(ev.metadata_id, '')
        if thunk not in _JAX_IDLE:
          start = line.timestamp_ns * 1000 + ev.offset_ps
          intervals.append((start, start + ev.duration_ps, _label(names.get(thunk, ''), mode),
                            thunk.startswith('dot')))
  ms = _wall_clock_ms(intervals)
  total = sum(ms.values())
  return {'step_ms': 1e3 * wall, 'attributed_ms': total / args.steps,
          'ms': {k: v * 1e3 * wall / total for k, v in ms.items()}}


def _wall_clock_ms(intervals) -> dict[str, float]:
  """Wall-clock ms per category: while thunks run, each instant is shared among the running ones;
  while none runs, it goes to the last matmul started. XLA:CPU's matmuls run asynchronously on
  Eigen's threads, outside the thunk's traced span, and the next thunk waits for them."""
  points = sorted({t for start, end, *_ in intervals for t in (start, end)})
  if not points:
    return {}
  starts = sorted(intervals)
  ms, running, last_dot, i = collections.Counter(), [], 'other', 0
  for t0, t1 in zip(points, points[1:]):
    while i < len(starts) and starts[i][0] <= t0:
      running.append(starts[i])
      if starts[i][3]:
        last_dot = starts[i][2]
      i += 1
    running = [iv for iv in running if iv[1] > t0]
    share = (t1 - t0) / 1e9
    if running:
      for iv in running:
        ms[iv[2]] += share / len(running)
    else:
      ms[last_dot] += share
  return ms


# --------------------------------------------------------------------------------------------------
# HF PyTorch

_HF_MODULES = {'CvtConvEmbeddings': 'patch_embed', 'CvtSelfAttentionConvProjection': 'conv_proj',
               'CvtSelfAttention': 'attention_core', 'CvtSelfOutput': 'attn_out_linear',
               'CvtIntermediate': 'mlp', 'CvtOutput': 'mlp', 'LayerNorm': 'layer_norm'}


def _label_modules(model):
  import torch  # pylint: disable=import-outside-toplevel
  ranges = {}
  for name, module in model.named_modules():
    kind = _HF_MODULES.get(type(module).__name__)
    if name.endswith(('projection_query', 'projection_key', 'projection_value')):
      kind = 'qkv_linear'
    if kind is None or (kind == 'layer_norm' and 'layernorm_' not in name):
      continue  # the patch embedding's own LayerNorm counts in patch_embed
    def enter(mod, _, kind=kind):
      ranges[id(mod)] = torch.profiler.record_function(f'#{kind}')
      ranges[id(mod)].__enter__()
    def leave(mod, *_):
      ranges.pop(id(mod)).__exit__(None, None, None)
    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)


def _in_backward(event) -> bool:
  node = event
  while node is not None:
    if node.name.startswith('autograd::engine::evaluate_function'):
      return True
    node = node.cpu_parent
  return False


def _torch_category(event) -> str:
  node = event.cpu_parent
  while node is not None:
    if node.name.startswith('#'):
      return node.name[1:]
    if node.name.startswith('Optimizer.step'):
      return 'optimizer'
    node = node.cpu_parent
  return 'other'


def profile_torch(args, mode) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import CvtConfig, CvtForImageClassification  # pylint: disable=import-outside-toplevel
  from cvt_flax.convert.hf import config_to_hf  # pylint: disable=import-outside-toplevel
  from cvt_flax.models import make_config  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count())
  model = CvtForImageClassification(CvtConfig(**config_to_hf(make_config(args.variant,
                                                                         activation='gelu'))))
  _label_modules(model)
  images, labels = bench_model.inputs(args)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  y = torch.from_numpy(labels.astype(np.int64))
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

  def step():
    if mode == 'infer':
      with torch.inference_mode():
        model(pixel_values=x)
      return
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y).backward()
    opt.step()
  model.train(mode == 'train')
  step()
  start = time.perf_counter()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(args.steps):
      step()
  wall = (time.perf_counter() - start) / args.steps
  events = prof.events()
  backward = {id(e) for e in events if _in_backward(e)}
  # The autograd node of a forward op has the op's sequence number.
  forward_category = {e.sequence_nr: _torch_category(e) for e in events
                      if e.sequence_nr >= 0 and id(e) not in backward}
  ms = collections.Counter()
  for e in events:
    if e.name.startswith('autograd::engine::evaluate_function'):
      if not _in_backward(e.cpu_parent):  # nested evaluations are inside this one's time
        ms[forward_category.get(e.sequence_nr, 'other') + ' (backward)'] += e.cpu_time_total
    elif (e.name.startswith('aten::') and id(e) not in backward
          and (e.cpu_parent is None or not e.cpu_parent.name.startswith('aten::'))):
      ms[_torch_category(e)] += e.cpu_time_total
  total = sum(ms.values())  # microseconds of op time; scaled to the unprofiled step
  return {'step_ms': 1e3 * wall, 'attributed_ms': total / 1e3 / args.steps,
          'ms': {k: v / total * 1e3 * wall for k, v in ms.items()}}


# --------------------------------------------------------------------------------------------------

def _table(variant, batch, mode, jax_result, torch_result) -> str:
  keys = sorted(set(jax_result['ms']) | set(torch_result['ms']),
                key=lambda k: (k.replace(' (backward)', '') not in CATEGORIES, k))
  lines = [f'### {variant}, batch {batch}, {mode}: cvt-flax {jax_result["step_ms"]:.0f} ms, '
           f'HF PyTorch {torch_result["step_ms"]:.0f} ms per step',
           f'(op time found by the profilers / step time: cvt-flax '
           f'{jax_result["attributed_ms"] / jax_result["step_ms"]:.2f}, PyTorch '
           f'{torch_result["attributed_ms"] / torch_result["step_ms"]:.2f})', '',
           '| op | cvt-flax ms | share | PyTorch ms | share | PyTorch / cvt-flax |',
           '|---|---:|---:|---:|---:|---:|']
  for k in keys:
    a, b = jax_result['ms'].get(k, 0.0), torch_result['ms'].get(k, 0.0)
    ratio = f'{b / a:.2f}' if a > 0.5 and b > 0.5 else '-'
    lines.append(f'| {k} | {a:.0f} | {a / jax_result["step_ms"]:.1%} | {b:.0f} | '
                 f'{b / torch_result["step_ms"]:.1%} | {ratio} |')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--variant', default='cvt-13')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--image-size', type=int, default=224)
  parser.add_argument('--steps', type=int, default=2)
  parser.add_argument('--modes', default='infer,train')
  parser.add_argument('--worker', choices=('jax', 'torch'), help=argparse.SUPPRESS)
  parser.add_argument('--mode', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  common.start_jax()
  if args.worker:
    fn = profile_jax if args.worker == 'jax' else profile_torch
    print('RESULT' + json.dumps(fn(args, args.mode)))
    return
  for mode in args.modes.split(','):
    results = {}
    for worker in ('jax', 'torch'):
      cmd = [sys.executable, os.path.abspath(__file__), '--worker', worker, '--mode', mode,
             '--variant', args.variant, '--batch', str(args.batch), '--image-size',
             str(args.image_size), '--steps', str(args.steps)]
      out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
      results[worker] = json.loads(out.split('RESULT', 1)[1])
    print(_table(args.variant, args.batch, mode, results['jax'], results['torch']) + '\n')


if __name__ == '__main__':
  main()
