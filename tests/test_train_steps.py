"""Train/eval step functions: gradient accumulation equals the big-batch step; masked eval sums."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cvt_flax import preprocess
from cvt_flax.models import create_model
from cvt_flax.preprocess import IMAGENET_MEAN, IMAGENET_STD
from cvt_flax.runtime import eval_step
from cvt_flax.training import steps
from helpers import TINY_MODEL

MIXUP = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0, label_smoothing=0.1)
# BatchNorm statistics depend on the (micro)batch and dropout on the RNG stream position, so the
# equality check uses a model with neither: `avg` projections (no BatchNorm), no dropout.
NO_BN_NO_DROPOUT = dict(TINY_MODEL, qkv_proj_method=('avg', 'avg'), drop_rate=(0.0, 0.0),
                        drop_path_rate=(0.0, 0.0))


def _setup(model_fields, tx):
  model = create_model(model_fields, num_classes=10, rngs=nnx.Rngs(params=0, dropout=1))
  graphdef = nnx.graphdef(model)
  return graphdef, steps.init_train_state(model, tx)


def _batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  return {'image': jnp.asarray(rng.normal(size=(n, 16, 16, 3)), jnp.float32),
          'label': jnp.asarray(rng.integers(0, 10, n), jnp.int32)}


def _pixels(n, seed):
  """A batch as the input pipeline makes it: uint8 pixels."""
  rng = np.random.default_rng(seed)
  return {'image': jnp.asarray(rng.integers(0, 256, (n, 16, 16, 3)), jnp.uint8),
          'label': jnp.asarray(rng.integers(0, 10, n), jnp.int32)}


def _step(graphdef, tx, state, batch, accum):
  fn = steps.make_train_step(graphdef, tx, optax.constant_schedule(1.0), num_classes=10,
                             mixup=MIXUP, seed=3, grad_accum_steps=accum,
                             **preprocess.PASS_THROUGH)
  return jax.jit(fn)(state, batch)


def test_grad_accumulation_equals_big_batch():
  tx = optax.sgd(1.0)  # new params = params - grads: the update exposes the gradient itself
  graphdef, state = _setup(NO_BN_NO_DROPOUT, tx)
  batch = _batch()
  big, m_big = _step(graphdef, tx, state, batch, 1)
  acc, m_acc = _step(graphdef, tx, state, batch, 4)
  # float32 sums in another order: equal to ~1e-7 relative, not bitwise.
  np.testing.assert_allclose(m_acc['loss'], m_big['loss'], rtol=1e-6)
  np.testing.assert_allclose(m_acc['grad_norm'], m_big['grad_norm'], rtol=1e-5)
  grads_big = jax.tree.map(jnp.subtract, state.params, big.params)
  grads_acc = jax.tree.map(jnp.subtract, state.params, acc.params)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_big))
  for g_acc, g_big in zip(jax.tree.leaves(grads_acc), jax.tree.leaves(grads_big)):
    np.testing.assert_allclose(g_acc, g_big, atol=1e-5 * scale)
  assert int(acc.step) == int(big.step) == 1


def _leaves_named(state, name):
  return [np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state) if path[-1] == name]


def test_grad_accumulation_updates_batchnorm_per_microbatch():
  tx = optax.sgd(0.1)
  graphdef, state = _setup(TINY_MODEL, tx)
  new, metrics = _step(graphdef, tx, state, _batch(), 4)
  counts = _leaves_named(new.batch_stats, 'num_batches_tracked')
  assert counts and all(c == 4 for c in counts)  # one BatchNorm update per microbatch
  assert np.isfinite(metrics['loss'])
  # The streams of the active dropouts (rate > 0) advanced by their calls per forward pass (the
  # MLP's dropout runs twice) times 4 microbatches, the others not at all.
  before, after = _leaves_named(state.rngs, 'count'), _leaves_named(new.rngs, 'count')
  advanced = {int(a) - int(b) for a, b in zip(after, before)}
  assert advanced == {0, 4, 8}


def test_eval_step_counts_only_masked_examples():
  tx = optax.sgd(0.1)
  model = create_model(TINY_MODEL, num_classes=10, rngs=nnx.Rngs(0))
  _, state = _setup(TINY_MODEL, tx)
  model.eval()
  eval_fn = jax.jit(eval_step.make_eval_step(nnx.graphdef(model), mean=IMAGENET_MEAN,
                                              std=IMAGENET_STD))
  batch = _pixels(12, seed=5)
  mask = np.array([1] * 9 + [0] * 3, np.float32)
  sums = eval_fn(steps.model_variables(state), dict(batch, mask=jnp.asarray(mask)))
  nnx.update(model, state.params, state.batch_stats)
  inputs = preprocess.normalize(batch['image'], IMAGENET_MEAN, IMAGENET_STD)
  logits = np.asarray(nnx.jit(lambda model, x: model(x))(model, inputs))  # eager: ~40 s
  labels = np.asarray(batch['label'])
  top5 = np.argsort(-logits, axis=1)[:, :5]
  assert float(sums['count']) == 9
  assert float(sums['top1']) == np.sum((top5[:, 0] == labels) * mask)
  assert float(sums['top5']) == np.sum(np.any(top5 == labels[:, None], axis=1) * mask)
  log_p = logits - np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1,
                                 keepdims=True)) - logits.max(1, keepdims=True)
  want_loss = -np.sum(log_p[np.arange(12), labels] * mask)
  np.testing.assert_allclose(float(sums['loss']), want_loss, rtol=1e-5)
