"""The capacity report of a compiled config: HBM per chip and whether it fits, FLOPs and bytes per
step, collectives, and a roofline estimate of the step time.

Roofline: step time = max(FLOPs / peak FLOP/s, bytes accessed / HBM bandwidth), both per chip (a
GPU counts as a chip; its peak for the config's dtype, `gpus`, a TPU's bf16 peak); on a TPU both
from XLA:TPU's cost analysis, on a GPU the bytes counted from the HLO and the FLOPs the model's
analytic count. MFU = the model's analytic training FLOPs
(3x the forward multiply-adds, 2 FLOPs each: `cvt_flax.flops`) over that time at peak. An
estimate from the compiler, not a measurement: it ignores overlap limits, collectives' time, and
a GPU's program was compiled without autotuning (`aot.compile`). A chip of several JAX devices
(TPU7x: two TensorCores, a device each) counts its devices' programs together
(`CompiledStep.per_chip`).

The hosts: given the train input pipeline's images/s per vCPU (measured on this machine's CPU with
`--measure_host`, or `--host_images_per_sec_per_cpu`), the hosts deliver that times their vCPUs
(`tpus`, `gpus`); the estimated images/s is the lower of the chips' and the hosts', and `bound`
says 'host' when the hosts set it. A rate from another CPU than the hosts' is an approximation.
"""
from __future__ import annotations

import dataclasses

from cvt_flax import flops as flops_lib
from cvt_flax.aot import hlo
from cvt_flax.aot.compile import Compiled, CompiledStep
from cvt_flax.aot.tpus import GiB
from cvt_flax.training import run as run_lib

TRAIN_FLOPS_PER_MAC = 6  # forward 2 FLOPs per multiply-add, backward twice the forward
_COMPILER = {'tpu': 'libtpu', 'cuda': 'XLA:GPU (deviceless, no autotuning)'}


@dataclasses.dataclass
class Estimate:
  step_seconds: float
  bound: str  # 'compute' | 'memory' | 'host'
  images_per_sec_per_chip: float
  mfu: float
  schedule_days: float
  host_images_per_sec: float | None = None  # what the slice's hosts deliver, all together


def step_costs(compiled: Compiled) -> tuple[float, float]:
  """(FLOPs, bytes accessed) of one train step per chip. With grad_accum_steps = A the step is a
  loop over A microbatches, whose body XLA's cost analysis counts once: its figures are scaled by A
  (the optimizer update outside the loop is then counted A times, a small overestimate). Without
  XLA's FLOPs (a GPU), the model's analytic count."""
  loops = compiled.run.config.grad_accum_steps
  flops = compiled.train.flops * loops or model_train_flops_per_chip(compiled)
  return flops, compiled.train.bytes_accessed * loops


def counted_bytes(compiled: Compiled) -> float:
  """The train step's bytes per chip counted from its HLO (`hlo.memory_bytes`: every op's
  operands plus its result, a Pallas kernel's as it is handed them), scaled as `step_costs`
  scales XLA's: on a TPU a count independent of XLA's cost model and of the kernels' declared
  costs; on a GPU the same figure as `step_costs`' bytes."""
  loops = compiled.run.config.grad_accum_steps
  return hlo.memory_bytes(compiled.train.ops) * compiled.slice.devices_per_chip * loops


def model_train_flops_per_chip(compiled: Compiled) -> float:
  cfg = compiled.run.model_config
  macs = flops_lib.analytic_macs(cfg, compiled.run.config.input.image_size)['total']
  return TRAIN_FLOPS_PER_MAC * macs * compiled.per_chip_batch


def host_images_per_sec(compiled: Compiled, per_cpu: float | None) -> float | None:
  """What the slice's hosts deliver at `per_cpu` images/s per vCPU (None: not known)."""
  if per_cpu is None:
    return None
  return per_cpu * compiled.slice.host_vcpus * compiled.slice.num_hosts


