"""Weight conversion between the official / HF PyTorch CvT and the Flax CvT.

Importing this package does not import torch; only reading or writing `.pth`/`.bin` files does.
The PyTorch reference model lives in `cvt_flax.convert.torch_reference` (imports torch).
"""
from cvt_flax.convert.hf import (config_from_hf, config_to_hf, hf_to_official_state_dict,
                                 official_to_hf_state_dict)
from cvt_flax.convert.infer import infer_config
from cvt_flax.convert.official import (ConversionError, load_official_state_dict,
                                       to_official_state_dict)
from cvt_flax.convert.pytorch import load_pytorch, read_spec, save_hf, save_official
from cvt_flax.convert.sources import SOURCE_FILES, read_source
