"""NVIDIA GPUs compiled for on this CPU (`python -m cvt_flax.aot --topology h100-8`): the machines'
names and figures, and XLA:GPU compiles through the trainer's own path, in a process that has JAX's
CUDA plugin (`make install` puts it in .venv/gpu-aot, away from the other tests' JAX)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cvt_flax.aot import gpus
from cvt_flax.errors import ConfigError
from helpers import ROOT, subprocess_env

GPU_AOT = Path(sys.prefix) / 'gpu-aot'
needs_plugin = pytest.mark.skipif(not GPU_AOT.is_dir(), reason='make install puts the CUDA plugin '
                                  'in .venv/gpu-aot')


def _with_plugin(args, timeout=900):
  """`python args...` with JAX's CUDA plugin importable; (stdout, stderr)."""
  env = subprocess_env({'PYTHONPATH': os.pathsep.join([str(GPU_AOT), str(ROOT / 'tests'),
                                                        str(ROOT)])})
  proc = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  return proc.stdout, proc.stderr


def test_gpu_names_give_machines_of_one_or_eight_gpus():
  assert (gpus.parse_machine('h100-8').num_chips, gpus.parse_machine('t4').num_chips) == (8, 1)
  assert gpus.parse_machine('a100-80-8').gpu.chip.hbm_bytes > 80e9
  assert gpus.parse_machine('a100-40').gpu.chip.hbm_bytes < 45e9
  # The host's vCPUs: the 8-GPU machine type's, or Colab's 2 beside a T4.
  assert [gpus.parse_machine(n).host_vcpus for n in ('h100-8', 'h100', 'a100-80-8', 't4')] == [
      208, 26, 96, 2]
  for bad in ('h100-4', 'h300-8', 'a100-8', 't4-x'):
    with pytest.raises(ConfigError, match='h100-8'):
      gpus.parse_machine(bad)
  assert gpus.is_gpu_name('a100-80-8') and not gpus.is_gpu_name('v5e-8')
  # The description XLA:GPU compiles for says the GPU's generation and memory.
  t4 = gpus.target_config(gpus.GPUS['t4'])
  assert 'major: 7 minor: 5' in t4 and f'device_memory_size: {15360 * 2 ** 20}' in t4


_T4_FORWARD = r'''
import json, jax, jax.numpy as jnp
from flax import nnx
import cvt_flax
from cvt_flax.aot import compile as aot_compile, gpus, hlo
from cvt_flax.models import compute
from cvt_flax.runtime import platforms, sharding
from helpers import TINY_MODEL
platforms.cpu_only_without_accelerator()
devices = aot_compile.slice_devices(gpus.parse_machine('t4'))
mesh = sharding.make_mesh(devices)
model = nnx.eval_shape(lambda: cvt_flax.create_model(TINY_MODEL, num_classes=10, rngs=nnx.Rngs(0),
                                                     dtype='bfloat16', mesh=mesh))
model.eval()
graphdef, state = nnx.split(model)
images = jax.ShapeDtypeStruct((8, 64, 64, 3), jnp.float32, sharding=sharding.batch_sharding(mesh))
state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                    sharding=sharding.replicated(mesh)), state)
forward = aot_compile.compiler.jit(lambda s, x: nnx.merge(graphdef, s)(x), platform='gpu')
compiled = forward.lower(state, images).compile()
stages = compute.choices(model.compute, model.config, 64, 64, 8)
print('RESULT' + json.dumps({
    'attention': [s['attention'] for s in stages],
    'bytes': hlo.memory_bytes(hlo.parse_ops(compiled.as_text())),
    'temp': compiled.memory_analysis().temp_size_in_bytes}))
'''


@needs_plugin
def test_a_t4_forward_pass_compiles_and_takes_xla_attention():
  """A T4 is sm_75: no cuDNN fused attention, so bf16's 'auto' takes XLA's attention, and says
  why."""
  stdout, _ = _with_plugin(['-c', _T4_FORWARD])
  result = json.loads(stdout.split('RESULT', 1)[1])
  for path, why in result['attention']:
    assert path == 'deferred' and 'sm_80' in why and 'sm_75' in why
  assert result['bytes'] > 0 and result['temp'] > 0


@pytest.mark.slow  # CvT-13's train and eval steps compiled by XLA:GPU: minutes on 2 cores
@needs_plugin
def test_h100_compiles_cvt13s_bf16_train_step_with_cudnn_attention_on_odd_lengths():
  """The trainer's own step (AdamW, Mixup/CutMix, the mesh) in bf16 at 224 px: cuDNN's attention
  in every stage, the cls token's stage (197 queries, 50 keys) padded to even lengths; it fits."""
  stdout, _ = _with_plugin(['-m', 'cvt_flax.aot', '--config', 'configs/imagenet.py:cvt-13,224',
                            '--topology', 'h100', '--config.batch_size=32', '--json'])
  report = json.loads(stdout.strip().splitlines()[-1])
  assert report['fits'] and report['platform'] == 'cuda' and report['eval_hbm_bytes_per_chip']
  assert [s['attention'][0] for s in report['compute']['stages']] == ['cudnn'] * 3
  assert report['train_bytes_per_step_per_chip'] > 0
  assert 0 < report['estimated_mfu'] < 1
