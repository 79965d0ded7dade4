"""The one way cvt-flax writes files: atomically, so that a reader never sees half a file.

A file is written into a temporary sibling and renamed over its final name (a rename within a
directory is atomic on POSIX file systems); a directory is built as a temporary sibling and renamed
into place last. A write that fails or is killed leaves the previous version, or nothing, plus at
most a temporary `.NAME.*.tmp` sibling that no reader mistakes for the real thing.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator


def atomic_write(path: str, write: Callable[[str], None]) -> None:
  """Runs `write(tmp_path)` on a temporary sibling of `path`, then renames it over `path`."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(path: str, text: str) -> None:
  def write(tmp):
    with open(tmp, 'w') as f:
      f.write(text)
  atomic_write(path, write)


def write_json(path: str, obj: Any, *, sort_keys: bool = False) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + '\n')


@contextlib.contextmanager
def atomic_directory(path: str, *, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary sibling directory of `path` to fill; moves it to `path` on success.

  An existing `path` is an error unless `overwrite`; then it is replaced only once the new
  directory is complete. On an exception the temporary directory is removed.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f'{path} exists; pass overwrite=True to replace it.')
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(path)}.tmp-')
  try:
    yield tmp
    _move_into_place(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _move_into_place(tmp: str, path: str) -> None:
  if not os.path.exists(path):
    os.rename(tmp, path)
    return
  # Replacing: move the old one aside first (a directory cannot be renamed over a non-empty one).
  trash = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=f'.{os.path.basename(path)}.old-')
  os.rename(path, os.path.join(trash, 'old'))
  os.rename(tmp, path)
  shutil.rmtree(trash, ignore_errors=True)
