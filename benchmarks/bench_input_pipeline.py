"""The input pipelines' speed against a decode yardstick run beside them, on synthetic JPEGs.

Writes `--num_images` synthetic 500x375 JPEGs (`cvt_flax.data.synthetic`) as a local TFDS dataset
(in a temporary directory unless --data_dir), then times, each in a process of its own and one
after the other:

- the yardstick: a plain tf.data map that decodes the whole JPEG (INTEGER_ACCURATE, as the
  pipelines do) and resizes it to the image size with an antialiased bicubic resize (one pass),
  run right before each row (the median of `--repeats` ratios is printed);
- `make_train_iterator` with the official recipe (crop inside the decode window, flip, RandAugment
  m9, random erasing's box), and with crop + flip only;
- `make_eval_iterator` (TF's decode, then PIL's resize and centre crop);
- with `--ops`, each RandAugment op alone after crop + flip (every image, magnitude 9).

  .venv/bin/python benchmarks/bench_input_pipeline.py [--ops] [--num_images 512 --batches 20]

Absolute images/s depend on the CPU; the ratio to the yardstick is what holds across x86 CPUs.

With `--side_by_side` each ratio is measured with the yardstick and the row running at the same
time, each in its own process pinned to a core of its own, for the same `--seconds`, and the cores
swapped on every other repeat: a shared VM's speed drifts by 10-20% within minutes, and this way
both sides see the same drift. It gives images/s per core, the figure the capacity plan asks for.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

if '--cpu' in sys.argv:  # a pinned child: pinned before TensorFlow sizes its thread pools
  os.sched_setaffinity(0, {int(sys.argv[sys.argv.index('--cpu') + 1])})

import cvt_flax.data as data
import tensorflow as tf
import tensorflow_datasets as tfds
from cvt_flax.data import augment, pipeline, randaugment, synthetic

OP_MAGNITUDE = 9.0

def _config(args, **overrides):
  cfg = data.default_input_config()
  cfg.update(dataset=synthetic.NAME, data_dir=args.data_dir, image_size=args.image_size,
             cache=True, **overrides)
  return cfg


def _train(args, **overrides):
  return data.make_train_iterator(_config(args, **overrides), global_batch_size=args.batch_size,
                                  seed=0)


def _records(args):
  return synthetic.build(args.data_dir, args.num_images).as_dataset(
      split='train', decoders={'image': tfds.decode.SkipDecoding()}).cache()


def _endless(args, transform, records=None, parallel=tf.data.AUTOTUNE):
  """Batches of `transform(record)` over the train JPEGs (default: their encoded bytes) without
  end, parallel as the pipelines are unless `parallel` says otherwise."""
  records = records if records is not None else _records(args).map(lambda ex: ex['image'])
  ds = records.repeat().map(transform, num_parallel_calls=parallel, deterministic=True)
  return iter(tfds.as_numpy(ds.batch(args.batch_size).prefetch(tf.data.AUTOTUNE)))


def _yardstick_image(image_bytes, size):
  image = tf.io.decode_jpeg(image_bytes, channels=3, dct_method='INTEGER_ACCURATE')
  resized = tf.image.resize(image, [size, size], method='bicubic', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def _one_op(args, name):
  """One thread applying RandAugment op `name` ('none': nothing) to every train crop, the crops
  decoded once and held in memory: the op's own cost per image, on one core."""
  cfg = _config(args)
  seed = tf.constant([0, 1], tf.int64)
  crops = _records(args).map(lambda ex: augment.decode_and_random_resized_crop(
      ex['image'], seed, cfg.image_size)).cache()

  def transform(image):
    if name != 'none':
      image = randaugment.apply_op(image, name, OP_MAGNITUDE, fill=(124, 116, 104))
    return tf.cast(image, tf.uint8)
  return _endless(args, transform, crops, parallel=1)


