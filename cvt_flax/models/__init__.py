"""CvT models. Knows nothing of training, data, files or conversion."""
from cvt_flax.models.compute import Compute, make_compute
from cvt_flax.models.config import (VARIANTS, CvTConfig, configs_from_official_yaml,
                                    from_official_spec, make_config)
from cvt_flax.models.cvt import (CvT, abstract_model, attention_maps, count_params, create_model,
                                 finish_abstract_model, with_compute)
