"""The released CvT models: the one list that the hub code, the FLOPs table and the README use.

Each entry is a Hugging Face hub name with the architecture, resolution and pre-training data of
its weights, and the paper's figures for it (Wu et al. 2021, Tables 2 and 3): ImageNet-1k top-1,
parameters in millions and GMACs at that resolution.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Released:
  hub_name: str
  variant: str        # a key of VARIANTS
  image_size: int     # the resolution of the weights and of their evaluation
  pretraining: str    # 'ImageNet-1k' or 'ImageNet-22k'
  top1: float         # the paper's ImageNet-1k top-1 (%)
  params_m: int       # the paper's parameter count (millions)
  gmacs: float        # the paper's multiply-adds per image (billions) at image_size


RELEASED = (
    Released('microsoft/cvt-13', 'cvt-13', 224, 'ImageNet-1k', 81.6, 20, 4.5),
    Released('microsoft/cvt-21', 'cvt-21', 224, 'ImageNet-1k', 82.5, 32, 7.1),
    Released('microsoft/cvt-13-384', 'cvt-13', 384, 'ImageNet-1k', 83.0, 20, 16.3),
    Released('microsoft/cvt-21-384', 'cvt-21', 384, 'ImageNet-1k', 83.3, 32, 24.9),
    Released('microsoft/cvt-13-384-22k', 'cvt-13', 384, 'ImageNet-22k', 83.3, 20, 16.3),
    Released('microsoft/cvt-21-384-22k', 'cvt-21', 384, 'ImageNet-22k', 84.9, 32, 24.9),
    Released('microsoft/cvt-w24-384-22k', 'cvt-w24', 384, 'ImageNet-22k', 87.7, 277, 193.2),
)


def paper_cost() -> dict[tuple[str, int], tuple[int, float]]:
  """(variant, image size) -> (parameters in millions, GMACs), as in the paper's Table 2."""
  return {(r.variant, r.image_size): (r.params_m, r.gmacs) for r in RELEASED}
