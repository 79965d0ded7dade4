"""Class names: what a model's output indices mean.

A model carries its names when its source has them (HF `id2label`, TFDS label names, image-folder
class directories). Official `.pth` files have none; their 1000-class heads are ImageNet-1k, whose
names (in the standard index order, as HF's `id2label` of the released models) ship here.
"""
from __future__ import annotations

import functools
import pathlib
import re
from typing import Mapping, Sequence

IMAGENET_NUM_CLASSES = 1000
_PLACEHOLDER = re.compile(r'^LABEL_\d+$')  # transformers' names for unnamed classes


@functools.cache
def imagenet_class_names() -> tuple[str, ...]:
  return tuple(pathlib.Path(__file__).with_name('imagenet_classes.txt').read_text().splitlines())


def from_id2label(id2label: Mapping | None, num_classes: int) -> tuple[str, ...] | None:
  """HF's id2label ({"0": "tench, ...", ...}) as names in index order; None if it only holds
  transformers' placeholders (LABEL_0, ...) or does not cover the classes."""
  if not id2label:
    return None
  names = {int(k): str(v) for k, v in id2label.items()}
  if sorted(names) != list(range(num_classes)):
    return None
  ordered = tuple(names[i] for i in range(num_classes))
  return None if all(_PLACEHOLDER.match(n) for n in ordered) else ordered


def checked(names: Sequence[str] | None, num_classes: int, source: str) -> tuple[str, ...] | None:
  """`names` as a tuple of strings, after checking there is one per class."""
  if names is None:
    return None
  names = tuple(str(n) for n in names)
  if len(names) != num_classes:
    raise ValueError(f'{source}: {len(names)} class names for a model with {num_classes} classes.')
  return names


def display_names(names: Sequence[str] | None, num_classes: int) -> list[str]:
  """Names to show for a model's outputs: its own, else the class indices."""
  return list(names) if names else [str(i) for i in range(num_classes)]
