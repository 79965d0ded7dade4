"""`python -m cvt_flax.aot`: the trainer's steps compiled for TPU slices on this CPU (libtpu, no
TPU).

The compiles here are of small models on `v5e-4` (libtpu's `v5e:2x2`); a CvT-13 train step takes
minutes, so the full-size configs are in `benchmarks/RESULTS.md`'s capacity plan instead. The fast
tests share one fixture of three compiles (about 75 s on 2 cores); the two that compile more are
`slow`.
"""
import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys

import pytest

import helpers
from cvt_flax import errors, flops
from cvt_flax.aot import compile as aot_compile, hlo, report, tpus
from cvt_flax.errors import ConfigError
from cvt_flax.models.tpu import mlp_residual as tpu_mlp

pytestmark = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                reason="needs libtpu (pip install 'cvt-flax[tpu]')")

V5E_4 = tpus.parse_slice('v5e-4')


@pytest.mark.parametrize('name, chips, topology, hosts, devices_per_chip', [
    ('v4-8', 4, 'v4:2x2x1', 1, 1), ('v4-32', 16, 'v4:2x2x4', 4, 1),
    ('v5p-128', 64, 'v5p:4x4x4', 16, 1), ('v5e-8', 8, 'v5e:2x4', 1, 1),
    ('v5e-16', 16, 'v5e:4x4', 4, 1), ('v6e-256', 256, 'v6e:16x16', 64, 1),
    ('tpu7x-8', 4, 'tpu7x:2x2x1', 1, 2), ('tpu7x-32', 16, 'tpu7x:2x2x4', 4, 2)])
def test_slice_names_map_to_libtpu_topologies(name, chips, topology, hosts, devices_per_chip):
  tpu_slice = tpus.parse_slice(name)
  assert (tpu_slice.num_chips, tpu_slice.topology, tpu_slice.num_hosts) == (chips, topology, hosts)
  devices = aot_compile.slice_devices(tpu_slice)
  # One JAX device per chip (megacore on v4 / v5p), but one per TensorCore on TPU7x.
  assert len(devices) == tpu_slice.num_devices == chips * devices_per_chip
  assert len({d.process_index for d in devices}) == hosts
  assert name in tpus.describe_slices()


@pytest.mark.parametrize('name', ['v5e-3', 'v4-2', 'v5e-512', 'x9-8', 'v5e', 'tpu7x-4', 'v7x-8'])
def test_bad_slice_name_says_what_is_valid(name):
  with pytest.raises(ConfigError, match='--topology=.*(valid|expected)'):
    tpus.parse_slice(name)


def test_without_libtpu_one_error_names_the_extra(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'libtpu' else real(name, *a))
  with pytest.raises(errors.MissingExtraError, match=r"pip install 'cvt-flax\[tpu\]'"):
    aot_compile.slice_devices(V5E_4)


def digits_config(digits_dir, **overrides):
  config = helpers.load_config_module('digits').get_config()
  config.input.data_dir = digits_dir
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def compiled(digits_dir):
  """`make train`'s model (configs/digits.py: widths 32/64/128 at 32 px, 16 images per chip):
  train steps for v5e-4, float32, without and with FSDP, and the eval step without."""
  return {fsdp: aot_compile.compile_for_slice(
      digits_config(digits_dir, fsdp=fsdp, fsdp_min_size=256), V5E_4, with_eval=not fsdp)
          for fsdp in (False, True)}  # one eval step is enough


def test_tiny_model_fits_v5e_and_report_says_so(compiled):
  for result in compiled.values():
    assert report.fits(result)
    assert result.per_chip_batch == 16
    assert result.run.compute.platform == 'tpu' and result.run.compute.dwconv_impl == 'fused'
    text = report.to_text(result)
    assert 'fits: yes' in text and 'v5e:2x2' in text
    assert 0 < result.train.hbm_bytes < result.slice.chip.hbm_bytes
  assert 0 < compiled[False].eval.hbm_bytes < compiled[False].train.hbm_bytes


@pytest.mark.parametrize('name, hosts, vcpus', [
    ('v5e-1', 1, 24), ('v5e-4', 1, 112), ('v5e-8', 1, 224), ('v5e-16', 4, 112), ('v6e-8', 1, 180),
    ('v6e-64', 16, 180), ('v4-8', 1, 240), ('v5p-128', 16, 208), ('tpu7x-8', 1, 224),
    ('tpu7x-64', 8, 224)])
