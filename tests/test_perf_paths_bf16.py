"""bfloat16 compute: logits close to float32 on the official fixtures, and training that learns."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import cvt_flax
from cvt_flax import preprocess
from cvt_flax.training import steps
from helpers import fixture_model, logits_and_features

# bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%); through 4 blocks the fixture
# logits move by up to 1% of their largest magnitude (measured: 0.6-1.1%, benchmarks/RESULTS.md).
BF16_RELATIVE_LOGIT_BOUND = 0.03


@pytest.mark.parametrize('name', ['official_tiny', 'official_tiny_avg'])
def test_bf16_logits_within_bound_of_fp32(name):
  fp32, meta, io = fixture_model(name, dtype='float32')
  bf16, _, _ = fixture_model(name, dtype='bfloat16')
  for i in range(len(meta['input_shapes'])):
    images = io[f'input_{i}'].transpose(0, 2, 3, 1)
    reference, low = logits_and_features(fp32, images)[0], logits_and_features(bf16, images)[0]
    assert low.dtype == jnp.float32  # logits come back in float32 whatever the compute dtype
    assert np.abs(low - reference).max() <= BF16_RELATIVE_LOGIT_BOUND * np.abs(reference).max()
    # ...and bf16 really computed something different (the dtype is not silently ignored).
    assert np.abs(low - reference).max() > 1e-5


def test_bf16_training_steps_run_and_reduce_loss():
  model = cvt_flax.create_model('tiny', num_classes=4, rngs=nnx.Rngs(0), dtype='bfloat16')
  model.train()
  # Four classes told apart by which image quadrant is bright.
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, 32)
  images = rng.normal(0, 0.3, (32, 16, 16, 3)).astype(np.float32)
  for n, label in enumerate(labels):
    r, c = divmod(int(label), 2)
    images[n, 8 * r:8 * r + 8, 8 * c:8 * c + 8] += 1.5

  # The trainer's own step, without mixup and label smoothing.
  tx = optax.adamw(3e-3)
  step = jax.jit(steps.make_train_step(nnx.graphdef(model), tx, optax.constant_schedule(3e-3),
                                       num_classes=4, mixup=dict(prob=0.0, label_smoothing=0.0),
                                       seed=0, **preprocess.PASS_THROUGH))
  state = steps.init_train_state(model, tx)
  batch = {'image': jnp.asarray(images), 'label': jnp.asarray(labels, jnp.int32)}
  losses = []
  for _ in range(30):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
  # Master weights stay float32; only the computation is bf16.
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
