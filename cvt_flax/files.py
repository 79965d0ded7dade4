"""The one way cvt-flax reads and writes files: local paths and `gs://` URLs, atomically.

Every path the project reads or writes goes through here. Local paths use `os`; URLs (`gs://...`)
use `etils.epath`, the path library Orbax itself uses, with its fsspec backend (`gcsfs`, the `gcs`
extra), so Orbax's own path operations and ours go through the same client.

What a reader can see:
  * local: a file is written into a temporary sibling and renamed over its final name (atomic on
    POSIX file systems); a directory is built as a temporary sibling and renamed into place last.
    A write that fails or is killed leaves the previous version, or nothing, plus at most a
    temporary `.NAME.tmp-*` sibling that no reader mistakes for the real thing.
  * Cloud Storage: an object becomes visible whole when its upload completes, so a file write is
    atomic as it is. There is no rename, so a directory is written in place with its *commit file*
    (the file whose presence says "complete", e.g. a model's config.json) written last; replacing
    one deletes the commit file first. A killed write leaves a directory without its commit file,
    which readers reject and the next save replaces.

Emulators: `STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT`, the convention of Google's client
libraries, is the one setting. `prepare_url_clients` maps it onto the settings of the
libraries that have their own (tensorstore, which writes Orbax's arrays, and gcsfs).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from typing import Any, Callable, Iterator

from etils import epath

from cvt_flax import logs
from cvt_flax.errors import require_installed

# The process's umask, read once, at import (os.umask can only be read by setting it and setting it
# back, which later, beside Orbax's writer threads, would race with their file creation): a
# written file gets the permissions a plain open() would give it, whatever the writing library
# chose.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def is_remote(path) -> bool:
  """Whether `path` is a URL (`gs://bucket/...`) rather than a local path."""
  return '://' in os.fspath(path)


def absolute(path) -> str:
  """An absolute local path (Orbax needs one), or the URL unchanged."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def use_gcsfs_for_urls() -> None:
  """etils.epath's URLs through gcsfs rather than tf.io.gfile, unless the user set EPATH_USE_TF.
  epath decides once per process, at the first URL any library gives it: `prepare_url_clients`
  calls this before cvt-flax's first URL, and `cvt_flax.data` when it imports TensorFlow, before
  TFDS, which reads its own catalog bucket through epath, can decide for the process."""
  os.environ.setdefault('EPATH_USE_TF', 'false')


def prepare_url_clients() -> None:
  """Sets up the storage clients before cvt-flax's first URL (nothing runs at import: a process
  that never reads a URL is left as it was).

  etils.epath picks tf.io.gfile for URLs whenever TensorFlow is installed; tf.io.gfile ignores
  STORAGE_EMULATOR_HOST, and TensorFlow only feeds the input pipeline here, so URLs (Orbax's too)
  go through gcsfs (`use_gcsfs_for_urls`). gcsfs logs a request it gives up on, with its
  traceback, then raises it: the raised error is what the caller reports, once. Then every storage
  client is pointed at
  STORAGE_EMULATOR_HOST, if it is set: tensorstore reads its own variable and needs a token to skip
  the credential lookup; gcsfs's default file system asks the storage-control API, which emulators
  lack, for the bucket type.
  """
  use_gcsfs_for_urls()
  logs.drop_messages('gcsfs', r'out of retries on exception', r'non-retriable exception')
  host = os.environ.get('STORAGE_EMULATOR_HOST')
  if not host:
    return
  url = host if '://' in host else f'http://{host}'
  os.environ['TENSORSTORE_GCS_HTTP_URL'] = url
  os.environ.setdefault('GOOGLE_AUTH_TOKEN_FOR_TESTING', 'storage-emulator')
  os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')


def _url(path):
  """The epath.Path of a URL, with the client library checked and the clients set up."""
  prepare_url_clients()
  if os.fspath(path).startswith('gs://'):
    require_installed('gcs', 'gcsfs')
  return epath.Path(os.fspath(path))


def exists(path) -> bool:
  return _url(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path) -> bool:
  """On Cloud Storage: whether any object lies under `path/`."""
  return _url(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path) -> bool:
  return _url(path).is_file() if is_remote(path) else os.path.isfile(path)


def listdir(path) -> list[str]:
  return [p.name for p in _url(path).iterdir()] if is_remote(path) else os.listdir(path)