def test_each_slice_knows_its_hosts_vcpus(name, hosts, vcpus):
  tpu_slice = tpus.parse_slice(name)
  assert (tpu_slice.num_hosts, tpu_slice.host_vcpus) == (hosts, vcpus)


def test_tpu7x_reports_both_tensorcores_of_each_chip(digits_dir, compiled):
  # tpu7x-8: 4 chips of 2 devices. At v5e-4's 16 images per chip, each device runs half of a
  # chip's images; the chip's figures are its two devices' together, close to a v5e chip's.
  v5e = compiled[False]
  result = aot_compile.compile_for_slice(digits_config(digits_dir), tpus.parse_slice('tpu7x-8'),
                                         with_eval=False)
  assert result.per_chip_batch == v5e.per_chip_batch == 16
  assert result.state_bytes_per_chip == 2 * v5e.state_bytes_per_chip  # a replica per device
  assert 0.9 < result.train.flops / v5e.train.flops < 1.1
  j = report.to_json(result)
  assert (j['chips'], j['devices_per_chip'], j['fits']) == (4, 2, True)
  assert 'tpu7x-8 (4 x TPU7x of 2 devices each' in report.to_text(result)


def test_kernels_declare_what_they_are_handed_and_the_hlo_count_stands_beside_xlas(compiled):
  result = compiled[False]
  kernels = hlo.kernel_calls(result.train.ops)
  sources = ' '.join(k.source for k in kernels)
  assert all(name in sources for name in ('attention_core', 'conv_proj', 'mlp')), sources
  for k in kernels:
    # Every call declares at least its operands and results (attention more: it reads the keys
    # once per block of queries).
    assert k.calls > 0 and k.declared_bytes >= k.operand_and_result_bytes > 0, k
  j = report.to_json(result)
  counted, xla = j['train_bytes_counted_from_hlo_per_chip'], j['train_bytes_per_step_per_chip']
  # Two ways of counting the same program: every op's operands and result from HBM, against
  # XLA's model (which lets some stay on chip and counts some twice). Measured: 0.49x XLA's here,
  # 1.30x for CvT-13 on v5e-8 and 1.60x on tpu7x-8.
  assert xla / 3 <= counted <= 3 * xla
  assert f'counted from the HLO: {counted / 1e9:.1f} GB' in report.to_text(result)
  table = report.costs_text(result, 5)
  assert all(f'| {k.source} | {k.calls} |' in table for k in kernels)


def test_the_hosts_bound_the_estimate_when_their_pipelines_are_slower(compiled):
  result = compiled[False]
  chips = report.estimate(result)
  assert chips.bound in ('compute', 'memory') and chips.host_images_per_sec is None
  slice_rate = chips.images_per_sec_per_chip * V5E_4.num_chips
  # Hosts that deliver half of what the chips take: half the images/s, and the report says why.
  per_cpu = slice_rate / 2 / (V5E_4.host_vcpus * V5E_4.num_hosts)
  hosts = report.estimate(result, per_cpu)
  assert hosts.bound == 'host'
  assert hosts.images_per_sec_per_chip * V5E_4.num_chips == pytest.approx(slice_rate / 2)
  assert hosts.step_seconds == pytest.approx(2 * chips.step_seconds)
  assert 'they bound the step' in report.to_text(result, per_cpu)
  assert report.to_json(result, per_cpu)['host_images_per_sec'] == pytest.approx(slice_rate / 2)
  # Faster hosts change nothing.
  fast = report.estimate(result, 3 * per_cpu)
  assert (fast.bound, fast.step_seconds) == (chips.bound, chips.step_seconds)
  assert 'not estimated' in report.to_text(result)


