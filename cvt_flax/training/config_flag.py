"""The `--config` flag of `train.py` and `python -m cvt_flax.aot`, and its mistakes as one line.

    --config configs/FILE.py[:ARG]  --config.<field>=<value> ...

ml_collections' config flag loads the file, calls `get_config(ARG)`, locks the config and applies
the overrides. Its errors surface in three places (a missing file only when the config is first
read, a misspelt field as an AttributeError, a bad ARG as absl's flag error with the config's
traceback inside), so `parse_flags` parses the command line and reads the config at once and turns
each of a user's mistakes into `errors.fail`'s one line: the flag, what is wrong and the fix. A
config file that raises anything but a `CvtFlaxError` (a bug in it) keeps its traceback.
"""
from __future__ import annotations

import os
import re

from absl import flags
from ml_collections import config_flags

from cvt_flax import errors

_NAME = 'config'
_SUGGESTION = re.compile(r'Did you mean "([^"]+)"')


def define_config_flag() -> flags.FlagHolder:
  """The locked `--config` flag (a config file, `:ARG` passed to its `get_config`)."""
  return config_flags.DEFINE_config_file(
      _NAME, None, 'Training config file, configs/FILE.py[:ARG]; --config.<field>=<value> '
      'overrides a field.', lock_config=True)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (`app.run(main, flags_parser=parse_flags)`), which also loads the config;
  a user's mistake ends the command with one `error:` line."""
  try:
    rest = flags.FLAGS(argv)
    if flags.FLAGS[_NAME].value is not None:
      flags.FLAGS[_NAME].value.get('seed')  # a file that failed to load raises only when read
    return rest
  except flags.Error as e:
    cause = _user_error_in(e)
    if cause is None and 'Error whilst parsing config file' in str(e):
      raise  # the config file itself raised: a bug in it, with its traceback
    errors.fail(cause or f'{e} (--helpfull lists the flags).')
  except AttributeError as e:  # ml_collections' locked ConfigDict: a field that does not exist
    field = _missing_field(e)
    if field is None:
      raise
    errors.fail(_misspelt_field_message(field, e, argv))
  except OSError as e:  # ml_collections could not load the file
    errors.fail(_unloadable_file_message(_config_argument(argv), e))


def _user_error_in(error: BaseException) -> errors.CvtFlaxError | None:
  """The CvtFlaxError that a config raised (e.g. for a bad ARG) behind `error`, if any: the
  innermost, as ml_collections re-raises it with the traceback in its message."""
  found = None
  while error is not None:
    if isinstance(error, errors.CvtFlaxError):
      found = error
    error = error.__cause__ or error.__context__
  return found


def _missing_field(error: BaseException) -> str | None:
  """The field name of the KeyError behind a locked ConfigDict's AttributeError."""
  while error is not None:
    if isinstance(error, KeyError) and error.args and re.fullmatch(r'\w+', str(error.args[0])):
      return error.args[0]
    error = error.__cause__ or error.__context__
  return None


def _misspelt_field_message(field: str, error: AttributeError, argv: list[str]) -> str:
  prefix = f'--{_NAME}.'
  flag = next((a.split('=', 1)[0] for a in argv
               if a.startswith(prefix) and field in a.split('=', 1)[0][len(prefix):].split('.')),
              f'{prefix}...{field}')
  suggestion = _SUGGESTION.search(str(error))
  hint = (f'did you mean {flag[:flag.rfind(".") + 1]}{suggestion.group(1)}?' if suggestion
          else 'the config file lists its fields (cvt_flax/training/config.py the shared ones).')
  return f'{flag}: the config has no field {field!r}; {hint}'


def _config_argument(argv: list[str]) -> str:
  """FILE[:ARG] as given to --config (`--config X` or `--config=X`)."""
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{_NAME}='):
      return arg.split('=', 1)[1]
    if arg == f'--{_NAME}' and i + 1 < len(argv):
      return argv[i + 1]
  return ''


def _unloadable_file_message(config_argument: str, error: OSError) -> str:
  path = config_argument.split(':', 1)[0]
  if os.path.isfile(path):  # the file exists but raised OSError while loading: say what it said
    return f'--{_NAME} {path}: cannot load it: {error.__cause__ or error}'
  folder = os.path.dirname(path) or '.'
  found = sorted(f for f in os.listdir(folder) if f.endswith('.py')) if os.path.isdir(folder) else []
  available = (f'; {folder}/ has {", ".join(found)}' if found else '')
  return f'--{_NAME} {path}: no such config file{available}.'