def estimate(compiled: Compiled, host_per_cpu: float | None = None) -> Estimate | None:
  """The roofline estimate of the train step, bounded by the hosts' input pipelines if
  `host_per_cpu` (images/s per vCPU) is given; None if XLA refused to compile the step."""
  chip, train = compiled.slice.chip, compiled.train
  if train.out_of_memory:
    return None
  flops, bytes_accessed = step_costs(compiled)
  peak = compiled.slice.peak_flops(compiled.run.config.dtype)
  compute_s = flops / peak
  memory_s = bytes_accessed / chip.hbm_bytes_per_s
  step = max(compute_s, memory_s)
  bound = 'compute' if compute_s >= memory_s else 'memory'
  hosts = host_images_per_sec(compiled, host_per_cpu)
  if hosts is not None and hosts / compiled.slice.num_chips < compiled.per_chip_batch / step:
    step, bound = compiled.per_chip_batch * compiled.slice.num_chips / hosts, 'host'
  mfu = model_train_flops_per_chip(compiled) / (step * peak)
  return Estimate(step, bound, compiled.per_chip_batch / step, mfu,
                  compiled.run.total_steps * step / 86400, hosts)


def hbm_needed(compiled: Compiled, step: CompiledStep) -> int:
  """A step's HBM per chip; for one XLA refused, the train state plus the temporaries it asked
  for (a lower bound)."""
  if step.out_of_memory:
    return compiled.state_bytes_per_chip + step.temp_bytes
  return step.hbm_bytes


def _steps(compiled: Compiled) -> list[CompiledStep]:
  return [compiled.train] + ([compiled.eval] if compiled.eval else [])


def fits(compiled: Compiled) -> bool:
  return all(not s.out_of_memory and s.hbm_bytes <= compiled.slice.chip.hbm_bytes
             for s in _steps(compiled))


def _gib(n: float) -> str:
  return f'{n / GiB:.2f} GiB'


def _halvings_to_fit(temp_bytes: int, room: int, limit: int) -> int:
  """The power of 2 (at most `limit`) by which temporaries must shrink to fit in `room`, taking
  them as proportional to the batch (about right: activations dominate)."""
  factor = 2
  while factor < limit and temp_bytes / factor > room:
    factor *= 2
  return factor


def advice(compiled: Compiled) -> str:
  """The one message for a run that does not fit: what takes the memory, what to change."""
  cfg, chip = compiled.run.config, compiled.slice.chip
  step = max(_steps(compiled), key=lambda s: hbm_needed(compiled, s))
  which = 'train' if step is compiled.train else 'eval'
  needed = hbm_needed(compiled, step)
  room = chip.hbm_bytes - (needed - step.temp_bytes)
  micro = compiled.per_chip_batch // cfg.grad_accum_steps
  factor = _halvings_to_fit(step.temp_bytes, room, max(micro, 1))
  fixes = []
  if which == 'train' and not cfg.fsdp:
    fixes.append('--config.fsdp=True (shards parameters and optimizer state over the chips)')
  if which == 'train' and cfg.remat == 'none':
    fixes.append('--config.remat=block (keeps one activation per block)')
  if which == 'train' and micro > 1:
    fixes.append(f'--config.grad_accum_steps={factor * cfg.grad_accum_steps} (the same global '
                 f'batch in microbatches of {max(micro // factor, 1)} images per chip: '
                 f'activations shrink about {factor}x) or a smaller --config.batch_size')
  if which == 'eval':
    eval_batch = run_lib.eval_batch_size(cfg)
    fixes.append(f'--config.eval_batch_size={max(eval_batch // factor, compiled.slice.num_chips)}')
  compiler = f' XLA:TPU said: {step.out_of_memory}' if step.out_of_memory else ''
  return (f'does not fit: the {which} step needs {"at least " if step.out_of_memory else ""}'
          f'{_gib(needed)} per chip, {_gib(needed - chip.hbm_bytes)} more than the '
          f'{_gib(chip.hbm_bytes)} of a {chip.name}. Parameters, optimizer state and BatchNorm '
          f'statistics take {_gib(compiled.state_bytes_per_chip)}; activations and temporaries '
          f'{_gib(step.temp_bytes)}. Try: ' + '; '.join(fixes) + '.' + compiler)