# XLA's FLOPs / the analytic 6 x multiply-adds. Below 1 only by the input gradient of the first
# conv, which no one computes (2 of its 6 FLOPs per MAC). Above 1 by what the MAC count leaves out
# (`cvt_flax.flops`): normalisations, activations, softmax, residual adds, the loss and the AdamW
# update. Counted per block, that is at most ~100 FLOPs per activation element (LayerNorm and GELU
# forward and backward are ~20 each) against 72 x width FLOPs of the block's matmuls per element
# (q/k/v/out and the 4x MLP: 12 x width MACs, x 6): 100 / (72 x 32) = 4.3% at the narrowest stage
# here; the softmax's ~10 FLOPs per score against 6 x 2 x head width (32) per score: 2.6%; plus ~20
# FLOPs per parameter for AdamW (< 1% here). Hence [1 - first conv, 1.10]. (TINY_MODEL at 16 px is
# too small for this: there the Mixup/CutMix sampling and the 16-wide stage weigh more than the
# matmuls.) What TPU's fused block kernel computes on top by design is taken off first.
def test_compiled_flops_agree_with_the_analytic_count(compiled):
  for result in compiled.values():
    cfg = result.run.model_config
    size = result.run.config.input.image_size
    macs = flops.analytic_macs(cfg, size)
    analytic = report.model_train_flops_per_chip(result)
    first_conv = 2 * macs['conv_embed'] * result.per_chip_batch  # upper bound of its input grad
    assert result.run.compute.mlp_impl == 'fused'
    kernel_extra = _fused_block_extra_flops(cfg, size, result.per_chip_batch)
    assert 0 < kernel_extra < 0.5 * analytic
    ratio = (result.train.flops - kernel_extra) / analytic
    assert 1 - first_conv / analytic <= ratio <= 1.10, ratio


