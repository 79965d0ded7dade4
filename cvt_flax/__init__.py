"""cvt-flax: CvT in JAX/Flax NNX with exact PyTorch weight parity."""
from cvt_flax.models import (VARIANTS, CvT, CvTConfig, configs_from_official_yaml, count_params,
                             create_model, make_config)
from cvt_flax.checkpoint import load_checkpoint, save_model
from cvt_flax.convert import load_pytorch
