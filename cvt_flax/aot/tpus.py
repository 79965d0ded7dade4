"""TPU slices as users name them (`v5e-16`), what libtpu calls their topology, and each chip's
public figures.

Slice names follow Cloud TPU's accelerator types: for v4, v5p and TPU7x (Ironwood) the number
counts TensorCores, two per chip; for v5e and v6e it counts chips (one core each). On v4 and v5p
a chip's two cores are one 'megacore' JAX device; on TPU7x each core is a JAX device of its own
(`Slice.devices_per_chip`), so `tpu7x-8` is 4 chips, 8 devices (libtpu's 'tpu7x:2x2x1').
Single-host slices hold up to 4 chips (v4, v5p, TPU7x) or 8 chips (v5e, v6e); larger slices have
4 chips per host.

Each host's vCPUs (which decode and augment the images) are those of the TPU VM machine types in
GKE's TPU planning page (https://cloud.google.com/kubernetes-engine/docs/concepts/plan-tpus,
"machine type" tables): v4 ct4p-hightpu-4t 240; v5e ct5lp-hightpu-1t/4t/8t 24/112/224; v5p
ct5p-hightpu-4t 208; v6e ct6e-standard-1t/4t/8t 44/180/180. The TPU7x page's table
(https://cloud.google.com/tpu/docs/tpu7x, "Number of vCPUs (4-chip VM)") gives 224 for TPU7x and
repeats v5p's 208 and v6e's 180.
"""
from __future__ import annotations

import dataclasses
import math

from cvt_flax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip's public figures (per chip, not per TensorCore)."""
  name: str
  peak_bf16_flops: float  # FLOP/s, dense bf16 matmul
  hbm_bytes: int
  hbm_bytes_per_s: float
  source: str


GiB = 2 ** 30

# From each generation's Cloud TPU system-architecture page ("Key specifications"): peak bf16
# compute, HBM capacity and HBM bandwidth per chip.
CHIPS = {
    'v4': Chip('TPU v4', 275e12, 32 * GiB, 1200e9, 'https://cloud.google.com/tpu/docs/v4'),
    'v5e': Chip('TPU v5e', 197e12, 16 * GiB, 819e9, 'https://cloud.google.com/tpu/docs/v5e'),
    'v5p': Chip('TPU v5p', 459e12, 95 * GiB, 2765e9, 'https://cloud.google.com/tpu/docs/v5p'),
    'v6e': Chip('TPU v6e', 918e12, 32 * GiB, 1638e9, 'https://cloud.google.com/tpu/docs/v6e'),
    'tpu7x': Chip('TPU7x', 2307e12, 192 * GiB, 7380e9, 'https://cloud.google.com/tpu/docs/tpu7x'),
}
_CORES_PER_CHIP = {'v4': 2, 'v5p': 2, 'v5e': 1, 'v6e': 1, 'tpu7x': 2}  # what the slice name counts
_MEGACORE = ('v4', 'v5p')  # the chip's two cores are one device; TPU7x's are two
_SINGLE_HOST_CHIPS = {'v4': 4, 'v5p': 4, 'v5e': 8, 'v6e': 8, 'tpu7x': 4}
_CHIPS_PER_HOST = 4  # in multi-host slices of every generation
_MAX_CHIPS = {'v4': 4096, 'v5p': 8960, 'v5e': 256, 'v6e': 256, 'tpu7x': 9216}
# vCPUs of one host by the chips it holds (multi-host slices: 4 chips per host).
_HOST_VCPUS = {'v4': {4: 240}, 'v5p': {4: 208}, 'v5e': {1: 24, 4: 112, 8: 224},
               'v6e': {1: 44, 4: 180, 8: 180}, 'tpu7x': {4: 224}}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice: its name, its chip, and the arguments of `get_topology_desc` that describe it."""
  name: str
  generation: str
  num_chips: int
  topology: str  # libtpu's name, e.g. 'v5e:4x4'
  topology_kwargs: tuple[tuple[str, object], ...]
  platform = 'tpu'

  @property
  def chip(self) -> Chip:
    return CHIPS[self.generation]

  def peak_flops(self, dtype: str) -> float:  # pylint: disable=unused-argument
    """A TPU's float32 matmuls run as bf16 passes on its MXUs: its bf16 peak for any dtype."""
    return self.chip.peak_bf16_flops

  @property
  def devices_per_chip(self) -> int:
    """JAX devices per chip: 2 on TPU7x (each TensorCore), 1 elsewhere (one core, or megacore)."""
    return 1 if self.generation in _MEGACORE else _CORES_PER_CHIP[self.generation]

  @property
  def num_devices(self) -> int:
    return self.num_chips * self.devices_per_chip

  @property
  def num_hosts(self) -> int:
    if self.num_chips <= _SINGLE_HOST_CHIPS[self.generation]:
      return 1
    return self.num_chips // _CHIPS_PER_HOST

  @property
  def host_vcpus(self) -> int:
    """vCPUs of each host (a slice of 2 chips runs on the 4-chip machine type)."""
    per_host = self.num_chips // self.num_hosts
    by_chips = _HOST_VCPUS[self.generation]
    return by_chips[min(c for c in by_chips if c >= per_host)]


