"""CvT throughput: cvt-flax (JAX/XLA) next to PyTorch eager (official architecture and HF
transformers) and to its own exported forms (`python -m cvt_flax.export`), served by their runtimes.

  .venv/bin/python benchmarks/bench_model.py --variant cvt-13 --batch 32
  .venv/bin/python benchmarks/bench_model.py --modes infer --batch 1 \
      --frameworks flax,hf,jax-export,onnx,savedmodel
  .venv/bin/python benchmarks/bench_model.py --variant cvt-w24 --image-size 384 --batch 8 --modes infer
  .venv/bin/python benchmarks/bench_model.py --frameworks flax --flax-override dwconv_impl=xla
  .venv/bin/python benchmarks/bench_model.py --rounds 3   # on a shared machine: best of 3 rounds

Every (framework, mode) pair runs in its own subprocess, so the peak RSS it reports belongs to that
framework and mode alone. All three models get the same weights: a cvt-flax model is initialised once
(seed 0), exported with `to_official_state_dict`, and loaded into the PyTorch models (into HF through
the converter's official -> HF key table). The official and cvt-flax models use QuickGELU (the
released models); HF always runs exact GELU. XLA flags come from the environment (XLA_FLAGS).

The exported forms (inference only, float32) are written once from the same weights by the
export worker, which reports their export times and sizes: `jax-export` is the deserialized
`jax.export` program (jit-called by jax alone), `onnx` the graph in onnxruntime's CPU provider,
`savedmodel` the serving signature in TensorFlow; each runtime uses its default thread count.

Modes: `infer` = eval-mode forward, `train` = one step of forward, backward and AdamW update on
random labels, in training mode (BatchNorm batch statistics, stochastic depth on). Times are the
median over `--steps` runs after one warm-up run; the JAX warm-up is preceded by an explicit
`lower().compile()` whose wall time is the reported compile time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

import common

FRAMEWORKS = ('flax', 'official', 'hf')
SERVING = {'jax-export': 'jax', 'onnx': 'onnx', 'savedmodel': 'savedmodel'}  # -> export format
LR, WEIGHT_DECAY = 1e-3, 0.05


def _parse_overrides(items):
  out = {}
  for item in items:
    key, _, value = item.partition('=')
    out[key] = value
  return out


def inputs(args):
  """Random (images NHWC float32, labels int32) of `args.batch` x `args.image_size`, seed 0."""
  rng = np.random.default_rng(0)
  images = rng.standard_normal((args.batch, args.image_size, args.image_size, 3), np.float32)
  labels = rng.integers(0, 1000, (args.batch,)).astype(np.int32)
  return images, labels


def _peak_rss_mib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------------------
# Workers (each runs in its own process).

def _flax_model(args):
  from flax import nnx
  import cvt_flax
  overrides = _parse_overrides(args.flax_override)
  return cvt_flax.create_model(args.variant, rngs=nnx.Rngs(0), dtype=args.dtype, **overrides)


def _export_weights(args):
  """Writes the seed-0 cvt-flax weights in official layout for the PyTorch workers, and the
  exported forms asked for; returns {form: {'export_s', 'size_mib'}}."""
  from cvt_flax import export
  from cvt_flax.convert.official import to_official_state_dict
  model = _flax_model(args)
  np.savez(args.weights, **to_official_state_dict(model))
  exports = {}
  for framework in args.frameworks.split(','):
    if framework in SERVING:
      out = _served(args, framework)
      start = time.perf_counter()
      export.export_model(model, out, format=SERVING[framework], image_size=args.image_size)
      size = sum(os.path.getsize(os.path.join(root, name))
                 for root, _, names in os.walk(out) for name in names)
      exports[framework] = {'export_s': time.perf_counter() - start, 'size_mib': size / 2**20}
  return exports


def _served(args, framework):
  return os.path.join(os.path.dirname(args.weights), framework)


def _serving_call(args, framework):
  """A callable running the exported form on NHWC float32 images, as its runtime serves it."""
  doc = json.load(open(os.path.join(_served(args, framework), 'model.json')))
  program = os.path.join(_served(args, framework), doc['program']['file'])
  if framework == 'jax-export':
    import jax
    exported = jax.export.deserialize(bytearray(open(program, 'rb').read()))
    call = jax.jit(exported.call)
    return lambda x: np.asarray(jax.block_until_ready(call(x)))
  if framework == 'onnx':
    import onnxruntime
    runner = onnxruntime.InferenceSession(program, providers=['CPUExecutionProvider'])
    return lambda x: runner.run(None, {doc['program']['input_name']: x})[0]
  from cvt_flax.data._tf import tf
  signature = tf.saved_model.load(_served(args, framework)).signatures['serving_default']
  return lambda x: signature(images=tf.constant(x))['logits'].numpy()


def _worker_serving(args, framework):
  call = _serving_call(args, framework)
  images, _ = inputs(args)
  np.save(args.logits, call(images))
  return common.median_seconds(lambda: call(images), args.steps), None


def compiled_flax_step(model, images, labels, mode, *, donate):
  """cvt-flax's eval-mode forward ('infer') or one AdamW training step ('train': returns params,
  rest, opt_state, loss; with `donate` its first three arguments are donated), compiled with the
  trainer's compiler settings (`cvt_flax.runtime.compiler.compile_ahead`). Returns (compiled, its
  arguments, compile seconds)."""
  import jax
  import optax
  from flax import nnx
  from cvt_flax.runtime import compiler
  if mode == 'infer':
    model.eval()
    graphdef, state = nnx.split(model)
    fn, jit_kwargs = (lambda state, x: nnx.merge(graphdef, state)(x)), {}
    call_args = (state, images)
  else:
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)

    def loss_fn(params, rest, x, y):
      model = nnx.merge(graphdef, params, rest, copy=True)
      loss = optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
      return loss, nnx.state(model, nnx.Not(nnx.Param))

    def train_step(params, rest, opt_state, x, y):
      (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), rest, opt_state, loss

    fn, jit_kwargs = train_step, dict(donate_argnums=(0, 1, 2) if donate else ())
    call_args = (params, rest, tx.init(params), images, labels)
  start = time.perf_counter()
  compiled = compiler.compile_ahead(fn, *call_args, **jit_kwargs)
  return compiled, call_args, time.perf_counter() - start


def _worker_flax(args, mode):
  import jax
  images, labels = (jax.device_put(a) for a in inputs(args))
  compiled, call_args, compile_s = compiled_flax_step(_flax_model(args), images, labels, mode,
                                                      donate=True)
  if mode == 'infer':
    np.save(args.logits, np.asarray(compiled(*call_args)))
    seconds = common.median_seconds(lambda: jax.block_until_ready(compiled(*call_args)), args.steps)
    return seconds, compile_s
  carry, batch = list(call_args[:3]), call_args[3:]

  def run():
    *carry[:], loss = compiled(*carry, *batch)  # donated buffers: keep the new ones
    jax.block_until_ready(loss)
  return common.median_seconds(run, args.steps), compile_s


def _torch_official(args):
  import torch
  from cvt_flax.convert.torch_reference import build_reference_model
  from cvt_flax.models import make_config
  model = build_reference_model(make_config(args.variant))
  state = {k: torch.from_numpy(v) for k, v in np.load(args.weights).items()}
  model.load_state_dict(state, strict=True)
  return model


def _torch_hf(args):
  """HF transformers' CvtForImageClassification with the shared weights (exact GELU, as HF runs)."""
  import torch
  import warnings
  from transformers import CvtConfig, CvtForImageClassification
  from cvt_flax.convert.hf import config_to_hf, official_to_hf_state_dict
  from cvt_flax.models import make_config
  with warnings.catch_warnings():  # the activation differs from the official one, as noted above
    warnings.simplefilter('ignore')
    hf_config = config_to_hf(make_config(args.variant))
  model = CvtForImageClassification(CvtConfig(**hf_config))
  state = official_to_hf_state_dict(dict(np.load(args.weights)))
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  return model


