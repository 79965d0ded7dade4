"""What a process starts: `import cvt_flax` changes nothing global; the entry points choose JAX's
platforms from the accelerators this machine has (`cvt_flax.accelerators`)."""
import importlib.util
import subprocess
import sys
import types

import pytest

import helpers
from cvt_flax import accelerators
from cvt_flax.runtime import platforms


def _run(code: str, **env_changes) -> subprocess.CompletedProcess:
  env = helpers.subprocess_env()
  env.pop('JAX_PLATFORMS')  # as a user's shell has it
  env.update(env_changes)
  return subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                        timeout=120, check=True)


def test_import_changes_nothing_global():
  code = ('import sys, jax, cvt_flax, cvt_flax.models.cpu; '
          'print(jax.config.jax_platforms, "tensorflow" in sys.modules)')
  proc = _run(code)
  assert proc.stdout.split() == ['None', 'False']  # JAX's platforms untouched, TF not imported
  assert proc.stderr == ''


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason='needs libtpu installed')
def test_a_users_script_starts_jax_silently_on_cpu_with_libtpu_installed():
  """No TPU chips here: what the README tells a user's script to call keeps libtpu's runtime (its
  error block on stderr) from starting."""
  code = ('import cvt_flax, jax; from cvt_flax.runtime import platforms; '
          'platforms.skip_tpu_without_chips(); print(jax.devices()[0].platform)')
  proc = _run(code)
  assert proc.stdout.strip() == 'cpu'
  assert proc.stderr == ''


def test_platforms_are_left_alone_where_there_is_an_accelerator_or_a_choice(monkeypatch):
  chosen = []
  fake_jax = types.SimpleNamespace(config=types.SimpleNamespace(
      jax_platforms=None, update=lambda name, value: chosen.append((name, value))))
  monkeypatch.setattr(platforms, 'jax', fake_jax)  # as JAX starts without JAX_PLATFORMS
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  monkeypatch.delenv('JAX_FORCE_TPU_INIT', raising=False)
  monkeypatch.setattr(platforms, 'libtpu_present', lambda: True)
  for machine in (accelerators.TPU, accelerators.NVIDIA):
    monkeypatch.setattr(accelerators, 'detect', lambda machine=machine: machine)
    assert not platforms.skip_tpu_without_chips()
  monkeypatch.setattr(accelerators, 'detect', lambda: None)  # a CPU machine
  monkeypatch.setenv('JAX_PLATFORMS', 'tpu,cpu')  # the user's choice
  assert not platforms.skip_tpu_without_chips()
  monkeypatch.delenv('JAX_PLATFORMS')
  monkeypatch.setattr(platforms, 'libtpu_present', lambda: False)  # nothing to keep quiet
  assert not platforms.skip_tpu_without_chips() and not chosen
  monkeypatch.setattr(platforms, 'libtpu_present', lambda: True)
  assert platforms.skip_tpu_without_chips() and chosen == [('jax_platforms', 'cpu')]


def _fake_machine(root, *, pci=(), dev=(), proc=()):
  """A file-system root with PCI devices (vendor, device), /dev files and /proc paths."""
  for i, (vendor, device) in enumerate(pci):
    path = root / 'sys' / 'bus' / 'pci' / 'devices' / f'0000:00:0{i}.0'
    path.mkdir(parents=True)
    (path / 'vendor').write_text(vendor + '\n')
    (path / 'device').write_text(device + '\n')
  for name in dev:
    (root / 'dev').mkdir(exist_ok=True)
    (root / 'dev' / name).write_text('')
  for name in proc:
    (root / 'proc' / name).mkdir(parents=True)
  return str(root)


@pytest.mark.parametrize('machine, expected', [
    (dict(), None),
    (dict(pci=[('0x1ae0', '0x0042')]), None),  # a GCE VM's gVNIC network card: Google, not a TPU
    (dict(pci=[('0x1ae0', '0x0063')] * 4), accelerators.TPU),  # a v5e-4 VM
    (dict(dev=['accel0', 'accel1']), accelerators.TPU),  # a v4 VM's TPU driver
    (dict(dev=['nvidia0', 'nvidiactl']), accelerators.NVIDIA),
    (dict(proc=['driver/nvidia/gpus/0000:00:04.0']), accelerators.NVIDIA),
    (dict(dev=['kfd']), accelerators.AMD),
])
def test_accelerators_are_read_from_the_os(tmp_path, machine, expected):
  assert accelerators.detect(_fake_machine(tmp_path, **machine)) == expected

