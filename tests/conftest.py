"""Every pytest fixture shared between test modules. Plain helpers live in helpers.py.

Session fixtures are built once per test process (pytest-xdist runs two).
"""
import os

import pytest

import helpers
import storage_emulator
from cvt_flax.runtime import platforms

# The test process is an entry point: it chooses JAX's platforms before any test starts a backend
# (the CPU alone where libtpu is installed without TPU chips, as the commands do).
platforms.cpu_only_without_accelerator()


@pytest.fixture(scope='session')
def fixtures_dir():
  """tests/data: the golden fixtures from the official PyTorch CvT (see its README)."""
  assert (helpers.DATA / 'official_tiny.pth').is_file(), f'golden fixtures missing in {helpers.DATA}'
  return helpers.DATA


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory):
  """A TFDS data dir with the offline `digits` dataset built in it."""
  return helpers.build_digits(str(tmp_path_factory.mktemp('tfds')))


_CACHE_SETTINGS = {'jax_persistent_cache_min_compile_time_secs': 0.5,
                   'jax_persistent_cache_min_entry_size_bytes': 0}


@pytest.fixture(scope='session', autouse=True)
def compile_cache(tmp_path_factory):
  """A persistent XLA compilation cache for the whole test session (and its subprocesses).

  Many tests compile the same programs (the fixture models' forward passes, the tiny training
  config's steps); on 2 CPU cores compiling a train step takes ~15 s and loading it from the cache
  ~1 s. A cached executable is the same program a fresh compile of the same HLO produces, so
  results do not change. Returns env vars for subprocesses.
  """
  import jax  # pylint: disable=g-import-not-at-top
  # One cache for both pytest-xdist workers (their base temp dirs share a parent): what one
  # worker compiled, the other loads.
  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base
  cache_dir = str(shared / 'jax_cache')
  os.makedirs(cache_dir, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  for key, value in _CACHE_SETTINGS.items():
    jax.config.update(key, value)
  env = {key.upper(): str(value) for key, value in _CACHE_SETTINGS.items()}
  env['JAX_COMPILATION_CACHE_DIR'] = cache_dir
  return env


@pytest.fixture(scope='session')
def hub_cache(tmp_path_factory):
  """A Hugging Face hub cache holding `microsoft/cvt-13` as huggingface_hub lays it out: a small
  random HF CvT with named labels and a 224 px ConvNext preprocessor config (no network).

  Returns {'cache_dir', 'snapshot', 'commit', 'model', 'processor'}.
  """
  files = tmp_path_factory.mktemp('hub_files')
  model, processor = helpers.save_random_hf_cvt(files)
  cache_dir = tmp_path_factory.mktemp('hub_cache')
  commit = 'c' * 40
  snapshot = helpers.lay_out_hub_cache(cache_dir, 'microsoft/cvt-13', files, commit)
  return {'cache_dir': str(cache_dir), 'snapshot': snapshot, 'commit': commit, 'model': model,
          'processor': processor}


@pytest.fixture(scope='session')
def storage_emulator_server(tmp_path_factory):
  """A Cloud Storage emulator on 127.0.0.1 for this test process (`tests/storage_emulator.py`)."""
  server = storage_emulator.StorageEmulator(tmp_path_factory.mktemp('gcs')).start()
  yield server
  server.kill()


@pytest.fixture
def gcs(storage_emulator_server, monkeypatch):
  """The emulator, with STORAGE_EMULATOR_HOST set: `gs://bucket/...` paths reach it."""
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', storage_emulator_server.url)
  return storage_emulator_server
