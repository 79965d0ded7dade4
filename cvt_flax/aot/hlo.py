"""What XLA made of a step, read from the compiled HLO text: collectives, the costliest ops, and
(for XLA:GPU, which has no cost analysis) the bytes the step moves.

XLA:TPU writes its own cost model's estimate into each fusion's backend config
(`"estimated_cycles"`); the top costs are ranked by it. Bytes are each op's operands plus its
result, as HLO shapes give them (what an op reads and writes in HBM if nothing stays on chip). Ops
inside a loop body count once, not once per iteration.
"""
from __future__ import annotations

import collections
import dataclasses
import re

_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 's16': 2, 'u16': 2,
                'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8,
                'c64': 8, 'c128': 16}
_ARRAY = re.compile(r'\b(' + '|'.join(_DTYPE_BYTES) + r')\[([\d,]*)\]')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+) = (?P<type>.*?) '
                          r'(?P<op>[a-z][\w\-]*)\((?P<args>[^)]*)\)(?P<attrs>.*)$')
_OPERAND = re.compile(r'%([\w.\-]+)')  # an instruction's operand names
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r'calls=%([\w.\-]+)')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_DECLARED_BYTES = re.compile(r'"cost_estimate":\{[^}]*"bytes_accessed":"(\d+)"')
# Custom calls that are kernels doing the step's work: Pallas's (Mosaic) on a TPU, cuBLAS's and
# cuDNN's on a GPU. Others (sharding annotations, buffer allocations) move nothing.
KERNEL_TARGETS = ('tpu_custom_call', '__cublas', '__cudnn')
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')


def array_bytes(hlo_type: str) -> list[int]:
  """Bytes of each array in an HLO type ('f32[8,64]{1,0}' or a tuple of them)."""
  sizes = []
  for dtype, dims in _ARRAY.findall(hlo_type):
    count = 1
    for d in filter(None, dims.split(',')):
      count *= int(d)
    sizes.append(count * _DTYPE_BYTES[dtype])
  return sizes


@dataclasses.dataclass
class Op:
  name: str
  opcode: str
  result_bytes: int
  operand_bytes: int
  cycles: int
  source: str  # the JAX op it came from (metadata op_name), shortened
  fused: str   # the fused computation it calls ('' if none)
  target: str = ''  # a custom call's target: 'tpu_custom_call' (Pallas), '__cublas$...', ...
  declared_bytes: int = 0  # a Pallas kernel's own cost estimate (`pl.CostEstimate`), if it has one

  @property
  def bytes(self) -> int:
    return self.result_bytes + self.operand_bytes


def _short_source(op_name: str) -> str:
  """'jit(train_step)/jvp(conv_proj)/reduce_sum' -> 'jvp(conv_proj)/reduce_sum'."""
  parts = [p for p in op_name.split('/') if not p.startswith('jit(train_step)')
           and not p.startswith('jit(eval_step)')]
  return '/'.join(parts[-4:])


def parse_ops(hlo_text: str) -> list[Op]:
  """Every instruction outside fused computations (operands' sizes looked up across all). An
  array handed to an op more than once, itself or through bitcasts (a kernel's block and its halo
  rows), counts once among its operands."""
  result_bytes: dict[str, int] = {}
  viewed: dict[str, str] = {}  # a bitcast -> the array it views
  lines = []
  in_fused = False
  for line in hlo_text.splitlines():
    if line and not line.startswith(' '):  # a computation header or its closing brace
      header = line.lstrip('%').split(' ', 1)[0]
      in_fused = 'fused' in header or header.startswith('wrapped_')
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    result_bytes[match['name']] = sum(array_bytes(match['type']))
    if match['op'] == 'bitcast':
      viewed[match['name']] = _OPERAND.findall(match['args'])[0]
    if not in_fused:
      lines.append(match)
  ops = []
  for m in lines:
    operands = {}
    for name in _OPERAND.findall(m['args']):
      operands.setdefault(_viewed_array(name, viewed), name)
    cycles = _CYCLES.search(m['attrs'])
    source = _OP_NAME.search(m['attrs'])
    calls = _CALLS.search(m['attrs'])
    target = _TARGET.search(m['attrs'])
    declared = _DECLARED_BYTES.search(m['attrs'])
    ops.append(Op(m['name'], m['op'], result_bytes[m['name']],
                  sum(result_bytes.get(o, 0) for o in operands.values()),
                  int(cycles[1]) if cycles else 0,
                  _short_source(source[1]) if source else '', calls[1] if calls else '',
                  target[1] if target else '', int(declared[1]) if declared else 0))
  return ops


