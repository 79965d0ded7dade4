"""The errors a user can fix, and the one way every command reports them.

Every failure caused by the input rather than by a bug (a file, key, shape, field, flag, dataset,
disk or missing package) raises a subclass of `CvtFlaxError` whose message names the problem and
the fix. Every command (`train.py`, `predict`, `evaluate`, `convert`, `export`, `aot`, `flops`)
runs its work inside `reported()`: such an error becomes one line on stderr, `error: ...`, and exit
status 2 (the status argparse gives a bad flag); anything else is a bug and keeps its traceback. A
`Note` the library warns with becomes one `note: ...` line there.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Iterator, NoReturn


class CvtFlaxError(Exception):
  """A problem with the input; the message names it (file, key, shape, field) and the fix."""


class ConfigError(CvtFlaxError, ValueError):
  """A config field (or command-line flag) has a value that cannot work; the message names it."""


class MissingExtraError(CvtFlaxError, ImportError):
  """A feature needs a package of an optional extra that is not installed."""


class Note(UserWarning):
  """Something a user should know that is not an error (an older file format read with the
  defaults it implies): a warning in Python, one `note: ...` line from the commands."""


# What the commands report as one line. FileNotFoundError: a path given on the command line.
EXPECTED_ERRORS = (CvtFlaxError, FileNotFoundError)
# The exit status of a command stopped by a user's mistake (argparse's for a bad flag).
USER_ERROR_STATUS = 2


def fail(message) -> NoReturn:
  """Ends a command: `error: message` as one line on stderr, exit status USER_ERROR_STATUS."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(USER_ERROR_STATUS)


_show_warning = warnings.showwarning  # Python's own, for every warning but a Note


def _print_note(message, category, filename, lineno, file=None, line=None):
  if issubclass(category, Note):
    print(f'note: {message}', file=sys.stderr, flush=True)
  else:
    _show_warning(message, category, filename, lineno, file, line)


@contextlib.contextmanager
def reported() -> Iterator[None]:
  """A command's work: an expected error ends it through `fail`, a `Note` prints as one line;
  anything else (a bug) propagates with its traceback."""
  with warnings.catch_warnings():
    warnings.showwarning = _print_note
    try:
      yield
    except EXPECTED_ERRORS as e:
      fail(e)

# The optional extras of pyproject.toml, by what they are for.
EXTRAS = {
    'train': 'training, the TFDS / tf.data input pipelines and `python -m cvt_flax.evaluate`',
    'torch': 'reading and writing PyTorch `.pth` / `.bin` files and `convert --check`',
    'gcs': '`gs://` paths (workdirs, models)',
    'export': 'the ONNX and TF SavedModel exports (`python -m cvt_flax.export --format ...`)',
    'tpu': ("compiling for TPU slices (`python -m cvt_flax.aot`, libtpu at the version jax's own "
            "`tpu` extra pins)"),
}


def missing_extra(error: ModuleNotFoundError, extra: str) -> MissingExtraError:
  """The one-line error for a package of `extra` that an import did not find."""
  return MissingExtraError(f'{error.name} is not installed; {EXTRAS[extra]} need it: '
                           f"pip install 'cvt-flax[{extra}]'")


def require_installed(extra: str, *modules: str) -> None:
  """Raises MissingExtraError for the first of `modules` that is not installed (imports nothing)."""
  for module in modules:
    if importlib.util.find_spec(module) is None:
      raise missing_extra(ModuleNotFoundError(name=module), extra)


def require(module: str, extra: str) -> ModuleType:
  """`importlib.import_module(module)`, or one MissingExtraError naming the extra to install.

  The one way cvt-flax imports what an optional extra provides, where the core install must keep
  working without it (the only imports inside functions)."""
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    if not e.name or e.name.startswith('cvt_flax'):
      raise  # a bug, not a missing package
    raise missing_extra(e, extra) from e
