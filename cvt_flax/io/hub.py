"""Released CvT weights on the Hugging Face hub, by name: `microsoft/cvt-13`, `org/name@revision`.

Downloads go through `huggingface_hub.snapshot_download` into its cache (HF_HUB_CACHE, default
~/.cache/huggingface/hub), and only the files a CvT needs: config.json, preprocessor_config.json
and model.safetensors, or pytorch_model.bin where a repository has no safetensors (read with
`torch.load(weights_only=True)`). With HF_HUB_OFFLINE=1 or `local_files_only=True` nothing is
fetched: the cache is read as huggingface_hub laid it out.
"""
from __future__ import annotations

import os
import re

from cvt_flax.io.model_dir import CheckpointError
from cvt_flax.models.released import RELEASED

# org/name with an optional @revision (a branch, tag or commit).
_HUB_NAME = re.compile(r'^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$')
_FIRST_CHOICE = ('config.json', 'preprocessor_config.json', 'model.safetensors')
_FALLBACK = ('config.json', 'preprocessor_config.json', 'pytorch_model.bin')
_TRUE = ('1', 'true', 'yes', 'on')



class HubError(CheckpointError):
  """A hub name could not be resolved to files: not cached and not reachable, or unknown."""


def parse_hub_name(ref: str) -> tuple[str, str | None] | None:
  """('org/name', revision or None) if `ref` is written like a hub name, else None."""
  found = _HUB_NAME.match(ref)
  return (found.group('repo'), found.group('revision')) if found else None


def offline() -> bool:
  """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, when it is first imported)."""
  return os.environ.get('HF_HUB_OFFLINE', '').lower() in _TRUE


def download(repo_id: str, *, revision: str | None = None, cache_dir: str | None = None,
             local_files_only: bool = False) -> str:
  """The local snapshot directory of `repo_id` with the files a CvT needs (see the docstring)."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import errors  # pylint: disable=g-import-not-at-top
  local_only = local_files_only or offline()
  # Read now too: huggingface_hub reads HF_HUB_CACHE once, when it is first imported.
  cache_dir = cache_dir or os.environ.get('HF_HUB_CACHE') or None
  where = f'{repo_id}' + (f'@{revision}' if revision else '')
  try:
    for patterns in (_FIRST_CHOICE, _FALLBACK):
      path = huggingface_hub.snapshot_download(
          repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_only,
          allow_patterns=list(patterns))
      if os.path.isfile(os.path.join(path, patterns[-1])):
        return path
  except errors.LocalEntryNotFoundError as e:
    cache = cache_dir or huggingface_hub.constants.HF_HUB_CACHE
    why = ('offline (HF_HUB_OFFLINE=1 or local_files_only)' if local_only
           else 'the hub cannot be reached')
    raise HubError(f'{where}: not in the local hub cache ({cache}) and {why}. Download it once with '
                   'network access (the same call), or pass a local path.') from e
  except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as e:
    raise HubError(f'{where}: no such model or revision on the Hugging Face hub ({e}).') from e
  except errors.HfHubHTTPError as e:
    raise HubError(f'{where}: the hub answered with an error: {e}') from e
  released = ', '.join(r.hub_name for r in RELEASED)
  raise HubError(f'{where}: the repository has neither model.safetensors nor pytorch_model.bin; '
                 f'not a CvT checkpoint (released ones: {released}).')