def _grid_2d(chips: int) -> tuple[int, int]:
  """v5e/v6e: the most square a x b = chips with a <= b (Cloud TPU's shapes: 2x4, 4x8, 16x16)."""
  a = 2 ** (int(math.log2(chips)) // 2)
  return a, chips // a


def _grid_3d(chips: int) -> tuple[int, int, int]:
  """v4/v5p: 2x2x1 for 4 chips, then the most cube-like shape: 2x2x2, 2x2x4, 2x4x4, 4x4x4, ..."""
  if chips == 4:
    return 2, 2, 1
  dims = [2, 2, 1]
  order = (2, 1, 0)
  i = 0
  while math.prod(dims) < chips:
    dims[order[i % 3]] *= 2
    i += 1
  return tuple(sorted(dims))  # Cloud TPU writes the smallest dimension first: 2x2x2, 4x4x8


def parse_slice(name: str) -> Slice:
  """'v5e-16' -> Slice(v5e, 16 chips, 'v5e:4x4'); raises ConfigError naming the valid forms."""
  generation, _, count = name.partition('-')
  if generation not in CHIPS or not count.isdigit():
    raise ConfigError(f'--topology={name!r}: expected <generation>-<size> with generation one of '
                      f'{sorted(CHIPS)}, e.g. v5e-8 or v4-32 (--topology=help lists them).')
  cores = int(count)
  chips = cores // _CORES_PER_CHIP[generation]
  valid = (cores % _CORES_PER_CHIP[generation] == 0 and chips >= 1 and chips & (chips - 1) == 0
           and chips <= _MAX_CHIPS[generation])
  if not valid or (_CORES_PER_CHIP[generation] == 2 and chips < 4):
    raise ConfigError(f'--topology={name!r} is not a {generation} slice size; '
                      f'valid: {", ".join(slice_names(generation))}.')
  if generation in ('v5e', 'v6e'):
    a, b = _grid_2d(chips)
    topology = f'{generation}:{a}x{b}'
    per_host = (a, b, 1) if chips <= _SINGLE_HOST_CHIPS[generation] else (2, 2, 1)  # 4 chips
    kwargs = (('chips_per_host_bounds', per_host),)
  else:
    topology = f'{generation}:' + 'x'.join(map(str, _grid_3d(chips)))
    kwargs = (('chips_per_host_bounds', (2, 2, 1)),)
    if generation in _MEGACORE:
      kwargs = (('chip_config_name', 'megacore'),) + kwargs
  return Slice(name, generation, chips, topology, kwargs)


def slice_names(generation: str | None = None) -> list[str]:
  """Every supported slice name (of one generation)."""
  names = []
  for gen in [generation] if generation else CHIPS:
    chips = 1 if _CORES_PER_CHIP[gen] == 1 else 4
    while chips <= _MAX_CHIPS[gen]:
      names.append(f'{gen}-{chips * _CORES_PER_CHIP[gen]}')
      chips *= 2
  return names


def describe_slices() -> str:
  """The `--topology=help` text: one line per generation."""
  lines = []
  for gen, chip in CHIPS.items():
    lines.append(f'{gen}: {", ".join(slice_names(gen))}\n    {chip.name}: '
                 f'{chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bytes / GiB:.0f} GiB '
                 f'HBM at {chip.hbm_bytes_per_s / 1e9:.0f} GB/s per chip ({chip.source})')
  return '\n'.join(lines)