def _worker_torch(args, framework, mode):
  import torch
  torch.set_num_threads(args.threads)
  model = _torch_official(args) if framework == 'official' else _torch_hf(args)
  images, labels = inputs(args)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  y = torch.from_numpy(labels.astype(np.int64))
  call = (lambda x: model(pixel_values=x).logits) if framework == 'hf' else model
  if mode == 'infer':
    model.eval()
    with torch.inference_mode():
      np.save(args.logits, call(x).numpy())
      return common.median_seconds(lambda: call(x), args.steps), None
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

  def run():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(call(x), y).backward()
    opt.step()
  return common.median_seconds(run, args.steps), None


def run_worker(args):
  if args.worker == 'export':
    print(json.dumps(_export_weights(args)))
    return
  if args.worker == 'flax':
    seconds, compile_s = _worker_flax(args, args.mode)
  elif args.worker in SERVING:
    seconds, compile_s = _worker_serving(args, args.worker)
  else:
    seconds, compile_s = _worker_torch(args, args.worker, args.mode)
  print(json.dumps({'seconds': seconds, 'compile_s': compile_s, 'peak_rss_mib': _peak_rss_mib()}))


# ----------------------------------------------------------------------------------------------------
# Driver.

def _environment(args):
  import jax
  import torch
  cpu = platform.processor()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return {
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'cpu': f'{cpu}, {os.cpu_count()} logical cores',
      'jax': f'{jax.__version__}, devices {jax.devices()}',
      'XLA_FLAGS': os.environ.get('XLA_FLAGS', '(unset)'),
      'torch': f'{torch.__version__}, torch.get_num_threads() = {args.threads}',
      'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '(unset)'),
      # Other processes on the machine slow both frameworks down, PyTorch's OpenMP threads more.
      'load average (1, 5, 15 min) at the end': ', '.join(f'{x:.1f}' for x in os.getloadavg()),
  }


