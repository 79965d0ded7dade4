"""cvt-flax: CvT in JAX/Flax NNX with exact PyTorch weight parity."""
# First, before anything starts a JAX backend (see the module).
from cvt_flax.runtime.tpu_backend import skip_tpu_backend_without_chips

skip_tpu_backend_without_chips()

from cvt_flax.models import (VARIANTS, Compute, CvT, CvTConfig, configs_from_official_yaml,
                             count_params, create_model, make_config, with_compute)
from cvt_flax.preprocess import Preprocess
from cvt_flax.convert import load_pytorch
from cvt_flax.io import from_pretrained, load_checkpoint, save_model
