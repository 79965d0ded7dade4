"""NVIDIA GPU machines as `python -m cvt_flax.aot --topology` names them (`h100-8`, `t4`), each
GPU's public figures, and the target description XLA:GPU compiles for without a GPU.

A deviceless compile needs JAX's CUDA plugin (`pip install 'cvt-flax[gpu-aot]'`) and a
description of the GPU: XLA's `GpuTargetConfigProto` in text form, which
`jax.experimental.topologies.get_topology_desc(platform='cuda', target_config=...)` takes.
`target_config` writes it from the table below. Its figures for the data-centre GPUs are those of
XLA's own specs (openxla/xla, `xla/backends/gpu/target_config/specs/`: h100_sxm, h200,
a100_sxm_80, a100_sxm_40, b200); XLA has none for the T4 and L4, whose figures come from NVIDIA's
public documents (the Turing and Ada architecture whitepapers, the T4 and L4 datasheets) and from
what CUDA reports on Colab (memory). Only the fields that this jax's proto knows are written.

The host's vCPUs per GPU are those of Compute Engine's GPU machine types
(https://cloud.google.com/compute/docs/gpus, "accelerator-optimized machine family"): 8-GPU
a3-highgpu-8g (H100) 208 vCPUs, a3-ultragpu-8g (H200) 224, a2-ultragpu-8g and a2-highgpu-8g (A100
80GB, 40GB) 96, a4-highgpu-8g (B200) 224, g2-standard-96 (8 L4) 96, divided by 8; a T4 alone is
Colab's runtime, 2 vCPUs.

Peak FLOP/s and memory bandwidth are NVIDIA's datasheet figures (dense, without sparsity): bf16
tensor cores, and for float32 the TF32 tensor cores that XLA:GPU uses for float32 matmuls by
default from Ampere on. A T4 (Turing) has neither: it has fp16 tensor cores (65 TFLOP/s), and
XLA runs bf16 and float32 matmuls there at its float32 rate (8.1 TFLOP/s), which is what the
estimates take for it.
"""
from __future__ import annotations

import dataclasses

from cvt_flax.aot.tpus import Chip, GiB
from cvt_flax.errors import ConfigError

MiB = 2 ** 20


@dataclasses.dataclass(frozen=True)
class Gpu:
  """One GPU model: its public figures (the chip's memory as CUDA reports it, a little less than
  the marketed size) and what XLA:GPU's target description needs."""
  chip: Chip
  compute_capability: tuple[int, int]
  sms: int
  fp32_units_per_sm: int
  shared_memory_per_sm: int
  shared_memory_per_block_optin: int
  threads_per_sm: int
  l2_bytes: int
  clock_ghz: float
  peak_float32_flops: float  # float32 matmuls: TF32 tensor cores (Ampere on), else FP32 units
  host_vcpus_per_gpu: int  # the host's vCPUs per GPU (module docstring)

  def peak_flops(self, dtype: str) -> float:
    """Peak matmul FLOP/s for a program in `dtype`: bf16 on its tensor cores where it has them."""
    has_bf16 = self.compute_capability >= (8, 0)
    return self.chip.peak_bf16_flops if dtype == 'bfloat16' and has_bf16 else (
        self.peak_float32_flops)


