"""Library log lines that describe normal operation, silenced by name where they arise.

The commands print what the user asked for. A library line that reports ordinary work (Orbax
opening a checkpoint directory read-only, TensorFlow announcing its CPU kernels, TFDS calling a
TensorFlow API that TensorFlow has deprecated) is dropped by matching its text; every other
warning, and every error, still reaches the user.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from typing import Iterator


def _any_of(patterns) -> str:
  return '|'.join(f'(?:{p})' for p in patterns)


class _DropMatching(logging.Filter):
  def __init__(self, patterns: tuple[str, ...]):
    super().__init__()
    self.patterns = patterns
    self.pattern = re.compile(_any_of(patterns))

  def filter(self, record: logging.LogRecord) -> bool:
    return not self.pattern.search(record.getMessage())


def drop_messages(logger_name: str, *patterns: str) -> None:
  """Drops the records of `logger_name` whose message matches one of the regular expressions.
  Called where the messages arise, not at import; calling it again with the same patterns adds
  nothing."""
  logger = logging.getLogger(logger_name)
  if not any(getattr(f, 'patterns', None) == patterns for f in logger.filters):
    logger.addFilter(_DropMatching(patterns))


@contextlib.contextmanager
def native_stderr_without(*patterns: str) -> Iterator[None]:
  """Runs the block with file descriptor 2 captured, then writes back every captured line that
  matches none of `patterns` (for lines that C++ code writes straight to the descriptor)."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      pattern = re.compile(_any_of(patterns).encode())
      kept = [line for line in captured.read().splitlines(keepends=True)
              if not pattern.search(line)]
      if kept:
        sys.stderr.buffer.write(b''.join(kept))
        sys.stderr.flush()