def to_json(compiled: Compiled, host_per_cpu: float | None = None) -> dict:
  """The report as a dict; `host_per_cpu`: the train pipeline's images/s per host vCPU."""
  est, train, sl = estimate(compiled, host_per_cpu), compiled.train, compiled.slice
  flops, bytes_accessed = step_costs(compiled)
  out = {
      'topology': sl.name, 'platform': sl.platform, 'platform_topology': sl.topology,
      'chips': sl.num_chips, 'devices_per_chip': sl.devices_per_chip,
      'chip': sl.chip.name, 'per_chip_batch': compiled.per_chip_batch,
      'dtype': compiled.run.config.dtype, 'fsdp': compiled.run.config.fsdp,
      'remat': compiled.run.config.remat,
      'fits': fits(compiled), 'hbm_bytes_per_chip': hbm_needed(compiled, train),
      'hbm_capacity_bytes': sl.chip.hbm_bytes,
      'param_and_opt_bytes_per_chip': compiled.state_bytes_per_chip,
      'train_argument_bytes': train.argument_bytes, 'train_output_bytes': train.output_bytes,
      'train_alias_bytes': train.alias_bytes, 'train_temp_bytes': train.temp_bytes,
      'train_code_bytes': train.code_bytes, 'train_out_of_memory': train.out_of_memory,
      'train_flops_per_step_per_chip': flops,
      'train_bytes_per_step_per_chip': bytes_accessed,
      'train_bytes_counted_from_hlo_per_chip': counted_bytes(compiled) if train.hlo_text else None,
      'grad_accum_steps': compiled.run.config.grad_accum_steps,
      'model_train_flops_per_step_per_chip': model_train_flops_per_chip(compiled),
      'estimated_step_seconds': est and est.step_seconds, 'bound': est and est.bound,
      'estimated_images_per_sec': est and est.images_per_sec_per_chip * sl.num_chips,
      'estimated_images_per_sec_per_chip': est and est.images_per_sec_per_chip,
      'estimated_mfu': est and est.mfu, 'estimated_schedule_days': est and est.schedule_days,
      'hosts': sl.num_hosts, 'host_vcpus': sl.host_vcpus,
      'host_images_per_sec_per_cpu': host_per_cpu,
      'host_images_per_sec': host_images_per_sec(compiled, host_per_cpu),
      'total_steps': compiled.run.total_steps,
      'compile_seconds': sum(s.compile_seconds for s in _steps(compiled)),
      'collectives': {c.kind: {'count': c.count, 'bytes': c.bytes}
                      for c in hlo.collectives(train.ops)},
  }
  if compiled.eval:
    out['eval_hbm_bytes_per_chip'] = hbm_needed(compiled, compiled.eval)
  return out