def makedirs(path) -> None:
  """Creates a local directory and its parents; nothing for a URL (object stores have none)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def remove(path) -> None:
  if is_remote(path):
    _url(path).unlink()
  else:
    os.remove(path)


def rmtree(path) -> None:
  if is_remote(path):
    _url(path).rmtree()
  else:
    shutil.rmtree(path)


def read_text(path) -> str:
  if is_remote(path):
    return _url(path).read_text()
  with open(path) as f:
    return f.read()


@contextlib.contextmanager
def local_copy(path, names: tuple[str, ...] = ()) -> Iterator[str]:
  """`path` itself if local; else a temporary local copy of it, for readers of local files only.

  A directory is copied as the files among `names` in it; a file with those of `names` that lie
  beside it.
  """
  path = os.fspath(path)
  if not is_remote(path):
    yield path
    return
  source = _url(path)
  with tempfile.TemporaryDirectory() as directory:
    if source.is_dir():
      local, wanted = directory, [source / name for name in names]
    else:
      local = os.path.join(directory, source.name)
      wanted = [source] + [source.parent / name for name in names if name != source.name]
    for remote in wanted:
      if remote.is_file():
        with remote.open('rb') as src, open(os.path.join(directory, remote.name), 'wb') as dst:
          shutil.copyfileobj(src, dst, 16 << 20)
    yield local


def atomic_write(path, write: Callable[[str], None]) -> None:
  """Runs `write(tmp_path)` on a local temporary file, then puts it at `path` in one step."""
  path = os.fspath(path)
  if is_remote(path):
    with tempfile.TemporaryDirectory() as directory:
      tmp = os.path.join(directory, os.path.basename(path))
      write(tmp)
      with open(tmp, 'rb') as f:
        _url(path).write_bytes(f.read())  # one upload: the object appears whole or not at all
    return
  tmp = _temporary_sibling(path, 'tmp')
  try:
    write(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(path, text: str) -> None:
  if is_remote(path):
    _url(path).write_text(text)
    return

  def write(tmp):
    with open(tmp, 'w') as f:
      f.write(text)
  atomic_write(path, write)


def write_bytes(path, data: bytes) -> None:
  def write(tmp):
    with open(tmp, 'wb') as f:
      f.write(data)
  atomic_write(path, write)


def upload_tree(local: str, directory) -> None:
  """Copies every file under the local directory `local` into `directory` (local or a URL), at
  the same relative paths; for writers that only write to local disk."""
  for root, _, names in os.walk(local):
    relative = os.path.relpath(root, local)
    target = os.fspath(directory) if relative == '.' else os.path.join(directory, relative)
    makedirs(target)
    for name in names:
      with open(os.path.join(root, name), 'rb') as f:
        write_bytes(os.path.join(target, name), f.read())


def write_json(path, obj: Any, *, sort_keys: bool = False) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + '\n')


def read_json(path) -> Any:
  return json.loads(read_text(path))


def _temporary_sibling(path: str, kind: str) -> str:
  """A new name beside `path` (created by the caller, so with the usual permissions: `tempfile`'s
  would be private to the owner)."""
  directory, name = os.path.split(os.path.abspath(path))
  return os.path.join(directory, f'.{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}')


@contextlib.contextmanager
def atomic_directory(path, *, commit_file: str, parts: tuple[str, ...] = (),
                     overwrite: bool = False) -> Iterator[str]:
  """Yields a directory to fill in place of `path`; the caller writes `commit_file` last.

  `parts`: the other names the caller writes into it. An existing `path` is an error unless
  `overwrite`, or unless it is on Cloud Storage and is an interrupted write (only `parts`, no
  `commit_file`). Locally the directory is a temporary
  sibling, renamed into place on success (an existing one is replaced only once the new one is
  complete). On Cloud Storage it is `path` itself: a replaced directory loses its commit file
  first, and an interrupted one is deleted on an exception, or by the next save if killed.
  """
  if is_remote(path):
    with _remote_directory(os.fspath(path), commit_file, parts, overwrite) as directory:
      yield directory
    return
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


@contextlib.contextmanager
def _remote_directory(url: str, commit_file: str, parts: tuple[str, ...],
                      overwrite: bool) -> Iterator[str]:
  directory = _url(url)
  if directory.is_dir():
    names = {p.name for p in directory.iterdir()}
    interrupted = commit_file not in names and names <= set(parts)
    if not (overwrite or interrupted):
      raise FileExistsError(f'{url} exists; pass overwrite=True to replace it.')
    if commit_file in names:
      (directory / commit_file).unlink()  # from here on no reader takes it for complete
    directory.rmtree()
  try:
    yield url
  except BaseException:
    with contextlib.suppress(Exception):
      directory.rmtree()
    raise
