"""cvt-flax: CvT in JAX/Flax NNX with exact PyTorch weight parity."""
from cvt_flax.models import (VARIANTS, CvT, CvTConfig, configs_from_official_yaml, count_params,
                             create_model, make_config)
