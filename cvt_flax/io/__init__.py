"""The on-disk formats of cvt-flax, and the one way every entry point loads a model.

  model_dir  the model directory (format 2: architecture, preprocessing, class names, weights)
  workdir    a training workdir read as a model
  trees      pytrees <-> the nested dicts Orbax stores
  hub        released weights on the Hugging Face hub by name
  load       what a path or name holds, `from_pretrained`

The PyTorch formats (official `.pth`, HF) are read and written by `cvt_flax.convert`.
"""
from cvt_flax.io.hub import HubError
from cvt_flax.io.load import (MODEL_DIR, PYTORCH, WORKDIR, detect, from_pretrained,
                              load_checkpoint, resolve)
from cvt_flax.io.model_dir import CheckpointError, FormatNote, ModelDoc, save_model
