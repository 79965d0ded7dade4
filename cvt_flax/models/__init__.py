"""CvT models. Knows nothing of training, data or conversion."""
from cvt_flax.models.compile import compiler_options, release_freed_memory
from cvt_flax.models.config import (VARIANTS, CvTConfig, configs_from_official_yaml,
                                    from_official_spec, make_config)
from cvt_flax.models.cvt import CvT, attention_maps, count_params, create_model
