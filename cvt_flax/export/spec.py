"""What every export format shares: the settings of one export (`ServingSpec`), the JAX serving
function the `jax` and `savedmodel` formats lower, and the model document written beside each."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cvt_flax import preprocess as preprocess_lib
from cvt_flax.errors import CvtFlaxError
from cvt_flax.io.model_dir import ModelDoc
from cvt_flax.models import CvT, with_compute
from cvt_flax.models.compute import DTYPES, Compute

DOC_FILE = 'model.json'
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')  # jax.export's names
INPUTS = ('float32', 'uint8')
# The plain XLA paths of the model (one grouped convolution per depthwise conv, attention
# normalised after the product with v) for a program lowered for several platforms: the CPU
# paths would be slower elsewhere. A CPU-only program takes the CPU paths, as `model(x)` does on
# CPU. Either way the same function as `model(x)` up to float rounding.
PORTABLE_COMPUTE = Compute(dwconv_impl='xla', attention_impl='deferred', mlp_impl='xla',
                           fusion_barrier=False, per_token_linear=False, remat='none')
CPU_COMPUTE = Compute(dwconv_impl='auto', attention_impl='deferred', mlp_impl='xla',
                      fusion_barrier=None, per_token_linear=None, remat='none')


class ExportError(CvtFlaxError, ValueError):
  """An export that cannot be made as asked; the message says which setting and why."""


@dataclasses.dataclass(frozen=True)
class ServingSpec:
  """One export's settings, checked: the program's input is (batch, height, width, 3) NHWC,
  float32 normalised as the model's preprocess makes it, or `input='uint8'`: pixels 0-255 already
  resized and cropped to (height, width), normalised inside the program."""
  batch: int | None  # None: any batch size (symbolic / dynamic)
  height: int
  width: int
  preprocess: preprocess_lib.Preprocess  # the model's own, else the official one at `height`
  dtype: str = 'float32'  # the compute dtype; inputs (float32 or uint8) and logits (float32) aside
  platforms: tuple[str, ...] = ('cpu',)
  input: str = 'float32'

  @classmethod
  def of(cls, model: CvT, *, batch: int | None = None, image_size=None, dtype: str = 'float32',
         platforms: Sequence[str] = ('cpu',), input: str = 'float32') -> 'ServingSpec':
    """`image_size`: an int, (height, width), or None (the model's preprocess size, else 224)."""
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown or not platforms:
      raise ExportError(f'platforms {list(platforms)}: expected some of {PLATFORMS}.')
    if batch is not None and batch < 1:
      raise ExportError(f'batch {batch}: expected a positive batch size, or None (any).')
    if input not in INPUTS:
      raise ExportError(f'input {input!r}: expected one of {INPUTS}.')
    if dtype not in DTYPES:
      raise ExportError(f'dtype {dtype!r}: expected {" or ".join(map(repr, DTYPES))}.')
    if image_size is None:
      image_size = model.preprocess.image_size if model.preprocess else 224
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    preprocess = model.preprocess or preprocess_lib.official_eval(int(height))
    return cls(batch, int(height), int(width), preprocess, dtype, tuple(platforms), input)

  def input_doc(self) -> dict[str, Any]:
    return {'layout': 'NHWC', 'dtype': self.input, 'normalised': self.input == 'float32',
            'shape': [self.batch, self.height, self.width, 3]}


def serving_function(model: CvT, spec: ServingSpec) -> tuple[Callable, nnx.State]:
  """(apply, weights): `apply(weights, images)` is the eval-mode forward pass as `spec` asks
  (uint8 pixels normalised first; float32 logits), in plain JAX; `weights` are the model's
  parameters and batch statistics."""
  preset = CPU_COMPUTE if spec.platforms == ('cpu',) else PORTABLE_COMPUTE
  model = with_compute(model, preset, dtype=spec.dtype, platform=spec.platforms[0])
  model.eval()
  graphdef, weights, rest = nnx.split(model, (nnx.Param, nnx.BatchStat), ...)

  def apply(weights, images):
    if spec.input == 'uint8':
      images = spec.preprocess.normalize(images.astype(jnp.float32))
    return nnx.merge(graphdef, weights, rest)(images).astype(jnp.float32)
  return apply, weights


def model_doc(model: CvT, spec: ServingSpec, format_tag: str, program: dict[str, Any]) -> dict:
  """model.json: a model directory's document (architecture, preprocess, class names) tagged
  with the export's format, and "program": how to call what was written."""
  doc = dict(ModelDoc.of(model, preprocess=spec.preprocess).to_json(), format=format_tag)
  doc['program'] = dict(program, input=spec.input_doc(), compute_dtype=spec.dtype,
                        output={'dtype': 'float32',
                                'shape': [spec.batch, model.config.num_classes]})
  return doc


def input_struct(spec: ServingSpec, batch) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((batch, spec.height, spec.width, 3), jnp.dtype(spec.input))