def to_text(compiled: Compiled, host_per_cpu: float | None = None) -> str:
  """The human-readable report (per chip)."""
  j, sl, train = to_json(compiled, host_per_cpu), compiled.slice, compiled.train
  cfg = compiled.run.config
  lines = [
      f'{sl.name} ({sl.num_chips} x {sl.chip.name}'
      + (f' of {sl.devices_per_chip} devices each' if sl.devices_per_chip > 1 else '')
      + f', {_COMPILER[sl.platform]} topology '
      f'{sl.topology}, {sl.num_hosts} host(s)); global batch {cfg.batch_size} = '
      f'{compiled.per_chip_batch} per chip; fsdp={cfg.fsdp}, remat={cfg.remat}, '
      f'grad_accum_steps={cfg.grad_accum_steps}, dtype={cfg.dtype}',
      f'compile (this CPU): train {train.compile_seconds:.0f}s'
      + (f', eval {compiled.eval.compile_seconds:.0f}s' if compiled.eval else ''),
      f'parameters + optimizer state + BatchNorm statistics per chip: '
      f'{_gib(compiled.state_bytes_per_chip)}',
  ]
  if not train.out_of_memory:
    lines.append(
        f'HBM per chip (train step): arguments {_gib(train.argument_bytes)}, outputs '
        f'{_gib(train.output_bytes)} ({_gib(train.alias_bytes)} of them in donated buffers), '
        f'temporaries {_gib(train.temp_bytes)}, program {_gib(train.code_bytes)}: total '
        f'{_gib(train.hbm_bytes)} of {_gib(sl.chip.hbm_bytes)}')
  if compiled.eval and not compiled.eval.out_of_memory:
    lines.append(f'HBM per chip (eval step): {_gib(compiled.eval.hbm_bytes)}')
  lines.append(f'fits: yes, {_gib(sl.chip.hbm_bytes - train.hbm_bytes)} to spare' if j['fits']
               else f'fits: NO, {advice(compiled)}')
  est = estimate(compiled, host_per_cpu)
  if est is None:
    return '\n'.join(lines)
  colls = ', '.join(f'{kind} x{c["count"]} ({c["bytes"] / 1e6:.1f} MB)'
                    for kind, c in j['collectives'].items()) or 'none'
  lines += [
      f'per step and chip: {j["train_flops_per_step_per_chip"] / 1e12:.3f} TFLOP (model: '
      f'{j["model_train_flops_per_step_per_chip"] / 1e12:.3f}), '
      f'{j["train_bytes_per_step_per_chip"] / 1e9:.1f} GB accessed'
      + (f' (the accumulation loop\'s body x{cfg.grad_accum_steps})'
         if cfg.grad_accum_steps > 1 else '')
      + (f'; counted from the HLO: {j["train_bytes_counted_from_hlo_per_chip"] / 1e9:.1f} GB'
         if sl.platform == 'tpu' and j['train_bytes_counted_from_hlo_per_chip'] else ''),
      f'collectives (train step, a loop body once): {colls}',
      f'roofline estimate (not a measurement): {est.step_seconds * 1e3:.1f} ms per step, '
      f'{est.bound}-bound; {est.images_per_sec_per_chip:.0f} images/s per chip, '
      f'{j["estimated_images_per_sec"]:.0f} on the slice; MFU {est.mfu:.1%}; '
      f'{compiled.run.total_steps} steps = {est.schedule_days * 24:.1f} hours',
      _host_line(j)]
  return '\n'.join(lines)


def _host_line(j: dict) -> str:
  vcpus = f'{j["hosts"]} host(s) of {j["host_vcpus"]} vCPUs'
  if j['host_images_per_sec'] is None:
    return (f'hosts: {vcpus}; their input pipelines not estimated (--measure_host or '
            '--host_images_per_sec_per_cpu)')
  return (f'hosts: {vcpus} at {j["host_images_per_sec_per_cpu"]:.0f} images/s per vCPU deliver '
          f'{j["host_images_per_sec"]:.0f} images/s'
          + ('; they bound the step' if j['bound'] == 'host' else ''))


def costs_text(compiled: Compiled, n: int) -> str:
  """The train step's n costliest sources by XLA:TPU's estimated cycles (XLA:GPU writes none), then
  by bytes, and its layout changes (a Markdown table each; `hlo` says how they are counted)."""
  ops = compiled.train.ops
  total_cycles = sum(op.cycles for op in ops) or 1
  rankings = (('estimated cycles', 2),) if total_cycles > 1 else ()
  lines = []
  for title, key in rankings + (('bytes (operands + result)', 3),):
    lines += [f'top {n} by {title}:', '| op: source | ops | share of cycles | GB |',
              '|---|---:|---:|---:|']
    for source, count, cycles, size in hlo.top_costs(ops, n, by=key):
      # A kernel has no cycle estimate in the HLO (its declared cost is in the totals above).
      share = f'{cycles / total_cycles:.1%}' if cycles else '-'
      lines.append(f'| {source} | {count} | {share} | {size / 1e9:.2f} |')
  kernels = hlo.kernel_calls(ops)
  if kernels:
    lines += ["Pallas kernels (one device's program): declared bytes against their operands and "
              'results', '| kernel: source | calls | declared GB | operands + results GB |',
              '|---|---:|---:|---:|']
    lines += [f'| {k.source} | {k.calls} | {k.declared_bytes / 1e9:.2f} | '
              f'{k.operand_and_result_bytes / 1e9:.2f} |' for k in kernels]
  moves, cycles, size = hlo.layout_changes(ops)
  lines.append(f'layout changes (copies, transposes): {moves} ops, {cycles / total_cycles:.1%} of '
               f'the cycles, {size / 1e9:.2f} GB')
  return '\n'.join(lines)
