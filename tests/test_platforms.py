"""What a process starts: `import cvt_flax` changes nothing global; the entry points choose JAX's
platforms from the accelerators this machine has (`cvt_flax.accelerators`)."""
import importlib.metadata
import importlib.util
import subprocess
import sys
import types

import pytest

import helpers
from cvt_flax import accelerators
from cvt_flax.models import compute
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
          'platforms.cpu_only_without_accelerator(); print(jax.devices()[0].platform)')
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
  monkeypatch.setattr(platforms, 'accelerator_plugin_present', lambda: True)
  for machine in (accelerators.TPU, accelerators.NVIDIA):
    monkeypatch.setattr(accelerators, 'detect', lambda machine=machine: machine)
    assert not platforms.cpu_only_without_accelerator()
  monkeypatch.setattr(accelerators, 'detect', lambda: None)  # a CPU machine
  monkeypatch.setenv('JAX_PLATFORMS', 'tpu,cpu')  # the user's choice
  assert not platforms.cpu_only_without_accelerator()
  monkeypatch.delenv('JAX_PLATFORMS')
  monkeypatch.setattr(platforms, 'accelerator_plugin_present', lambda: False)  # nothing to keep quiet
  assert not platforms.cpu_only_without_accelerator() and not chosen
  monkeypatch.setattr(platforms, 'accelerator_plugin_present', lambda: True)
  assert platforms.cpu_only_without_accelerator() and chosen == [('jax_platforms', 'cpu')]


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



# --------------------------------------------------------------------------------------------------
# A notebook's setup on Colab: the JAX build of the runtime's accelerator, and the device it got.

@pytest.mark.parametrize('machine, extras, expected', [
    (None, (), 'cvt-flax'),  # a CPU runtime: the core, jax's CPU build
    (None, ('train',), 'cvt-flax[train]'),
    (accelerators.NVIDIA, (), 'cvt-flax[cuda]'),  # a T4 / A100 / L4 runtime
    (accelerators.NVIDIA, ('train',), 'cvt-flax[train,cuda]'),
    (accelerators.TPU, ('train',), 'cvt-flax[train,tpu]'),  # a v5e-1 / v6e-1 runtime
])
def test_setup_installs_the_jax_build_of_the_runtime(machine, extras, expected):
  assert accelerators.pip_requirement('cvt-flax', machine, extras) == expected


def test_every_jax_extra_the_setup_names_is_a_cvt_flax_extra_with_jax_s_build():
  requires = importlib.metadata.metadata('cvt-flax').get_all('Requires-Dist')
  for extra in accelerators.JAX_EXTRA.values():
    assert any(req.startswith('jax[') and f'extra == "{extra}"' in req for req in requires), extra


def test_a_kernel_that_imported_another_jax_must_restart():
  # A GPU runtime whose kernel imported Colab's own jax before the setup upgraded it.
  message = accelerators.restart_message('0.7.2', '0.10.2')
  assert 'imported jax 0.7.2 before the setup installed jax 0.10.2' in message
  assert 'restart the runtime (in Colab: the Runtime menu, restart)' in message
  assert accelerators.restart_message(None, '0.10.2') is None  # jax not imported yet
  assert accelerators.restart_message('0.10.2', '0.10.2') is None  # the notebook run again


def test_setup_runs_pip_for_the_runtime_and_stops_for_a_restart(monkeypatch):
  """`install` with the detection and pip faked: one pip call with the runtime's requirement, then
  RestartRuntime when the kernel holds another jax."""
  calls = []
  monkeypatch.setattr(accelerators, 'detect', lambda: accelerators.NVIDIA)
  monkeypatch.setattr(accelerators.subprocess, 'run', lambda cmd, check: calls.append(cmd))
  monkeypatch.setattr(accelerators, 'installed_versions', lambda: {'jax': '0.10.2'})
  monkeypatch.setitem(sys.modules, 'jax', types.SimpleNamespace(__version__='0.10.2'))
  assert accelerators.install('./cvt-flax', 'train') == './cvt-flax[train,cuda]'
  assert calls == [[sys.executable, '-m', 'pip', 'install', '-q', './cvt-flax[train,cuda]']]
  monkeypatch.setitem(sys.modules, 'jax', types.SimpleNamespace(__version__='0.7.2'))
  with pytest.raises(accelerators.RestartRuntime, match='restart the runtime'):
    accelerators.install()


def test_the_setup_file_runs_without_cvt_flax_or_jax():
  """A setup cell runs accelerators.py by path before anything is installed: standard library
  only (a Python that cannot import jax or cvt_flax gets its functions)."""
  code = ('import sys, runpy; sys.modules["jax"] = sys.modules["cvt_flax"] = None; '
          f'f = runpy.run_path({str(helpers.ROOT / "cvt_flax" / "accelerators.py")!r}); '
          'print(f["pip_requirement"]("cvt-flax", f["detect"](), ("train",)))')
  proc = subprocess.run([sys.executable, '-I', '-c', code], capture_output=True, text=True,
                        timeout=60, check=True)
  assert proc.stdout.strip() == 'cvt-flax[train]' and proc.stderr == ''


def test_device_check_fails_loudly_on_a_gpu_runtime_that_jax_does_not_use(monkeypatch, capsys):
  assert 'backend cpu' in platforms.check_jax_devices()  # a CPU machine: the line, no error
  assert 'accelerator on this machine: none' in capsys.readouterr().out
  # A T4 runtime whose JAX lost its CUDA plugin: JAX fell back to the CPU.
  monkeypatch.setattr(accelerators, 'detect', lambda: accelerators.NVIDIA)
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')  # the user's own choice: the line, no error
  assert 'accelerator on this machine: nvidia' in platforms.check_jax_devices()
  monkeypatch.delenv('JAX_PLATFORMS')
  monkeypatch.setattr(accelerators, 'installed_versions',
                      lambda: {'jax': '0.10.2', 'jaxlib': '0.10.2', 'jax-cuda12-plugin': '0.7.2'})
  with pytest.raises(platforms.AcceleratorNotUsed) as err:
    platforms.check_jax_devices()
  message = str(err.value)
  assert 'has a NVIDIA accelerator but JAX runs on the CPU only' in message
  assert 'jax 0.10.2, jaxlib 0.10.2, jax-cuda12-plugin 0.7.2' in message
  assert "pip install 'cvt-flax[cuda]'" in message and 'restart' in message


@pytest.mark.parametrize('backend, capability, dtype', [
    ('cpu', None, 'float32'), ('tpu', None, 'bfloat16'), ('gpu', '7.5', 'float32'),  # a T4
    ('gpu', '8.9', 'bfloat16'), ('gpu', '9.0', 'bfloat16')])  # an L4, an H100
def test_the_fast_dtype_is_bf16_where_the_hardware_multiplies_in_bf16(monkeypatch, backend,
                                                                      capability, dtype):
  device = types.SimpleNamespace(compute_capability=capability)
  fake_jax = types.SimpleNamespace(default_backend=lambda: backend, devices=lambda: [device])
  for module in (platforms, compute):  # JAX as it starts on that machine
    monkeypatch.setattr(module, 'jax', fake_jax)
  assert platforms.fast_dtype() == dtype
