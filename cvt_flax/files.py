"""The one way cvt-flax writes files: atomically, so that a reader never sees half a file.

A file is written into a temporary sibling and renamed over its final name (a rename within a
directory is atomic on POSIX file systems); a directory is built as a temporary sibling and renamed
into place last. A write that fails or is killed leaves the previous version, or nothing, plus at
most a temporary `.NAME.tmp-*` sibling that no reader mistakes for the real thing.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from typing import Any, Callable, Iterator


# The process's umask, read once (os.umask can only be read by setting it): a written file gets the
# permissions a plain open() would give it, whatever the writing library chose.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _temporary_sibling(path: str, kind: str) -> str:
  """A new name beside `path` (created by the caller, so with the usual permissions: `tempfile`'s
  would be private to the owner)."""
  directory, name = os.path.split(os.path.abspath(path))
  return os.path.join(directory, f'.{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}')


def atomic_write(path: str, write: Callable[[str], None]) -> None:
  """Runs `write(tmp_path)` on a temporary sibling of `path`, then renames it over `path`."""
  path = os.fspath(path)
  tmp = _temporary_sibling(path, 'tmp')
  try:
    write(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)
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
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = _temporary_sibling(path, 'tmp')
  os.mkdir(tmp)
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
  old = _temporary_sibling(path, 'old')
  os.rename(path, old)
  os.rename(tmp, path)
  shutil.rmtree(old, ignore_errors=True)