_DATASHEETS = 'https://www.nvidia.com/en-us/data-center/'
_H100 = Gpu(Chip('NVIDIA H100 SXM 80GB', 989e12, 84_942_979_072, 3352e9, _DATASHEETS + 'h100/'),
            (9, 0), 132, 128, 233472, 232448, 2048, 50 * MiB, 1.98, 495e12, 208 // 8)
_A100 = Gpu(Chip('NVIDIA A100 SXM 80GB', 312e12, 85_100_068_864, 2039e9, _DATASHEETS + 'a100/'),
            (8, 0), 108, 64, 167936, 166912, 2048, 40 * MiB, 1.41, 156e12, 96 // 8)


def _with_memory(gpu: Gpu, name: str, memory_bytes: int, bytes_per_s: float, source: str,
                 host_vcpus_per_gpu: int) -> Gpu:
  """`gpu`'s chip with other memory (an H200 is an H100 with more and faster HBM), in another
  machine type."""
  chip = dataclasses.replace(gpu.chip, name=name, hbm_bytes=memory_bytes,
                             hbm_bytes_per_s=bytes_per_s, source=source)
  return dataclasses.replace(gpu, chip=chip, host_vcpus_per_gpu=host_vcpus_per_gpu)


GPUS = {
    'h100': _H100,
    'h200': _with_memory(_H100, 'NVIDIA H200 SXM 141GB', 151_397_597_184, 4800e9,
                         _DATASHEETS + 'h200/', 224 // 8),
    'a100-80': _A100,
    'a100-40': _with_memory(_A100, 'NVIDIA A100 SXM 40GB', 42_331_013_120, 1555e9,
                            _DATASHEETS + 'a100/', 96 // 8),
    'b200': Gpu(Chip('NVIDIA B200 180GB', 2250e12, 191_514_411_008, 7672e9,
                     _DATASHEETS + 'dgx-b200/'), (10, 0), 148, 128, 233472, 232448, 2048,
                126.5 * MiB, 1.965, 1100e12, 224 // 8),
    # Colab's smaller GPUs. Memory: what nvidia-smi reports there.
    't4': Gpu(Chip('NVIDIA T4 16GB', 65e12, 15360 * MiB, 320e9, _DATASHEETS + 'tesla-t4/'),
              (7, 5), 40, 64, 65536, 65536, 1024, 4 * MiB, 1.59, 8.1e12, 2),
    'l4': Gpu(Chip('NVIDIA L4 24GB', 121e12, 23034 * MiB, 300e9, _DATASHEETS + 'l4/'),
              (8, 9), 58, 128, 102400, 101376, 1536, 48 * MiB, 2.04, 60e12, 96 // 8),
}
# The machines a name may give: 8-GPU servers (HGX/DGX, one host) and single GPUs.
_COUNTS = (1, 8)


@dataclasses.dataclass(frozen=True)
class GpuMachine:
  """`count` GPUs of one model in one host: what `cvt_flax.aot` compiles for, like a TPU slice."""
  name: str
  model: str
  num_chips: int
  platform = 'cuda'
  num_hosts = 1
  devices_per_chip = 1

  @property
  def gpu(self) -> Gpu:
    return GPUS[self.model]

  @property
  def chip(self) -> Chip:
    return self.gpu.chip

  def peak_flops(self, dtype: str) -> float:
    return self.gpu.peak_flops(dtype)

  @property
  def host_vcpus(self) -> int:
    return self.gpu.host_vcpus_per_gpu * self.num_chips

  @property
  def topology(self) -> str:
    """The topology `get_topology_desc` takes: hosts x ... x GPUs."""
    return f'1x1x{self.num_chips}'


def is_gpu_name(name: str) -> bool:
  return name.partition('-')[0] in {m.partition('-')[0] for m in GPUS}


def parse_machine(name: str) -> GpuMachine:
  """'h100-8' -> 8 H100s; 't4' or 'h100' -> one; 'a100-80-8' -> 8 A100 80GB. A ConfigError names
  the valid forms."""
  model, count = name, 1
  head, _, tail = name.rpartition('-')
  if head in GPUS and tail.isdigit():
    model, count = head, int(tail)
  if model not in GPUS or count not in _COUNTS:
    raise ConfigError(f'--topology={name!r}: expected a GPU model ({", ".join(GPUS)}) alone or '
                      f'with -8 for an 8-GPU server, e.g. h100-8 or a100-80-8 (--topology=help '
                      'lists them).')
  return GpuMachine(name, model, count)


def describe_machines() -> str:
  """The GPU lines of `--topology=help`."""
  return '\n'.join(
      f'{m}: {m}, {m}-8\n    {g.chip.name} (sm_{"".join(map(str, g.compute_capability))}): '
      f'{g.peak_flops("bfloat16") / 1e12:.0f} TFLOP/s bf16, '
      f'{g.peak_flops("float32") / 1e12:.0f} float32, {g.chip.hbm_bytes / GiB:.0f} GiB at '
      f'{g.chip.hbm_bytes_per_s / 1e9:.0f} GB/s ({g.chip.source})' for m, g in GPUS.items())


def target_config(gpu: Gpu) -> str:
  """XLA's GpuTargetConfigProto for `gpu`, as text."""
  major, minor = gpu.compute_capability
  return f'''gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {gpu.shared_memory_per_sm}
  threads_per_core_limit: {gpu.threads_per_sm}
  core_count: {gpu.sms}
  fpus_per_core: {gpu.fp32_units_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(gpu.chip.hbm_bytes_per_s)}
  l2_cache_size: {int(gpu.l2_bytes)}
  clock_rate_ghz: {gpu.clock_ghz}
  device_memory_size: {gpu.chip.hbm_bytes}
  shared_memory_per_block_optin: {gpu.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
device_description_str: "{gpu.chip.name}"
'''