ROWS = {
    'yardstick': lambda args: _endless(args, lambda b: _yardstick_image(b, args.image_size)),
    'yardstick, one thread': lambda args: _endless(
        args, lambda b: _yardstick_image(b, args.image_size), parallel=1),
    'train: official recipe (crop, flip, RandAugment m9, erasing)': _train,
    'train: crop + flip only': lambda args: _train(args, randaugment_num_ops=0,
                                                    random_erasing=0.0),
    'eval: decode, PIL resize, centre crop': lambda args: data.make_eval_iterator(
        _config(args), global_batch_size=args.batch_size),
}
OP_ROWS = {f'op: {name}': (lambda args, n=name: _one_op(args, n))
           for name in ('none',) + randaugment.OP_NAMES}


def images_per_second(iterator, batches, warmup):
  for _ in range(warmup):
    batch = next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(iterator)
  return batches * batch['image'].shape[0] / (time.perf_counter() - start)


def _timed_batches(args, name):
  """(warm-up, timed) batches for row `name`: the eval split is finite."""
  if not name.startswith('eval'):
    return args.warmup, args.batches
  timed = min(args.batches, -(-(args.num_images // 2) // args.batch_size) - 1)
  if timed < 1:
    raise SystemExit('--num_images too small for two eval batches of --batch_size')
  return 1, timed


def _endless_eval(args):
  """The eval pipeline over its split again and again (side by side, the timing window decides
  when to stop)."""
  ds = pipeline.make_eval_dataset(_config(args), global_batch_size=args.batch_size).repeat()
  return iter(tfds.as_numpy(ds))


def images_in_window(iterator, seconds, warmup):
  """Once warm, says 'ready', waits for 'go' on stdin, then counts images for `seconds`."""
  for _ in range(warmup):
    next(iterator)
  print('ready', flush=True)
  sys.stdin.readline()
  images, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    images += next(iterator)['image'].shape[0]
  return images / (time.perf_counter() - start)


def measure_row(args):
  """In the child process: one row's images/s, printed as JSON."""
  rows = {**ROWS, **OP_ROWS}
  if args.cpu is not None and args.row.startswith('eval'):
    iterator = _endless_eval(args)
  else:
    iterator = rows[args.row](args)
  if args.row.startswith(('op:', 'yardstick')):
    iterator = ({'image': b} if not isinstance(b, dict) else b for b in iterator)
  if args.cpu is None:
    rate = images_per_second(iterator, *_timed_batches(args, args.row))
  else:
    rate = images_in_window(iterator, args.seconds, args.warmup)
  print(json.dumps({'rate': rate}), flush=True)


def _row_command(args, name, *flags):
  command = [sys.executable, __file__, '--row', name, '--data_dir', args.data_dir]
  for flag in ('num_images', 'batch_size', 'warmup', 'image_size') + flags:
    command += [f'--{flag}', str(getattr(args, flag))]
  return command


def _child(args, name):
  proc = subprocess.run(_row_command(args, name, 'batches'), capture_output=True, text=True,
                        check=False)
  if proc.returncode:
    raise SystemExit(f'row {name!r} failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])['rate']


def _pinned(args, name, cpu):
  return subprocess.Popen(_row_command(args, name, 'seconds') + ['--cpu', str(cpu)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _side_by_side(args, name, cpus):
  """[(row rate / yardstick rate, row rate, yardstick rate)], the two measured at the same time
  on cores of their own, the cores swapped on every other repeat."""
  runs = []
  for repeat in range(args.repeats):
    stick_cpu, row_cpu = cpus if repeat % 2 == 0 else cpus[::-1]
    procs = [_pinned(args, 'yardstick', stick_cpu), _pinned(args, name, row_cpu)]
    try:
      for proc in procs:  # lines before 'ready' (a library's prints) are skipped
        if 'ready\n' not in iter(proc.stdout.readline, ''):
          raise SystemExit(f'a side-by-side child of row {name!r} failed (see its stderr)')
      for proc in procs:
        proc.stdin.write('go\n')
        proc.stdin.flush()
      stick, rate = [json.loads(proc.stdout.readlines()[-1])['rate'] for proc in procs]
    finally:
      for proc in procs:  # after a failure, the other side must not go on timing on its own
        proc.kill()
        proc.wait()
    runs.append((rate / stick, rate, stick))
  return runs


def _one_after_the_other(args, name):
  runs = []
  for _ in range(args.repeats):
    stick = _child(args, 'yardstick')
    rate = _child(args, name)
    runs.append((rate / stick, rate, stick))
  return runs


def run(args):
  """Builds the dataset in `args.data_dir` (if needed) and prints the tables."""
  start = time.perf_counter()
  builder = synthetic.build(args.data_dir, args.num_images)
  print(f'dataset: {builder.info.splits["train"].num_examples} train JPEGs '
        f'{synthetic.WIDTH}x{synthetic.HEIGHT}, '
        f'{builder.info.dataset_size / builder.info.splits.total_num_examples / 1e3:.0f} KB each, '
        f'in {args.data_dir} (built in {time.perf_counter() - start:.0f}s)')
  cores = synthetic.usable_cpus()
  cpus = sorted(os.sched_getaffinity(0))[:2]
  if args.side_by_side:
    if len(cpus) < 2:
      raise SystemExit('--side_by_side needs two cores')
    print(f'side by side on cores {cpus}: yardstick and row at once, {args.seconds:g} s each, '
          f'batch {args.batch_size}, {args.image_size}px\n')
    cores = 1  # each side's rate is already one core's
  else:
    print(f'host cores usable: {cores} (os.cpu_count() = {os.cpu_count()}), batch '
          f'{args.batch_size}, {args.image_size}px, {args.batches} timed batches, each row in its '
          'own process\n')
  print(f'| {"pipeline":<62} | images/s/core | yardstick beside it | vs yardstick | range |')
  print(f'|{"-" * 64}|--------------:|--------------------:|-------------:|-------|')
  for name in ROWS:
    if name.startswith('yardstick') or not any(part in name for part in args.rows.split(',')):
      continue
    # The machine's speed drifts: each row runs beside the yardstick or right after it,
    # `--repeats` times, and the median ratio is what is printed (with that run's rates).
    runs = (_side_by_side(args, name, cpus) if args.side_by_side
            else _one_after_the_other(args, name))
    runs.sort()
    ratio, rate, stick = runs[len(runs) // 2]
    print(f'| {name:<62} | {rate / cores:13.0f} | {stick / cores:19.0f} | {ratio:11.2f}x | '
          f'{runs[0][0]:.2f}-{runs[-1][0]:.2f} |', flush=True)
  if args.ops:
    _print_op_costs(args)


def _print_op_costs(args):
  """Each op's cost per image on one thread, in yardstick images (1.0 = one decode and resize)."""
  one_thread = _child(args, 'yardstick, one thread')
  base = _child(args, 'op: none')
  print(f'\nRandAugment ops alone at magnitude {OP_MAGNITUDE:g} on in-memory {args.image_size}px '
        'crops, one thread: the time per image over that of the yardstick on one thread\n')
  print(f'| {"op":<14} | cost per image (yardstick = 1) |')
  print(f'|{"-" * 16}|-------------------------------:|')
  for name in randaugment.OP_NAMES:
    rate = _child(args, f'op: {name}')
    print(f'| {name:<14} | {one_thread / rate - one_thread / base:30.3f} |', flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_images', type=int, default=512)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--batches', type=int, default=40, help='timed batches per row')
  parser.add_argument('--warmup', type=int, default=5)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--data_dir', default=None, help='default: a fresh temporary directory')
  parser.add_argument('--repeats', type=int, default=3, help='runs of each row and the yardstick')
  parser.add_argument('--rows', default='train,eval', help='rows whose names contain one of these')
  parser.add_argument('--ops', action='store_true', help='also time each RandAugment op alone')
  parser.add_argument('--side_by_side', action='store_true',
                      help='yardstick and row at the same time, on one core each')
  parser.add_argument('--seconds', type=float, default=20.0, help='side by side: timed window')
  parser.add_argument('--row', default=None, help=argparse.SUPPRESS)  # a child process's row
  parser.add_argument('--cpu', type=int, default=None, help=argparse.SUPPRESS)  # pinned child
  args = parser.parse_args()
  if args.row:
    measure_row(args)
  elif args.data_dir:
    run(args)
  else:
    with tempfile.TemporaryDirectory(prefix='bench_input_') as args.data_dir:
      run(args)


if __name__ == '__main__':
  main()
