"""Sharding: FSDP partition rules; 8 simulated CPU devices (data parallel and FSDP) train like 1.

XLA_FLAGS must be set before JAX starts, so the multi-device runs happen in a subprocess.
"""
import json
import textwrap

import pytest
from jax.sharding import PartitionSpec as P

from cvt_flax.runtime.sharding import fsdp_partition_spec
from helpers import run_python


@pytest.mark.parametrize('shape,spec', [
    ((64, 256), P(None, 'data')),       # the largest divisible dimension is split
    ((256, 64), P('data', None)),
    ((3, 3, 1, 64), P(None, None, None, 'data')),
    ((6, 10), P()),                      # nothing divisible by 8: replicated
    ((12, 16), P(None, 'data')),
    ((8,), P('data')),
    ((), P()),
])
def test_fsdp_partition_spec(shape, spec):
  assert fsdp_partition_spec(shape, 8, min_size=0) == spec


def test_fsdp_keeps_small_arrays_replicated():
  assert fsdp_partition_spec((64, 256), 8, min_size=2 ** 16) == P()
  assert fsdp_partition_spec((256, 256), 8, min_size=2 ** 16) == P('data', None)
  assert fsdp_partition_spec((64, 256), 1, min_size=0) == P()


_EIGHT_DEVICES = textwrap.dedent('''
    import json, os, shutil, sys
    import jax
    from cvt_flax.training import loop
    from cvt_flax.training.run import build_run
    from helpers import tiny_config, train_losses
    data_dir, root = sys.argv[1], sys.argv[2]
    assert jax.device_count() == 8, jax.devices()
    out = {}
    for name, devices, fsdp in [('one', jax.devices()[:1], False), ('dp', jax.devices(), False),
                                ('fsdp', jax.devices(), True)]:
      cfg = tiny_config(data_dir, fsdp=fsdp, fsdp_min_size=0)
      result = loop.train_and_evaluate(cfg, os.path.join(root, name), devices=devices)
      out[name] = {'losses': train_losses(os.path.join(root, name)), 'top1': result['eval/top1']}
    # How many arrays of the FSDP train state are really split over the 8 devices.
    run = build_run(tiny_config(data_dir, fsdp=True, fsdp_min_size=0), root)
    specs = [s.spec for s in jax.tree.leaves(run.state_shardings)]
    out['fsdp_sharded'] = sum('data' in tuple(s) for s in specs)
    out['fsdp_total'] = len(specs)
    # Restore the FSDP run's step-3 checkpoint onto a 1-device mesh and finish there.
    moved = os.path.join(root, 'moved')
    shutil.copytree(os.path.join(root, 'fsdp'), moved)
    shutil.rmtree(os.path.join(moved, 'checkpoints', '6'))
    loop.train_and_evaluate(tiny_config(data_dir), moved, devices=jax.devices()[:1])
    out['moved'] = {'losses': train_losses(moved)}
    print('RESULT' + json.dumps(out))
''')


@pytest.mark.slow  # four trainings, three 8-device compiles: ~2.5 min on 2 cores (CI runs it)
def test_eight_devices_match_one_device(digits_dir, compile_cache, tmp_path):
  stdout = run_python(_EIGHT_DEVICES, args=(digits_dir, str(tmp_path)),
                      env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
                           'JAX_PLATFORMS': 'cpu', **compile_cache})
  out = json.loads(stdout.split('RESULT', 1)[1])
  one = out['one']['losses']
  assert sorted(one, key=int) == [str(i) for i in range(1, 7)]
  # Same global batch, same data, same RNG draws (threefry is partitionable), same math. What
  # differs is the order of float32 reductions XLA splits across devices (batch means, BatchNorm
  # statistics, the gradient all-reduce), so results agree to rounding, not bitwise: measured
  # <= 1.1e-7 relative over these 6 steps (often exactly equal); 1e-5 leaves room for other CPUs.
  for name in ('dp', 'fsdp'):
    for step, loss in one.items():
      assert out[name]['losses'][step] == pytest.approx(loss, rel=1e-5), (name, step)
    assert out[name]['top1'] == pytest.approx(out['one']['top1'], abs=1 / 360 + 1e-9)
  assert out['fsdp_sharded'] > out['fsdp_total'] // 2
  # Restored from the FSDP checkpoint onto one device: the same training, to rounding.
  for step, loss in out['fsdp']['losses'].items():
    assert out['moved']['losses'][step] == pytest.approx(loss, rel=1e-5), step