def _spawn(args, worker, mode, tmp):
  cmd = [sys.executable, os.path.abspath(__file__), '--worker', worker, '--mode', mode,
         '--weights', os.path.join(tmp, 'weights.npz'),
         '--logits', os.path.join(tmp, f'logits_{worker}.npy')]
  for key in ('variant', 'batch', 'image_size', 'steps', 'dtype', 'threads', 'frameworks'):
    cmd += [f'--{key.replace("_", "-")}', str(getattr(args, key))]
  for item in args.flax_override:
    cmd += ['--flax-override', item]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    return {'error': proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'failed'}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _format_table(args, results):
  rows = ['| framework | mode | images/s | ms/step | peak RSS (MiB) | compile (s) | flax speed-up |',
          '|---|---|---:|---:|---:|---:|---:|']
  for (framework, mode), r in results.items():
    if 'error' in r:
      rows.append(f'| {framework} | {mode} | error: {r["error"]} | | | | |')
      continue
    flax = results.get(('flax', mode), {})
    ratio = (f'{r["seconds"] / flax["seconds"]:.2f}x' if framework != 'flax' and 'seconds' in flax
             else '')
    compile_s = f'{r["compile_s"]:.1f}' if r['compile_s'] is not None else '-'
    rows.append(f'| {framework} | {mode} | {args.batch / r["seconds"]:.3g} | '
                f'{1e3 * r["seconds"]:.0f} | {r["peak_rss_mib"]:.0f} | {compile_s} | {ratio} |')
  return '\n'.join(rows)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variant', default='cvt-13')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--image-size', type=int, default=224)
  parser.add_argument('--steps', type=int, default=5, help='timed runs per measurement (median)')
  parser.add_argument('--rounds', type=int, default=1,
                      help='repeat every measurement in a fresh process; report the best round')
  parser.add_argument('--frameworks', default=','.join(FRAMEWORKS))
  parser.add_argument('--modes', default='infer,train')
  parser.add_argument('--dtype', default='float32', help='cvt-flax compute dtype')
  parser.add_argument('--threads', type=int, default=os.cpu_count(),
                      help='torch.set_num_threads; XLA:CPU uses all cores of the machine')
  parser.add_argument('--flax-override', action='append', default=[],
                      help='cvt-flax config field=value, e.g. dwconv_impl=xla (repeatable)')
  parser.add_argument('--worker', choices=FRAMEWORKS + tuple(SERVING) + ('export',),
                      help=argparse.SUPPRESS)
  parser.add_argument('--mode', help=argparse.SUPPRESS)
  parser.add_argument('--weights', help=argparse.SUPPRESS)
  parser.add_argument('--logits', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  common.start_jax()
  if args.worker:
    run_worker(args)
    return
  frameworks = args.frameworks.split(',')
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    exports = _spawn(args, 'export', 'none', tmp) if set(frameworks) - {'flax'} else {}
    # Rounds interleave the frameworks, so that load from other processes on a shared machine hits
    # them alike; each keeps its best round.
    for _ in range(args.rounds):
      for mode in args.modes.split(','):
        for framework in frameworks:
          if mode != 'infer' and framework in SERVING:
            continue  # an exported form is inference only
          result = _spawn(args, framework, mode, tmp)
          print(f'{framework:8s} {mode:5s} {result}', file=sys.stderr)
          best = results.get((framework, mode))
          if best is None or 'error' in best or result.get('seconds', 1e9) < best['seconds']:
            results[(framework, mode)] = result
    agreement = _logit_agreement(tmp, frameworks)
  print(f'## {args.variant} at {args.image_size}, batch {args.batch}, cvt-flax dtype {args.dtype}, '
        f'median of {args.steps} steps, best of {args.rounds} rounds'
        + (f', overrides {args.flax_override}' if args.flax_override else ''))
  for key, value in _environment(args).items():
    print(f'- {key}: {value}')
  for line in agreement:
    print(f'- {line}')
  for framework, e in exports.items():
    if framework in SERVING:
      print(f'- {framework}: exported in {e["export_s"]:.1f} s, {e["size_mib"]:.1f} MiB')
  print()
  print(_format_table(args, results))


def _logit_agreement(tmp, frameworks):
  """Max |logits - cvt-flax's logits| of each framework given the same weights (HF's differs by
  design: exact GELU instead of QuickGELU)."""
  flax = os.path.join(tmp, 'logits_flax.npy')
  if 'flax' not in frameworks or not os.path.exists(flax):
    return []
  lines = []
  for framework in frameworks:
    path = os.path.join(tmp, f'logits_{framework}.npy')
    if framework not in ('flax', 'hf') and os.path.exists(path):
      diff = np.max(np.abs(np.load(flax) - np.load(path)))
      lines.append(f'same weights: max |logits(cvt-flax) - logits({framework})| = {diff:.2e}')
  return lines


if __name__ == '__main__':
  main()
