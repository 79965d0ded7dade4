"""Compiles a training config's train and eval steps for a TPU slice or a GPU machine on this
machine's CPU.

The run is resolved by `training.run.build_run` on the slice's devices (compile-only devices made
by libtpu or JAX's CUDA plugin, `jax.experimental.topologies`), so the model's compute paths are
the accelerator's, and the steps are the trainer's own: `training.loop.compile_train_step` and
`runtime.eval_step`.

XLA:GPU without a GPU differs from the program a real GPU runs in one way: it cannot autotune, so
its Triton GEMM fusions are off (`compiler.compiler_options`) and cuBLAS runs every matmul. It
also has no cost analysis; a GPU step's bytes are counted from its HLO (`hlo.memory_bytes`) and
its FLOPs are the model's analytic count (`report.step_costs`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import threading
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
from jax.experimental import topologies
import numpy as np
from ml_collections import ConfigDict

from cvt_flax import accelerators, data, errors, logs
from cvt_flax.aot import hlo
from cvt_flax.aot.gpus import GpuMachine, target_config
from cvt_flax.aot.tpus import Slice
from cvt_flax.errors import ConfigError
from cvt_flax.runtime import compiler, eval_step as eval_step_lib, sharding
from cvt_flax.training import loop, run as run_lib
from cvt_flax.training.steps import model_variables

# Train-split sizes of the datasets the configs name, for when the dataset is not prepared here
# (TFDS's dataset definitions hold the classes but not the split sizes): TFDS's catalog pages.
PUBLISHED_TRAIN_EXAMPLES = {
    ('imagenet2012', 'train'): 1_281_167,
    ('cifar10', 'train'): 50_000,
    ('cifar100', 'train'): 50_000,
    ('oxford_flowers102', 'train+validation'): 2_040,
    ('oxford_iiit_pet', 'train'): 3_680,
}

# What libtpu writes to the terminal when it starts on a machine without TPU chips (nothing is
# wrong: compiling needs no chips).
_LIBTPU_NOISE = ('Failed to find host bounds', 'Logging before InitGoogle', 'TPU_WORKER_HOSTNAMES',
                 '=== Source Location Trace', 'libtpu_init_utils.cc')


@dataclasses.dataclass
class CompiledStep:
  """One compiled step's figures per chip, from XLA's memory and cost analyses (on a GPU, no
  FLOPs and the bytes counted from the HLO)."""
  argument_bytes: int
  output_bytes: int
  alias_bytes: int  # outputs written into donated arguments
  temp_bytes: int
  code_bytes: int
  flops: float
  bytes_accessed: float
  compile_seconds: float
  hlo_text: str
  # XLA:TPU refuses to compile a program that cannot fit: its message, and the temporaries it said
  # were needed (then the other sizes and the costs are unknown, 0).
  out_of_memory: str | None = None

  @functools.cached_property
  def ops(self) -> list[hlo.Op]:
    """The compiled HLO's instructions (parsed once: the text of a CvT-13 step is 13 MB)."""
    return hlo.parse_ops(self.hlo_text)

  def per_chip(self, devices_per_chip: int) -> 'CompiledStep':
    """The figures of one device's program summed over a chip's `devices_per_chip` devices (each
    runs the same SPMD program on its own share of the chip's HBM): TPU7x's two TensorCores."""
    if devices_per_chip == 1:
      return self
    scaled = {f: getattr(self, f) * devices_per_chip
              for f in ('argument_bytes', 'output_bytes', 'alias_bytes', 'temp_bytes', 'code_bytes',
                        'flops', 'bytes_accessed')}
    return dataclasses.replace(self, **scaled)

  @property
  def hbm_bytes(self) -> int:
    """Peak HBM of the step: arguments, outputs net of donation, temporaries and the program
    (for a step XLA refused: the temporaries it asked for, without the rest)."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)


@dataclasses.dataclass
class Compiled:
  slice: Slice | GpuMachine
  run: run_lib.Run
  train: CompiledStep
  eval: CompiledStep | None
  state_bytes_per_chip: int  # parameters, optimizer state, BatchNorm statistics: this chip's shards

  @property
  def per_chip_batch(self) -> int:
    return self.run.config.batch_size // self.slice.num_chips


def slice_devices(tpu_slice: Slice | GpuMachine) -> list:
  """The slice's (or GPU machine's) compile-only devices; a clear error without libtpu or JAX's
  CUDA plugin."""
  if tpu_slice.platform == 'cuda':
    errors.require_installed('gpu-aot', 'jax_cuda12_plugin')
    return topologies.get_topology_desc(platform='cuda', topology=tpu_slice.topology,
                                        target_config=target_config(tpu_slice.gpu)).devices
  errors.require_installed('tpu', 'libtpu')
  if accelerators.tpu_chips() == 0:
    # libtpu takes a machine-wide lock file when it starts, which protects the chips; without
    # chips it only keeps a second compiling process (a test worker, another plan) from starting.
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  with logs.native_stderr_without(*_LIBTPU_NOISE):
    return topologies.get_topology_desc(tpu_slice.topology, 'tpu',
                                        **dict(tpu_slice.topology_kwargs)).devices


def dataset_info(config: ConfigDict, num_train_examples: int | None = None) -> data.DatasetInfo:
  """Classes from TFDS's definition of the dataset; the train-split size from the prepared data,
  `num_train_examples`, or `PUBLISHED_TRAIN_EXAMPLES`."""
  info = data.get_dataset_info_unprepared(config.input)
  size = num_train_examples or info.num_train_examples or PUBLISHED_TRAIN_EXAMPLES.get(
      (config.input.dataset, config.input.train_split))
  if not size and config.num_train_steps <= 0:
    raise ConfigError(f'dataset {config.input.dataset!r} is not prepared here and its '
                      f'{config.input.train_split!r} size is not known to cvt_flax.aot: pass '
                      '--num_train_examples=N, or set --config.num_train_steps.')
  return info._replace(num_train_examples=size or 0)


def _analyse(compiled, seconds: float) -> CompiledStep:
  memory = compiled.memory_analysis()
  cost = compiler.cost_analysis(compiled)
  text = compiled.as_text()
  # XLA:GPU has no cost analysis ('GetCostAnalysis is not supported'): count the HLO's bytes.
  accessed = cost['bytes accessed'] if cost else hlo.memory_bytes(hlo.parse_ops(text))
  return CompiledStep(
      argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
      alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
      code_bytes=memory.generated_code_size_in_bytes, flops=float(cost.get('flops', 0.0)),
      bytes_accessed=float(accessed), compile_seconds=seconds, hlo_text=text)


_REQUIRED = re.compile(r'required for HLO temporaries \(([\d.]+)([KMGT]?)\)')
_UNITS = {'': 1, 'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}


_TICK_SECONDS = 30.0  # how often `progress` hears that a compile goes on


@contextlib.contextmanager
def _reporting(progress: Callable[[str], None] | None, what: str) -> Iterator[None]:
  """Tells `progress` what is compiling, every _TICK_SECONDS that it still is, and how long it took."""
  if progress is None:
    yield
    return
  start, done = time.perf_counter(), threading.Event()
  progress(f'compiling {what} ...')

  def tick():
    while not done.wait(_TICK_SECONDS):
      progress(f'  still compiling {what}: {time.perf_counter() - start:.0f} s')

  ticker = threading.Thread(target=tick, daemon=True)
  ticker.start()
  try:
    yield
  finally:
    done.set()
    ticker.join()
    progress(f'{what}: {time.perf_counter() - start:.1f} s')


def _timed(compile_fn) -> CompiledStep:
  start = time.perf_counter()
  try:
    compiled = compile_fn()
  except jax.errors.JaxRuntimeError as e:
    message = str(e)
    if 'RESOURCE_EXHAUSTED' not in message:
      raise
    required = _REQUIRED.search(message)
    temp = int(float(required[1]) * _UNITS[required[2]]) if required else 0
    return CompiledStep(0, 0, 0, temp, 0, 0.0, 0.0, time.perf_counter() - start, '',
                        out_of_memory=message.strip())
  return _analyse(compiled, time.perf_counter() - start)


def _compile_eval_step(run: run_lib.Run):
  cfg = run.config
  batch = run_lib.eval_batch_size(cfg)
  batch_sh = sharding.batch_sharding(run.mesh)
  size = cfg.input.image_size

  def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh)

  abstract_batch = {'image': spec((batch, size, size, 3), jnp.uint8),
                    'label': spec((batch,), jnp.int32), 'mask': spec((batch,), jnp.float32)}
  step = eval_step_lib.jit_eval_step(run.eval_graphdef, model_variables(run.state_shardings),
                                     run.mesh, mean=cfg.input.mean, std=cfg.input.std)
  return step.lower(model_variables(run.abstract_state), abstract_batch).compile()


def state_bytes_per_device(abstract_state: Any) -> int:
  """Bytes of the train state one device holds: each array's shard (whole if replicated)."""
  return sum(int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(abstract_state))


def compile_for_slice(config: ConfigDict, tpu_slice: Slice | GpuMachine, *,
                      with_eval: bool = True, num_train_examples: int | None = None,
                      progress: Callable[[str], None] | None = None) -> Compiled:
  """Builds the run on the slice's devices and compiles its steps (train, then eval).

  `progress`, if given, hears what is compiling while it does (a line at the start, every 30 s,
  and with the time it took)."""
  devices = slice_devices(tpu_slice)
  run = run_lib.build_run(config, workdir='', devices=devices,
                          dataset=dataset_info(config, num_train_examples))
  per_chip = f'{tpu_slice.name}, {config.batch_size // tpu_slice.num_chips} images per chip'
  with _reporting(progress, f'the train step for {per_chip}'):
    train = _timed(lambda: loop.compile_train_step(run))
  evaluation = None
  if with_eval:
    with _reporting(progress, f'the eval step for {tpu_slice.name}'):
      evaluation = _timed(lambda: _compile_eval_step(run))
  k = tpu_slice.devices_per_chip
  return Compiled(tpu_slice, run, train.per_chip(k), evaluation and evaluation.per_chip(k),
                  k * state_bytes_per_device(run.abstract_state))