def _viewed_array(name: str, viewed: dict[str, str]) -> str:
  while name in viewed:
    name = viewed[name]
  return name


# Instructions that move no memory of their own: views, tuples, control flow around computations
# whose ops are counted, and the second half of an async pair (its `-start` is counted).
_NO_TRAFFIC = ('parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant', 'after-all',
               'partition-id', 'replica-id', 'while', 'call', 'conditional', 'opt-barrier')


def memory_bytes(ops: list[Op]) -> int:
  """The step's memory traffic counted from its HLO: every kernel's (fusion, Pallas, cuBLAS or
  cuDNN call, copy, collective) operands plus its result, as if nothing stayed on chip: XLA:GPU's
  bytes, and on a TPU a count beside XLA's own estimate. A loop's body counts once."""
  return sum(op.bytes for op in ops
             if op.opcode not in _NO_TRAFFIC and not op.opcode.endswith('-done'))


@dataclasses.dataclass
class CollectiveSummary:
  kind: str
  count: int
  bytes: int  # result bytes, summed over the ops


def collectives(ops: list[Op]) -> list[CollectiveSummary]:
  """Collectives by kind (an async pair counts once, at its `-start`)."""
  count, size = collections.Counter(), collections.Counter()
  for op in ops:
    kind = op.opcode.removesuffix('-start')
    if kind in COLLECTIVES and not op.opcode.endswith('-done'):
      count[kind] += 1
      size[kind] += op.result_bytes
  return [CollectiveSummary(k, count[k], size[k]) for k in COLLECTIVES if count[k]]


def top_costs(ops: list[Op], n: int = 10, by: int = 2) -> list[tuple[str, int, int, int]]:
  """The n sources (opcode: JAX op) that cost the most: (source, ops, cycles, bytes), ranked by
  estimated cycles (`by=2`) or bytes (`by=3`)."""
  cycles, size, count = collections.Counter(), collections.Counter(), collections.Counter()
  for op in ops:
    if op.cycles or op.opcode in ('copy', 'transpose', 'fusion', 'convolution', 'dot') or (
        is_kernel(op)):
      key = f'{op.opcode}: {op.source or op.name}'
      cycles[key] += op.cycles
      size[key] += op.bytes
      count[key] += 1
  rows = [(key, count[key], cycles[key], size[key]) for key in cycles]
  return sorted(rows, key=lambda row: -row[by])[:n]


@dataclasses.dataclass
class KernelCalls:
  source: str  # the JAX op the kernel came from
  calls: int
  declared_bytes: int  # over the calls, as the kernel declares them (its `pl.CostEstimate`)
  operand_and_result_bytes: int  # over the calls, from the HLO shapes


def kernel_calls(ops: list[Op]) -> list[KernelCalls]:
  """The Pallas kernels by source: their declared bytes beside their operands' and results',
  largest first. A kernel that declares less than it is handed is the one to check (one that
  re-reads a block, or keeps a result in VMEM, may rightly declare more, or less)."""
  rows: dict[str, KernelCalls] = {}
  for op in ops:
    if op.target == 'tpu_custom_call':
      source = op.source or op.name
      row = rows.setdefault(source, KernelCalls(source, 0, 0, 0))
      row.calls += 1
      row.declared_bytes += op.declared_bytes
      row.operand_and_result_bytes += op.bytes
  return sorted(rows.values(), key=lambda k: -k.operand_and_result_bytes)


def is_kernel(op: Op) -> bool:
  """A Pallas kernel, or on a GPU a cuBLAS or cuDNN call. XLA:TPU writes no cycle estimate for a
  Pallas kernel: only the kernel's own declared cost enters the step's totals."""
  return op.opcode == 'custom-call' and op.target.startswith(KERNEL_TARGETS)


def layout_changes(ops: list[Op]) -> tuple[int, int, int]:
  """(count, estimated cycles, bytes) of the ops that only move data: copies and transposes,
  also as fusions XLA names after them."""
  moves = [op for op in ops if op.opcode in ('copy', 'transpose') or
           (op.opcode == 'fusion' and re.match(r'(copy|transpose)[_.]', op.name))]
  return len(moves), sum(op.cycles for op in moves), sum(op.bytes for op in moves)
