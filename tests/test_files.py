"""The shared plumbing: atomic writes, quiet library logs, errors that name the missing extra."""
import logging
import os
import stat

import numpy as np
import orbax.checkpoint as ocp
import pytest

from cvt_flax import errors, files, logs
from cvt_flax.training import checkpointing


def _siblings(path):
  return sorted(os.listdir(os.path.dirname(path)))


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / 'doc.json'
  files.write_json(path, {'version': 1})

  def dies_half_way(tmp):
    with open(tmp, 'w') as f:
      f.write('{"version": ')
    raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    files.atomic_write(path, dies_half_way)
  assert path.read_text() == '{\n  "version": 1\n}\n'
  assert _siblings(path) == ['doc.json']


def test_written_files_and_directories_get_the_usual_permissions(tmp_path):
  """As a plain open() / mkdir() would make them, even where the writing library (safetensors,
  tempfile) makes its files private to the owner."""
  umask = os.umask(0o022)
  try:
    files.atomic_write(tmp_path / 'weights', lambda tmp: os.close(os.open(tmp, os.O_CREAT, 0o600)))
    with files.atomic_directory(tmp_path / 'model', commit_file='config.json') as tmp:
      files.write_text(os.path.join(tmp, 'config.json'), '{}')
  finally:
    os.umask(umask)
  assert stat.S_IMODE(os.stat(tmp_path / 'weights').st_mode) == 0o644
  assert stat.S_IMODE(os.stat(tmp_path / 'model').st_mode) == 0o755
  assert stat.S_IMODE(os.stat(tmp_path / 'model' / 'config.json').st_mode) == 0o644


def test_a_directory_is_replaced_only_once_the_new_one_is_complete(tmp_path):
  path = tmp_path / 'model'
  with files.atomic_directory(path, commit_file='a') as tmp:
    files.write_text(os.path.join(tmp, 'a'), 'old')
  with pytest.raises(FileExistsError):
    with files.atomic_directory(path, commit_file='a'):
      pass
  with pytest.raises(RuntimeError):
    with files.atomic_directory(path, commit_file='a', overwrite=True) as tmp:
      files.write_text(os.path.join(tmp, 'a'), 'new')
      raise RuntimeError('killed')
  assert (path / 'a').read_text() == 'old' and _siblings(path) == ['model']
  with files.atomic_directory(path, commit_file='a', overwrite=True) as tmp:
    files.write_text(os.path.join(tmp, 'a'), 'new')
  assert (path / 'a').read_text() == 'new' and _siblings(path) == ['model']


def test_reading_checkpoints_logs_nothing_for_the_user(tmp_path, caplog):
  """Orbax warns that a read-only manager creates nothing: normal operation, silenced by name."""
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.save(3, args=ocp.args.StandardSave({'w': np.ones(2)}))
  with caplog.at_level(logging.INFO):
    assert checkpointing.complete_steps(tmp_path / 'ckpt') == [3]
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    logging.getLogger('absl').warning('Given directory is writable, but the disk is full')
  assert len(caplog.records) == 1  # the filter drops its own messages only


def test_native_stderr_drops_named_lines_and_keeps_the_rest(capfd):
  with logs.native_stderr_without(r'custom operations are on'):
    os.write(2, b'oneDNN custom operations are on.\nE a real problem\n')
  assert capfd.readouterr().err == 'E a real problem\n'


def test_a_missing_extra_is_one_error_naming_it():
  with pytest.raises(errors.MissingExtraError, match=r"^no_such_package is not installed; .* "
                     r"pip install 'cvt-flax\[torch\]'$"):
    errors.require('no_such_package', 'torch')
  with pytest.raises(errors.MissingExtraError, match=r"pip install 'cvt-flax\[train\]'"):
    errors.require_installed('train', 'json', 'no_such_package')
  assert issubclass(errors.MissingExtraError, errors.EXPECTED_ERRORS)
