"""The `onnx` format: the model as an ONNX graph, written by PyTorch's exporter from this
repository's PyTorch reference model (`convert/torch_reference.py`) holding the model's weights.

    OUT/model.onnx   the graph: input "images" (batch, height, width, 3) -> output "logits"
    OUT/model.json   the model document (`spec.model_doc`)

Why this route: the reference model is the official architecture in plain PyTorch, already held
equal to cvt-flax by the conversion tests (1e-5 on the released layouts), and its activations,
convolution paddings and attention scale are the exact ones (QuickGELU as x * sigmoid(1.702 x);
erf GELU, which the exporter writes as ONNX's exact `Gelu`). `torch.onnx.export` (torch.export, then
onnxscript's translation) is the converter PyTorch maintains, so the graph follows the ONNX
standard as it moves. The other routes were a third copy of the model written node by node with
`onnx.helper` (one more place for every model change), tf2onnx through a SavedModel (an XLA
program does not translate to ONNX ops), and jax2onnx (it pins an older orbax-checkpoint).

The graph is float32 (onnxruntime's CPU kernels have no bfloat16 convolutions), with a dynamic
batch unless one is fixed; the height and width are fixed at export. Needs the `torch` and
`export` extras.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import onnx
import torch

from cvt_flax import files, logs
from cvt_flax.convert import official, torch_reference
from cvt_flax.export import spec as spec_lib
from cvt_flax.models import CvT

PROGRAM_FILE = 'model.onnx'
PARTS = (PROGRAM_FILE,)  # what `write` puts beside model.json
FORMAT = 'cvt_flax.onnx'  # model.json's "format"
INPUT_NAME, OUTPUT_NAME = 'images', 'logits'


class ServingModule(torch.nn.Module):
  """The reference model behind the serving input: NHWC images, or uint8 pixels normalised in the
  graph in `Preprocess.normalize`'s order (x / 255, minus mean, over std)."""

  def __init__(self, net: torch.nn.Module, spec: spec_lib.ServingSpec):
    super().__init__()
    self.net, self.pixels = net, spec.input == 'uint8'
    self.register_buffer('mean', torch.tensor(spec.preprocess.mean, dtype=torch.float32))
    self.register_buffer('std', torch.tensor(spec.preprocess.std, dtype=torch.float32))

  def forward(self, images):
    if self.pixels:
      images = (images.to(torch.float32) / 255.0 - self.mean) / self.std
    return self.net(images.permute(0, 3, 1, 2))


def reference_module(model: CvT, spec: spec_lib.ServingSpec) -> ServingModule:
  """The PyTorch reference model with `model`'s weights, in eval mode, behind the serving input."""
  net = torch_reference.build_reference_model(model.config)
  state = {k: torch.from_numpy(np.array(v))  # a writable copy, as torch wants
           for k, v in official.to_official_state_dict(model).items()}
  net.load_state_dict(state, strict=True)
  return ServingModule(net, spec).eval()


def export_graph(model: CvT, spec: spec_lib.ServingSpec) -> onnx.ModelProto:
  """`model`'s forward pass as an ONNX model (see the module docstring)."""
  if spec.dtype != 'float32':
    raise spec_lib.ExportError(f"onnx: dtype {spec.dtype!r}: the graph is float32 only "
                               "(onnxruntime's CPU kernels have no bfloat16 convolutions); "
                               "use --format jax for bfloat16.")
  # A batch of 2 to trace: torch.export specialises sizes 0 and 1.
  batch = 2 if spec.batch is None else spec.batch
  images = torch.zeros((batch, spec.height, spec.width, 3), dtype=getattr(torch, spec.input))
  dynamic = None if spec.batch else ({0: torch.export.Dim('batch')},)
  # Ordinary operation reported as warnings: optional torchvision ops not registered, and
  # torch.export's own use of a pytree API it has deprecated.
  logs.drop_messages('torch.onnx._internal.exporter._registration', 'torchvision is not installed')
  with warnings.catch_warnings(), torch.no_grad():
    warnings.filterwarnings('ignore', r'`isinstance\(treespec, LeafSpec\)` is deprecated',
                            FutureWarning)
    program = torch.onnx.export(reference_module(model, spec), (images,), dynamo=True,
                                dynamic_shapes=dynamic, input_names=[INPUT_NAME],
                                output_names=[OUTPUT_NAME], verbose=False)
  graph = program.model_proto
  # The exporter's debugging notes on every node (the Python stack that made it, with this
  # machine's paths): nothing a runtime reads, and half the file of a small model.
  for node in graph.graph.node:
    del node.metadata_props[:]
  return graph


def write(model: CvT, directory: str, spec: spec_lib.ServingSpec) -> dict:
  """Writes OUT/model.onnx into `directory`; returns model.json's "program"."""
  graph = export_graph(model, spec)
  files.write_bytes(os.path.join(directory, PROGRAM_FILE), graph.SerializeToString())
  opset = next(o.version for o in graph.opset_import if o.domain in ('', 'ai.onnx'))
  return {'file': PROGRAM_FILE, 'serialization': 'onnx', 'opset': opset,
          'input_name': INPUT_NAME, 'output_name': OUTPUT_NAME,
          'producer': f'torch {torch.__version__}, onnx {onnx.__version__}'}
