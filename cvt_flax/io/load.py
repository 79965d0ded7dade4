"""One checkpoint reference for every entry point: what a path or name holds, and loading it.

A reference is, in this order:
  * an existing local path or `gs://` URL (`cvt_flax.files`):
      - a cvt-flax model directory (config.json with format "cvt_flax.model" + state/),
      - a training workdir (model_config.json + checkpoints/): its newest checkpoint, or one of
        its checkpoints, WORKDIR/checkpoints/<step>: that step,
      - an HF checkpoint directory (config.json of a CvT + model.safetensors / pytorch_model.bin),
      - an official `.pth` (state dict or training checkpoint), or an HF weights file
        (.safetensors / .bin with config.json beside it);
  * a Hugging Face hub name, `org/name` or `org/name@revision` (`cvt_flax.io.hub`).
An existing local path always wins over a hub name of the same spelling, and a reference that can
only be meant as a path is never looked up on the hub: one that starts with `/`, `.` or `~`, has
more than one `/`, ends in a file suffix (`.pth`, `.safetensors`, ...), or names a directory that
exists here (`runs/digitz` where `runs/` exists) is "no such file or directory". PyTorch files at a URL are
copied to a local temporary directory first (torch and the converters read local files).

Which to call: `from_pretrained` for any of these (what the commands use). `load_checkpoint` only
where a reference must be one of cvt-flax's own checkpoints (a model directory or a workdir), so
that anything else is an error rather than a conversion or a download.
"""
from __future__ import annotations

import difflib
import os

from cvt_flax import convert, files
from cvt_flax.io import hub
from cvt_flax.io.model_dir import CONFIG_FILE, FORMAT, STATE_DIR, CheckpointError, load_model_dir
from cvt_flax.io.workdir import is_training_workdir, load_workdir_model, step_directory
from cvt_flax.models import CvT

MODEL_DIR, WORKDIR, PYTORCH = 'cvt-flax model directory', 'training workdir', 'PyTorch checkpoint'


def _is_model_dir(path: str) -> bool:
  config = os.path.join(path, CONFIG_FILE)
  if not files.isfile(config):
    return False
  try:
    return files.read_json(config).get('format') == FORMAT
  except (OSError, ValueError, AttributeError):  # unreadable: let the loader name the problem
    return files.isdir(os.path.join(path, STATE_DIR))


def detect(path: str) -> str:
  """What `path` holds: MODEL_DIR, WORKDIR or PYTORCH (an official or HF file or an HF directory;
  `cvt_flax.convert` tells those apart from the keys)."""
  if files.isdir(path):
    if _is_model_dir(path):
      return MODEL_DIR
    if is_training_workdir(path) or step_directory(path):
      return WORKDIR
  return PYTORCH


def _load(path: str, kind: str, *, spec=None, num_classes: int | None = None,
          activation: str | None = None, image_size: int | None = None,
          step: int | None = None) -> CvT:
  """Loads an existing path holding `kind` (see `detect`) in eval mode.

  `spec`, `num_classes`, `activation`, `image_size` apply to PyTorch sources only (see
  `cvt_flax.convert.load_pytorch`); `step` to training workdirs.
  """
  if kind == MODEL_DIR:
    return load_model_dir(path)
  if kind == WORKDIR:
    workdir, step = step_directory(path) or (path, step)
    return load_workdir_model(workdir, step)
  with files.local_copy(path, convert.SOURCE_FILES) as local:
    return convert.load_pytorch(local, spec=spec, num_classes=num_classes, activation=activation,
                                image_size=image_size)


def load_checkpoint(path, step: int | None = None) -> CvT:
  """A cvt-flax model directory or training workdir (at `step`, default the newest), eval mode;
  anything else is a CheckpointError (`from_pretrained` takes every kind of reference)."""
  path = os.fspath(path)
  if not files.isdir(path):
    what = 'does not exist' if not files.exists(path) else 'is not a directory'
    raise CheckpointError(f'{path} {what}; a cvt-flax model is a directory with {CONFIG_FILE} and '
                          f'{STATE_DIR}/, or a training workdir.')
  kind = detect(path)
  # A directory of neither kind is read as a model directory, whose loader names what is missing.
  return _load(path, WORKDIR if kind == WORKDIR else MODEL_DIR, step=step)


def resolve(ref, *, revision: str | None = None, cache_dir: str | None = None,
            local_files_only: bool = False) -> str:
  """The path a reference stands for: itself if it exists (locally or at its URL), else a hub
  name's local snapshot directory (downloaded, or read from the local hub cache offline)."""
  ref = os.fspath(ref)
  if files.exists(ref):
    return ref
  parsed = hub.parse_hub_name(ref)
  if parsed is None:
    raise FileNotFoundError(f'{ref}: no such file or directory, and not a hub name (org/name).')
  if _meant_as_path(ref):
    raise FileNotFoundError(f'{ref}: no such file or directory{_close_match(ref) or "."}')
  repo_id, pinned = parsed
  if pinned and revision and pinned != revision:
    raise CheckpointError(f'{ref}: two revisions given ({pinned!r} in the name, {revision!r}).')
  return hub.download(repo_id, revision=pinned or revision, cache_dir=cache_dir,
                      local_files_only=local_files_only)


# What a checkpoint file's name ends in; a hub name ending so is taken as a file.
_FILE_SUFFIXES = ('.pth', '.pt', '.bin', '.safetensors', '.json', '.ckpt', '.tar', '.npz')


def _meant_as_path(ref: str) -> bool:
  """Whether a reference written like a hub name can only be meant as a path (module docstring)."""
  name = ref.split('@', 1)[0]
  parent = os.path.dirname(name)
  return (name.startswith(('/', '.', '~')) or name.count('/') > 1
          or name.lower().endswith(_FILE_SUFFIXES) or (bool(parent) and os.path.isdir(parent)))


def _close_match(path: str) -> str:
  """'; did you mean P?' for an existing sibling of `path` spelt alike, else ''."""
  parent, name = os.path.split(path.rstrip('/'))
  if not os.path.isdir(parent or '.'):
    return ''
  close = difflib.get_close_matches(name, os.listdir(parent or '.'), n=1)
  return f'; did you mean {os.path.join(parent, close[0])}?' if close else ''


def from_pretrained(name_or_path, *, revision: str | None = None, cache_dir: str | None = None,
                    local_files_only: bool = False, **options) -> CvT:
  """An eval-mode CvT with its preprocessing (`model.preprocess`) and class names
  (`model.class_names`) from any reference (see the module docstring).

      model = cvt_flax.from_pretrained('microsoft/cvt-13')      # the hub (or its local cache)
      model = cvt_flax.from_pretrained('runs/digits')           # a training workdir

  `revision`, `cache_dir`, `local_files_only`: for hub names (also `org/name@revision`); offline
  (HF_HUB_OFFLINE=1) only the local hub cache is read. `options`: `spec`, `num_classes`,
  `activation`, `image_size` for PyTorch sources (`cvt_flax.convert.load_pytorch`), `step` for
  training workdirs.
  """
  path = resolve(name_or_path, revision=revision, cache_dir=cache_dir,
                 local_files_only=local_files_only)
  return _load(path, detect(path), **options)

