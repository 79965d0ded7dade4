"""cvt-flax: CvT in JAX/Flax NNX with exact PyTorch weight parity.

Importing it changes nothing global: JAX's platforms are the caller's (the commands choose theirs
with `cvt_flax.runtime.platforms`), and TensorFlow is imported only by `cvt_flax.data`.
"""
from cvt_flax.models import (VARIANTS, Compute, CvT, CvTConfig, configs_from_official_yaml,
                             count_params, create_model, make_config, with_compute)
from cvt_flax.preprocess import Preprocess
from cvt_flax.convert import load_pytorch
from cvt_flax.io import from_pretrained, load_checkpoint, save_model
