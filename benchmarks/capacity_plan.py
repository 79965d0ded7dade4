r"""The TPU capacity plan: `python -m cvt_flax.aot` for each row, then one Markdown table.

    .venv/bin/python benchmarks/capacity_plan.py --out_dir /tmp/plan [--rows c13_224_v5e8,...]

Each row is one process compiling a config's train and eval steps for a slice on this CPU (no TPU
needed, libtpu: `pip install 'cvt-flax[tpu]'`); a row's full report goes to OUT_DIR/NAME.out, and
a row whose report is already there is not compiled again. Every figure is XLA:TPU's estimate, not
a measurement. On a 2-core CPU a CvT-13 row takes 4-6 minutes, a W24 row up to 10.
"""
import argparse
import json
import os
import subprocess
import sys
import time

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
    'c13_224_v5e256': ('v5e-256', f'{IMAGENET}:cvt-13,224', ()),
    'w24_384_v5e256': ('v5e-256', f'{IMAGENET}:cvt-w24,384', ()),
}


def command(name: str) -> list[str]:
  tpu_slice, config, flags = ROWS[name]
  return ['-m', 'cvt_flax.aot', f'--config={config}', f'--topology={tpu_slice}', '--json', *flags]


def run_row(name: str, out_dir: str) -> dict:
  path = os.path.join(out_dir, f'{name}.out')
  if not (os.path.exists(path) and os.path.getsize(path)):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *command(name)], cwd=ROOT, capture_output=True,
                          text=True, check=False)
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
  settings = [f.removeprefix('--config.') for f in flags if 'eval_batch' not in f]
  return label + (f' ({", ".join(settings)})' if settings else '')


def table(results: dict[str, dict]) -> str:
  rows = ['| config | slice | per chip batch | FSDP / remat | HBM per chip (GiB) | fits | '
          'est. images/s per chip | est. MFU | est. days, whole schedule | compile (s) |',
          '|---|---|---:|---|---:|---|---:|---:|---:|---:|']
  for name, r in results.items():
    hbm = f'{r["hbm_bytes_per_chip"] / 2 ** 30:.1f} of {r["hbm_capacity_bytes"] / 2 ** 30:.0f}'
    fits = 'yes' if r['fits'] else ('no (XLA refused)' if r['train_out_of_memory'] else 'no')
    est = r['estimated_images_per_sec_per_chip']
    numbers = ((f'{est:.0f}', f'{r["estimated_mfu"]:.1%}', f'{r["estimated_schedule_days"]:.2f}')
               if est else ('-', '-', '-'))
    rows.append(f'| {_config_label(name)} | {r["topology"]} | {r["per_chip_batch"]} | '
                f'{"FSDP" if r["fsdp"] else "-"} / {r["remat"]} | {hbm} | {fits} | '
                f'{" | ".join(numbers)} | {r["compile_seconds"]:.0f} |')
  return '\n'.join(rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out_dir', required=True)
  parser.add_argument('--rows', default=','.join(ROWS), help='comma-separated row names')
  args = parser.parse_args()
  os.makedirs(args.out_dir, exist_ok=True)
  names = args.rows.split(',')
  unknown = [n for n in names if n not in ROWS]
  if unknown:
    raise SystemExit(f'unknown rows {unknown}; rows: {", ".join(ROWS)}')
  print(table({name: run_row(name, args.out_dir) for name in names}))


if __name__ == '__main__':
  main()
