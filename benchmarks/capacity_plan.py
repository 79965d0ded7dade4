r"""The capacity plan for TPU slices and NVIDIA GPU machines: `python -m cvt_flax.aot` for each row,
then one Markdown table.

    .venv/bin/python benchmarks/capacity_plan.py --out_dir /tmp/plan [--rows c13_224_v5e8,...] \
        [--host_images_per_sec_per_cpu N | --measure_host]

Each row is one process compiling a config's train and eval steps for a slice on this CPU (no TPU
or GPU needed: libtpu, `pip install 'cvt-flax[tpu]'`; JAX's CUDA plugin in .venv/gpu-aot, which
`make install` fills); a row's full report goes to OUT_DIR/NAME.out, and a row whose report is
already there is not compiled again. Every figure is the compiler's estimate, not a measurement
(on a GPU: bytes counted from the HLO of a program compiled without autotuning). On a 2-core CPU
a CvT-13 TPU row takes 4-6 minutes, a W24 row up to 10; a CvT-13 GPU row about 2.

The hosts: with a train input pipeline rate per vCPU (given, or measured once here on synthetic
JPEGs with the ImageNet recipe), each row's hosts deliver that rate times their vCPUs
(`cvt_flax.aot.tpus`, `gpus`); a row whose hosts deliver less than its chips take is host-bound,
and its images/s, MFU and days are the hosts'.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import cvt_flax.data as data
from cvt_flax.aot import gpus, tpus
from cvt_flax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET = 'configs/imagenet.py'
# name -> (slice, config, extra flags). The recipes as configs/imagenet.py and configs/finetune.py
# give them; where a recipe does not fit, the row says with what it does.
ROWS = {
    'c13_224_v5e8': ('v5e-8', f'{IMAGENET}:cvt-13,224', ()),
    'c13_384_v5e8': ('v5e-8', f'{IMAGENET}:cvt-13,384', ()),
    'c21_224_v5e8': ('v5e-8', f'{IMAGENET}:cvt-21,224', ()),
    'c21_384_v5e8': ('v5e-8', f'{IMAGENET}:cvt-21,384', ()),
    'w24_384_v5e8_fsdp': ('v5e-8', f'{IMAGENET}:cvt-w24,384', ()),
    'w24_384_v5e8_nofsdp': ('v5e-8', f'{IMAGENET}:cvt-w24,384', ('--config.fsdp=False',)),
    'w24_384_v5e8_fsdp_remat_acc8': ('v5e-8', f'{IMAGENET}:cvt-w24,384', (
        '--config.remat=block', '--config.grad_accum_steps=8', '--config.eval_batch_size=256')),
    'ft21_384_v5e8': ('v5e-8', 'configs/finetune.py:imagenet384',
                      ('--config.model.variant=cvt-21',)),
    'c13_224_v6e8': ('v6e-8', f'{IMAGENET}:cvt-13,224', ()),
    'c21_224_v6e8': ('v6e-8', f'{IMAGENET}:cvt-21,224', ()),
    'c13_384_v6e8': ('v6e-8', f'{IMAGENET}:cvt-13,384', ()),
    'c21_384_v6e8': ('v6e-8', f'{IMAGENET}:cvt-21,384', ()),
    'c13_224_v5p8': ('v5p-8', f'{IMAGENET}:cvt-13,224', ()),
    'w24_384_v5p8': ('v5p-8', f'{IMAGENET}:cvt-w24,384', (
        '--config.remat=block', '--config.grad_accum_steps=16', '--config.eval_batch_size=256')),
    'c13_224_v4_8': ('v4-8', f'{IMAGENET}:cvt-13,224', ()),
    # Ironwood: tpu7x-8 is 4 chips of 2 devices, so the recipes' global batches give 512 images per
    # chip (256 per device).
    'c13_224_tpu7x8': ('tpu7x-8', f'{IMAGENET}:cvt-13,224', ()),
    'c21_224_tpu7x8': ('tpu7x-8', f'{IMAGENET}:cvt-21,224', ()),
    'w24_384_tpu7x8': ('tpu7x-8', f'{IMAGENET}:cvt-w24,384', ()),
    'c13_224_v5e256': ('v5e-256', f'{IMAGENET}:cvt-13,224', ()),
    'w24_384_v5e256': ('v5e-256', f'{IMAGENET}:cvt-w24,384', ()),
    # Colab's GPUs: the finetune notebook's run (CvT-13 at 224, 64 images a step, 1,000 steps).
    **{f'ft13_224_{gpu}{suffix}': (gpu, 'configs/finetune.py:cifar10', (
        '--config.model.variant=cvt-13', '--config.input.image_size=224',
        '--config.batch_size=64', '--config.optimizer.base_batch_size=64',
        '--config.num_train_steps=1000', *dtype))
       for gpu in ('t4', 'l4', 'a100-40')
       for suffix, dtype in (('', ('--config.dtype=bfloat16',)),
                             ('_fp32', ('--config.dtype=float32',)))},
}
# 8-GPU servers: the TPU rows' recipes (256 images per GPU) in bf16 as configured and in float32
# (_fp32), W24 as configured and with what makes it fit (_remat_acc4). Row names:
# VARIANT_RES_SERVER[_remat_acc4][_fp32].
_H100_RUNS = ('c13_224', 'c13_224_fp32', 'c21_224', 'c21_224_fp32', 'c13_384', 'c13_384_fp32',
              'c21_384', 'c21_384_fp32', 'w24_384', 'w24_384_remat_acc4',
              'w24_384_remat_acc4_fp32')
_GPU_SERVERS = {
    'h100x8': ('h100-8', _H100_RUNS),
    'a100x8': ('a100-80-8', ('c13_224', 'c13_224_fp32', 'c21_224', 'c21_224_fp32', 'w24_384',
                             'w24_384_remat_acc4', 'w24_384_remat_acc4_fp32')),
    'h200x8': ('h200-8', ('c13_224',)),
    'b200x8': ('b200-8', ('c13_224',)),
}
_VARIANTS = {'c13': 'cvt-13', 'c21': 'cvt-21', 'w24': 'cvt-w24'}
_GPU_FLAGS = {'_remat_acc4': ('--config.remat=block', '--config.grad_accum_steps=4',
                              '--config.eval_batch_size=512'),
              '_fp32': ('--config.dtype=float32',)}
for _server, (_topology, _runs) in _GPU_SERVERS.items():
  for _run in _runs:
    _variant, _size, *_rest = _run.split('_')
    _suffix = ''.join('_' + r for r in _rest)
    ROWS[f'{_variant}_{_size}_{_server}{_suffix}'] = (
        _topology, f'{IMAGENET}:{_VARIANTS[_variant]},{_size}',
        sum((flags for key, flags in _GPU_FLAGS.items() if key in _suffix), ()))
GPU_AOT = os.path.join(sys.prefix, 'gpu-aot')  # JAX's CUDA plugin, for the GPU rows alone


def command(name: str) -> list[str]:
  tpu_slice, config, flags = ROWS[name]
  return ['-m', 'cvt_flax.aot', f'--config={config}', f'--topology={tpu_slice}', '--json', *flags]


def run_row(name: str, out_dir: str) -> dict:
  path = os.path.join(out_dir, f'{name}.out')
  if not (os.path.exists(path) and os.path.getsize(path)):
    start = time.perf_counter()
    env = dict(os.environ)
    if gpus.is_gpu_name(ROWS[name][0]):
      env['PYTHONPATH'] = os.pathsep.join(filter(None, [GPU_AOT, env.get('PYTHONPATH')]))
    proc = subprocess.run([sys.executable, *command(name)], cwd=ROOT, capture_output=True,
                          text=True, check=False, env=env)
    if proc.returncode not in (0, 2):  # 2: compiled, does not fit
      raise SystemExit(f'{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
    with open(path, 'w', encoding='utf-8') as f:
      f.write(proc.stdout)
    print(f'{name}: {time.perf_counter() - start:.0f}s', file=sys.stderr, flush=True)
  with open(path, encoding='utf-8') as f:
    return json.loads(f.read().strip().splitlines()[-1])


def _config_label(name: str) -> str:
  _, config, flags = ROWS[name]
  label = config.split('/')[-1].replace('.py', '')
  settings = [f.removeprefix('--config.') for f in flags
              if 'eval_batch' not in f and 'dtype' not in f]
  return label + (f' ({", ".join(settings)})' if settings else '')


def _hosts_per_chip(topology: str, host_per_cpu: float | None) -> tuple[str, float | None]:
  """('HOSTS x VCPUS', images/s per chip the hosts deliver at `host_per_cpu`)."""
  machine = gpus.parse_machine(topology) if gpus.is_gpu_name(topology) else (
      tpus.parse_slice(topology))
  vcpus = f'{machine.num_hosts} x {machine.host_vcpus}'
  if host_per_cpu is None:
    return vcpus, None
  return vcpus, host_per_cpu * machine.host_vcpus * machine.num_hosts / machine.num_chips


def _estimates(r: dict, host_per_chip: float | None) -> tuple[str, ...]:
  """(images/s per chip, MFU, days, bound): the chips' roofline, or the hosts' where lower."""
  est = r['estimated_images_per_sec_per_chip']
  if not (est and r['fits']):  # XLA:GPU compiles what won't fit
    return '-', '-', '-', '-'
  scale, bound = 1.0, r['bound']
  if host_per_chip is not None and host_per_chip < est:
    scale, bound = host_per_chip / est, '**host**'
  return (f'{est * scale:.0f}', f'{r["estimated_mfu"] * scale:.1%}',
          f'{r["estimated_schedule_days"] / scale:.2f}', bound)


def table(results: dict[str, dict], host_per_cpu: float | None = None) -> str:
  rows = ['| config | slice | per chip batch | dtype | FSDP / remat | HBM per chip (GiB) | fits | '
          'est. images/s per chip | est. MFU | est. days, whole schedule | bound | '
          'hosts x vCPUs | hosts\' images/s per chip | compile (s) | attention per stage |',
          '|---|---|---:|---|---|---:|---|---:|---:|---:|---|---|---:|---:|---|']
  for name, r in results.items():
    hbm = f'{r["hbm_bytes_per_chip"] / 2 ** 30:.1f} of {r["hbm_capacity_bytes"] / 2 ** 30:.0f}'
    fits = 'yes' if r['fits'] else ('no (XLA refused)' if r['train_out_of_memory'] else 'no')
    vcpus, host_per_chip = _hosts_per_chip(r['topology'], host_per_cpu)
    numbers = (*_estimates(r, host_per_chip), vcpus,
               '-' if host_per_chip is None else f'{host_per_chip:.0f}')
    stages = r.get('compute', {}).get('stages', [])
    attention = ', '.join(stage['attention'][0] for stage in stages) or '-'
    rows.append(f'| {_config_label(name)} | {r["topology"]} | {r["per_chip_batch"]} | '
                f'{r.get("dtype", "-")} | {"FSDP" if r["fsdp"] else "-"} / {r["remat"]} | {hbm} | '
                f'{fits} | {" | ".join(numbers)} | {r["compile_seconds"]:.0f} | {attention} |')
  return '\n'.join(rows)


def _measured_host_rate() -> float:
  """The ImageNet recipe's train pipeline on synthetic JPEGs here: images/s per CPU."""
  with tempfile.TemporaryDirectory(prefix='capacity_plan_') as data_dir:
    synthetic.build(data_dir)
    rate = synthetic.train_images_per_sec(data.default_input_config(), data_dir)
  return rate / synthetic.usable_cpus()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out_dir', required=True)
  parser.add_argument('--rows', default=','.join(ROWS), help='comma-separated row names')
  parser.add_argument('--host_images_per_sec_per_cpu', type=float, default=None)
  parser.add_argument('--measure_host', action='store_true',
                      help='measure the rate per CPU here (synthetic JPEGs, ImageNet recipe)')
  args = parser.parse_args()
  host_per_cpu = _measured_host_rate() if args.measure_host else args.host_images_per_sec_per_cpu
  if host_per_cpu is not None:
    print(f'hosts at {host_per_cpu:.0f} train images/s per vCPU', file=sys.stderr)
  os.makedirs(args.out_dir, exist_ok=True)
  names = args.rows.split(',')
  unknown = [n for n in names if n not in ROWS]
  if unknown:
    raise SystemExit(f'unknown rows {unknown}; rows: {", ".join(ROWS)}')
  print(table({name: run_row(name, args.out_dir) for name in names}, host_per_cpu))


if __name__ == '__main__':
  main()
