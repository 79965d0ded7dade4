"""The repository stands alone and speaks of the project: nothing it tracks reads files from beside
the clone or points into its tracker or to the periods in which work was done; the README's
table of released models is the registry's; every jit goes through the one compile helper."""
import os
import re
import subprocess
import warnings

import pytest

from cvt_flax.models.released import RELEASED
from helpers import ROOT

# Built from pieces so that this file does not match itself.
_OUTSIDE = re.compile('|'.join([r'\.\./' + 'shared', r"'" + "shared' */", 'shared' + '/fixtures',
                                r'\.parent */ *' + "'shared'"]))


def _tracked_files():
  try:
    out = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True, check=True)
    return [ROOT / name for name in out.stdout.decode().split('\0') if name]
  except (OSError, subprocess.CalledProcessError):  # an export without .git: every file
    return [ROOT / os.path.relpath(os.path.join(d, f), ROOT) for d, dirs, files in os.walk(ROOT)
            for f in files if '.venv' not in d and '.git' not in d]


def _tracked_lines():
  """(path, line number, line) of every tracked text file (binary fixtures are skipped)."""
  for path in _tracked_files():
    try:
      text = path.read_text()
    except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
      continue  # binary files (fixtures), or deleted in the work tree
    for i, line in enumerate(text.splitlines(), 1):
      yield path, i, line


def test_no_tracked_file_refers_to_files_beside_the_clone():
  offenders = [f'{path.relative_to(ROOT)}:{i}: {line.strip()}'
               for path, i, line in _tracked_lines() if _OUTSIDE.search(line)]
  assert not offenders, 'files outside the repository are read:\n' + '\n'.join(offenders)


def test_golden_fixtures_are_tracked():
  names = {p.relative_to(ROOT).as_posix() for p in _tracked_files()}
  for name in ('official_tiny.pth', 'official_tiny_io.npz', 'official_tiny.json',
               'official_tiny_avg.pth', 'official_manifests.json', 'README.md',
               'hf_tiny/config.json', 'hf_tiny/model.safetensors'):
    assert f'tests/data/{name}' in names


# A reader of the repository has neither the tracker nor the history of how it was made: the
# text names machines, dates and commands. (Built from pieces so that this file does not match.)
_WORK_TALK = re.compile('|'.join([
    r'\b' + 'issues?' + r' ?#?\d+',                  # a tracker number
    r'\b(?:per|this|that|the|last|previous|earlier|next|later) ' + r'(?:issue|ticket)\b',
    r'\b' + 'sess' + r'ions?\b',                      # the periods of work
]), re.IGNORECASE)
# pytest's own vocabulary (the scope of its shared fixtures) is allowed in the tests' code.
_PYTEST_SESSION = re.compile(r"scope='session'|[Ss]ession fixtures|test session")


def test_no_tracked_text_refers_to_the_tracker_or_to_work_periods():
  offenders = [f'{path.relative_to(ROOT)}:{i}: {line.strip()}'
               for path, i, line in _tracked_lines()
               if _WORK_TALK.search(line) and 'github.com/' not in line
               and not (path.parent.name == 'tests' and _PYTEST_SESSION.search(line))]
  assert not offenders, 'the repository should speak of the project only:\n' + '\n'.join(offenders)


def test_readme_lists_the_released_models_of_the_registry():
  readme = (ROOT / 'README.md').read_text()
  rows = re.findall(r'^\| `(microsoft/[\w.-]+)`([^|]*)\| (\d+) \| ([\d.]+) \|$', readme, re.M)
  assert rows == [(r.hub_name, ' (ImageNet-22k pre-trained) ' if r.pretraining == 'ImageNet-22k'
                   else ' ', str(r.image_size), f'{r.top1:.1f}') for r in RELEASED]
  loop = re.search(r'^for m in (.*); do$', readme, re.M).group(1).split()
  assert loop == [r.hub_name.split('/')[1] for r in RELEASED]


def test_every_jit_goes_through_the_compile_helper():
  """`cvt_flax.runtime.compiler.jit` adds the platform's compiler options (and `compile_ahead` the
  CPU heap release): a `jax.jit` elsewhere in the package would miss them."""
  offenders = [f'{p.relative_to(ROOT)}:{i}' for p in (ROOT / 'cvt_flax').rglob('*.py')
               if p.relative_to(ROOT).as_posix() != 'cvt_flax/runtime/compiler.py'
               for i, line in enumerate(p.read_text().splitlines(), 1)
               if re.search(r'\b(?:jax|nnx)\.jit\(', line)]
  assert not offenders, offenders


@pytest.mark.parametrize('module', ['cvt_flax.models.cvt', 'flax.nnx.module', 'jax._src.api',
                                    'orbax.checkpoint.checkpoint_manager', 'optax._src.base'])
def test_a_deprecation_raised_from_the_stack_fails_the_tests(module):
  """pyproject.toml's filterwarnings: the next deprecation in cvt_flax's own calls, or in jax, flax,
  orbax and optax, fails the suite instead of scrolling past."""
  with pytest.raises(DeprecationWarning):
    warnings.warn_explicit('an API going away', DeprecationWarning, f'{module}.py', 1,
                           module=module)
