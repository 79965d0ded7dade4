"""The repository stands alone: nothing it tracks reads files from beside the clone."""
import os
import re
import subprocess

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


def test_no_tracked_file_refers_to_files_beside_the_clone():
  offenders = []
  for path in _tracked_files():
    try:
      text = path.read_text()
    except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
      continue  # binary files (fixtures), or deleted in the work tree
    offenders += [f'{path.relative_to(ROOT)}:{i}: {line.strip()}'
                  for i, line in enumerate(text.splitlines(), 1) if _OUTSIDE.search(line)]
  assert not offenders, 'files outside the repository are read:\n' + '\n'.join(offenders)


def test_golden_fixtures_are_tracked():
  names = {p.relative_to(ROOT).as_posix() for p in _tracked_files()}
  for name in ('official_tiny.pth', 'official_tiny_io.npz', 'official_tiny.json',
               'official_tiny_avg.pth', 'official_manifests.json', 'README.md'):
    assert f'tests/data/{name}' in names