def _fused_block_extra_flops(cfg, image_size: int, batch: int) -> int:
  """FLOPs the fused block kernel declares beyond the model's MLP: its blocks' padded rows, and
  fc1 again in the backward pass (14 FLOPs per row and MAC of a layer, not 12; tpu.mlp_residual's costs)."""
  extra, side = 0, image_size
  for i in range(cfg.num_stages):
    side = (side + 2 * cfg.patch_padding[i] - cfg.patch_size[i]) // cfg.patch_stride[i] + 1
    tokens = side * side + (1 if cfg.cls_token[i] else 0)
    rows = -(-tokens // tpu_mlp.block_rows(tokens)) * tpu_mlp.block_rows(tokens)
    width = cfg.dim_embed[i]
    matrix = width * int(width * cfg.mlp_ratio[i])
    extra += cfg.depth[i] * batch * matrix * (14 * rows - 12 * tokens)
  return extra


@pytest.mark.slow  # another compile (~20 s)
def test_grad_accumulation_loop_is_counted_once_per_microbatch(compiled, digits_dir):
  """XLA's cost analysis counts a loop body once: with 2 microbatches the raw count halves, and the
  report scales it back (to within the optimizer update, counted twice)."""
  accumulated = aot_compile.compile_for_slice(
      digits_config(digits_dir, grad_accum_steps=2), V5E_4, with_eval=False)
  single = compiled[False]
  assert 0.4 < accumulated.train.flops / single.train.flops < 0.6
  scaled = report.step_costs(accumulated)[0] / report.step_costs(single)[0]
  assert 0.95 < scaled < 1.1, scaled


def test_fsdp_divides_state_bytes_by_about_the_chip_count(compiled):
  replicated, sharded = compiled[False], compiled[True]
  ratio = replicated.state_bytes_per_chip / sharded.state_bytes_per_chip
  # Arrays below fsdp_min_size elements (biases, norms) stay whole on every chip.
  assert 3.0 < ratio <= V5E_4.num_chips, ratio
  kinds = {c.kind for c in hlo.collectives(sharded.train.ops)}
  assert 'all-gather' in kinds  # the sharded weights are gathered for the forward pass
  assert {c.kind for c in hlo.collectives(replicated.train.ops)} == {
      'all-reduce'}  # data parallel: only the gradients (and BatchNorm statistics) are reduced


@pytest.mark.slow  # a process that compiles (~25 s)
def test_cli_reports_a_run_that_cannot_fit(digits_dir, tmp_path):
  """TINY_MODEL at 512 px, 128 images per chip: the activations the backward pass keeps (the
  flash-attention kernels keep the first stage's 65,536 x 16,385 scores on chip) outgrow 16 GiB."""
  config = helpers.write_config_file(tmp_path, 'huge', digits_dir,
                                     **{'input.image_size': 512, 'batch_size': 512})
  proc = subprocess.run(
      [sys.executable, '-m', 'cvt_flax.aot', f'--config={config}', '--topology=v5e-4', '--json',
       '--noeval'], env=helpers.subprocess_env(), cwd=helpers.ROOT, capture_output=True,
      text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['fits'] is False and result['hbm_bytes_per_chip'] > result['hbm_capacity_bytes']
  # The paths `auto` took on the TPU, per stage (the 512 px maps are too large for the
  # convolution kernels' VMEM plan), in the text and the JSON.
  assert [row['conv'][0] for row in result['compute']['stages']] == ['xla', 'xla']
  assert 'stage 0 (256x256x16)' in proc.stdout and "does not fit the kernels' VMEM plan" in proc.stdout
  assert 'fits: NO, does not fit' in proc.stdout
  for fix in ('--config.fsdp=True', '--config.remat=block'):
    assert fix in proc.stdout
  # 24.4 GiB of temporaries at 128 images per chip: microbatches of 64 bring them to ~12 GiB.
  assert '--config.grad_accum_steps=2 (the same global batch in microbatches of 64' in proc.stdout
  # Progress on stderr while it compiles: what, then how long it took.
  assert 'compiling the train step for v5e-4, 128 images per chip ...' in proc.stderr
  assert re.search(r'the train step for v5e-4, 128 images per chip: [\d.]+ s', proc.stderr)
  assert 'Failed to find host bounds' not in proc.stderr


def test_capacity_plan_table_renders_the_reports(compiled, monkeypatch):
  plan = helpers.load_module(helpers.ROOT / 'benchmarks' / 'capacity_plan.py')
  monkeypatch.setitem(plan.ROWS, 'digits_v5e4', ('v5e-4', 'configs/digits.py', ()))
  monkeypatch.setitem(plan.ROWS, 'digits_v5e4_fsdp', ('v5e-4', 'configs/digits.py',
                                                     ('--config.fsdp=True',)))
  text = plan.table({'digits_v5e4': report.to_json(compiled[False]),
                     'digits_v5e4_fsdp': report.to_json(compiled[True])})
  lines = text.splitlines()
  assert len(lines) == 4 and lines[2].startswith('| digits | v5e-4 | 16 | float32 | - / none |')
  assert lines[3].startswith('| digits (fsdp=True) | v5e-4 | 16 | float32 | FSDP / none |')
  assert all(' yes |' in line for line in lines[2:])
  # Hosts that deliver half of what the chips take bound the row, which says so.
  chips = report.to_json(compiled[False])['estimated_images_per_sec_per_chip']
  per_cpu = chips / 2 * V5E_4.num_chips / (V5E_4.host_vcpus * V5E_4.num_hosts)
  bounded = plan.table({'digits_v5e4': report.to_json(compiled[False])}, per_cpu).splitlines()[2]
  assert '| **host** | 1 x 112 |' in bounded and f'| {chips / 2:.0f} |' in bounded


# The CvT-13 train step as XLA:TPU compiles it (the official recipe, bf16, 8 images per chip on
# v5e-4), as tests/data/tpu_step_bytes.json records it for the pinned libtpu.
TPU_STEP_BYTES = helpers.DATA / 'tpu_step_bytes.json'


@pytest.mark.slow  # one CvT-13 train step compiled for TPU: minutes on 2 cores
def test_cvt13_tpu_train_step_moves_no_more_bytes_than_recorded():
  """A change to shared model code that makes the TPU step heavier fails here, e.g. linear layers
  on (batch * tokens, channels), which cost the step a third more HBM traffic. The recorded figure
  changes only in a commit that says why (benchmarks/RESULTS.md)."""
  recorded = json.loads(TPU_STEP_BYTES.read_text())
  libtpu = importlib.metadata.version('libtpu')
  if libtpu != recorded['libtpu']:
    pytest.skip(f"{TPU_STEP_BYTES.name} was recorded with libtpu {recorded['libtpu']}, here "
                f'{libtpu}: compile at the old version, or record the figure again')
  config = helpers.load_config_module('imagenet').get_config(recorded['config_arg'])
  tpu_slice = tpus.parse_slice(recorded['topology'])
  config.batch_size = recorded['per_chip_batch'] * tpu_slice.num_chips
  step_bytes = report.to_json(aot_compile.compile_for_slice(
      config, tpu_slice, with_eval=False))['train_bytes_per_step_per_chip']
  assert step_bytes <= 1.03 * recorded['train_bytes_per_step_per_chip'], (
      f"{step_bytes / 1e9:.2f} GB per chip and step, "
      f"{step_bytes / recorded['train_bytes_per_step_per_chip'] - 1:+.1%} over the recorded "
      f"{recorded['train_bytes_per_step_per_chip'] / 1e9:.2f} GB")
