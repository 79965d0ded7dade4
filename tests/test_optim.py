"""Optimizer of the official recipe: weight-decay mask, lr schedule, linear lr scaling."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cvt_flax.models import create_model
from cvt_flax.training import optim

TINY = dict(variant='tiny', dim_embed=(8, 16), drop_path_rate=(0.0, 0.0))


def _flat(tree):
  return {'.'.join(str(p) for p in path): v for path, v in nnx.to_flat_state(tree)}


@pytest.fixture(scope='module')
def params():
  return nnx.state(create_model(TINY, num_classes=5, rngs=nnx.Rngs(0)), nnx.Param)


def test_weight_decay_mask_exact_leaves(params):
  mask = {k: bool(v.get_value()) for k, v in _flat(optim.weight_decay_mask(params)).items()}
  decayed = {k for k, on in mask.items() if on}
  # Every kernel (conv embeddings, depthwise projections, q/k/v/out linears, MLP, head) decays.
  assert decayed == {k for k in mask if k.endswith('.kernel')}
  expected_on = ['stage0.patch_embed.proj.kernel', 'stage0.blocks.0.attn.conv_proj_q.conv.kernel',
                 'stage0.blocks.0.attn.proj_q.kernel', 'stage1.blocks.0.mlp.fc1.kernel',
                 'head.kernel']
  expected_off = ['stage0.patch_embed.proj.bias', 'stage0.patch_embed.norm.scale',
                  'stage0.patch_embed.norm.bias', 'stage0.blocks.0.norm1.scale',
                  'stage0.blocks.0.attn.conv_proj_k.bn.scale',
                  'stage0.blocks.0.attn.conv_proj_k.bn.bias', 'stage0.blocks.0.attn.proj_q.bias',
                  'stage1.cls_token', 'norm.scale', 'norm.bias', 'head.bias']
  assert all(mask[k] for k in expected_on)
  assert not any(mask[k] for k in expected_off)
  # Everything that is not a kernel is 1-D or the cls token.
  assert all(np.ndim(v.get_value()) <= 1 or k == 'stage1.cls_token'
             for k, v in _flat(params).items() if not mask[k])


def test_adamw_decays_only_masked_leaves(params):
  """With zero gradients, one AdamW step only shrinks decayed weights, by lr * wd."""
  cfg = optim.default_optimizer_config()
  cfg.weight_decay = 0.1
  lr = 0.5
  tx = optim.make_optimizer(cfg, optax.constant_schedule(lr))
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  for k, v in _flat(new).items():
    old = _flat(params)[k].get_value()
    want = old * (1 - lr * 0.1) if k.endswith('.kernel') else old
    np.testing.assert_allclose(v.get_value(), want, rtol=1e-6, atol=1e-7, err_msg=k)


def test_lr_schedule_warmup_peak_cosine_end():
  cfg = optim.default_optimizer_config()  # 2e-3 @ 2048, warmup 5 epochs from 1e-6, end 1e-5
  spe, total = 10, 300  # 10 steps/epoch, 30 epochs
  sched = optim.make_lr_schedule(cfg, batch_size=1024, total_steps=total, steps_per_epoch=spe)
  peak = 1e-3  # linear scaling: 2e-3 * 1024 / 2048
  warmup = 5 * spe
  # float32 schedule arithmetic: values near 1e-6 carry the rounding of terms near the peak (1e-3).
  np.testing.assert_allclose(sched(0), 1e-6, rtol=1e-5)
  np.testing.assert_allclose(sched(warmup // 2), (1e-6 + peak) / 2, rtol=1e-5)
  np.testing.assert_allclose(sched(warmup), peak, rtol=1e-6)
  # Half-way through the cosine the lr is the mean of peak and end.
  np.testing.assert_allclose(sched(warmup + (total - warmup) // 2), (peak + 1e-5) / 2, rtol=1e-5)
  np.testing.assert_allclose(sched(total), 1e-5, rtol=1e-5)
  values = np.array([sched(i) for i in range(total + 1)])
  assert np.all(np.diff(values[:warmup + 1]) > 0) and np.all(np.diff(values[warmup:]) <= 0)


@pytest.mark.parametrize('batch_size,peak', [(256, 2.5e-4), (2048, 2e-3), (4096, 4e-3)])
def test_lr_scales_linearly_with_batch(batch_size, peak):
  cfg = optim.default_optimizer_config()
  assert optim.scaled_learning_rate(cfg.base_lr, batch_size, cfg.base_batch_size) == pytest.approx(peak)
  sched = optim.make_lr_schedule(cfg, batch_size=batch_size, total_steps=100, steps_per_epoch=2)
  np.testing.assert_allclose(sched(10), peak, rtol=1e-6)  # warmup = 5 epochs * 2 steps


def test_explicit_warmup_steps_override_epochs():
  cfg = optim.default_optimizer_config()
  cfg.warmup_steps = 3
  sched = optim.make_lr_schedule(cfg, batch_size=2048, total_steps=100, steps_per_epoch=50)
  np.testing.assert_allclose(sched(3), 2e-3, rtol=1e-6)
  assert sched(2) < 2e-3
