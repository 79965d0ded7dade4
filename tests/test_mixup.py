"""Mixup / CutMix (timm batch-mode semantics) and random erasing's noise: pure, jit-able JAX functions."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvt_flax.training.erasing import fill_boxes
from cvt_flax.training.mixup import default_mixup_config, mixup_cutmix

N, H, W, C, CLASSES = 6, 12, 10, 3, 10


def _batch():
  # Example i is the constant image i + 1, so every output pixel tells which example it came from.
  images = jnp.broadcast_to(jnp.arange(1.0, N + 1)[:, None, None, None], (N, H, W, C))
  labels = jnp.arange(N, dtype=jnp.int32)  # Distinct labels: targets show lam directly.
  return images, labels


@functools.lru_cache(maxsize=None)
def _jitted(**kwargs):
  return jax.jit(functools.partial(mixup_cutmix, num_classes=CLASSES, **kwargs))


def _mix(seed, **kwargs):
  kwargs = {'mixup_alpha': 0.8, 'cutmix_alpha': 1.0, 'switch_prob': 0.5, 'prob': 1.0,
            'label_smoothing': 0.0, **kwargs}
  images, labels = _batch()
  return _jitted(**kwargs)(jax.random.key(seed), images, labels)


def _lam(targets):
  """lam of example 0: its own label's weight (label smoothing off)."""
  return float(targets[0, 0])


@pytest.mark.parametrize('kwargs', [{}, {'label_smoothing': 0.1}, {'switch_prob': 1.0},
                                    {'switch_prob': 0.0}, {'prob': 0.5}])
def test_targets_are_distributions(kwargs):
  for seed in range(8):
    _, targets = _mix(seed, **kwargs)
    assert targets.shape == (N, CLASSES) and targets.dtype == jnp.float32
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-6)
    assert float(targets.min()) >= 0.0


@pytest.mark.parametrize('kwargs', [{'prob': 0.0}, {'mixup_alpha': 0.0, 'cutmix_alpha': 0.0}])
def test_disabled_is_identity_with_smoothed_targets(kwargs):
  images, labels = _batch()
  out, targets = _mix(0, label_smoothing=0.1, **kwargs)
  np.testing.assert_array_equal(out, images)
  off, on = 0.1 / CLASSES, 1 - 0.1 + 0.1 / CLASSES
  expected = np.full((N, CLASSES), off, np.float32)
  expected[np.arange(N), np.asarray(labels)] = on
  np.testing.assert_allclose(targets, expected, rtol=1e-6)


def test_label_smoothing_values_with_mixing():
  _, targets = _mix(1, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1)
  lam = (float(targets[0, 0]) - 0.01) / 0.9  # on = 0.91 = 0.9 + off, off = 0.01.
  # Example 0 mixes with example N-1: weights lam / 1-lam on their labels, off-value elsewhere.
  np.testing.assert_allclose(targets[0, N - 1], 0.01 + 0.9 * (1 - lam), atol=1e-6)
  np.testing.assert_allclose(targets[0, 1:N - 1], 0.01, atol=1e-7)
  np.testing.assert_allclose(targets[0, N:], 0.01, atol=1e-7)


def test_mixup_blends_images_with_lam():
  lams = []
  for seed in range(10):
    out, targets = _mix(seed, cutmix_alpha=0.0)
    lam = _lam(targets)
    images, _ = _batch()
    np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], rtol=1e-5)
    np.testing.assert_allclose(targets[0, N - 1], 1 - lam, atol=1e-6)
    lams.append(lam)
  assert len(set(lams)) == 10 and 0 < min(lams) and max(lams) < 1  # lam ~ Beta(0.8, 0.8).


def test_cutmix_box_area_matches_lam():
  boxes = 0
  for seed in range(20):
    out, targets = _mix(seed, mixup_alpha=0.0)
    lam = _lam(targets)
    from_flipped = np.asarray(out[0, :, :, 0]) == N  # Example 0's box comes from example N-1.
    assert np.all((np.asarray(out[0]) == 1) | (np.asarray(out[0]) == N))  # Pasted, not blended.
    np.testing.assert_allclose(1 - lam, from_flipped.mean(), atol=1e-6)
    rows, cols = np.nonzero(from_flipped)
    if rows.size:  # One axis-aligned box, the same for every example of the batch.
      boxes += 1
      assert from_flipped[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
      np.testing.assert_array_equal(np.asarray(out[1, :, :, 0]) == N - 1, from_flipped)
  assert boxes >= 15


def test_switch_prob_selects_cutmix_or_mixup():
  for seed in range(6):
    cut, _ = _mix(seed, switch_prob=1.0)
    assert set(np.unique(np.asarray(cut[0]))) <= {1.0, float(N)}
    mixed, targets = _mix(seed, switch_prob=0.0)
    lam = _lam(targets)
    np.testing.assert_allclose(mixed[0], lam * 1 + (1 - lam) * N, rtol=1e-5)


def test_prob_mixes_some_batches_only():
  unchanged = sum(bool(jnp.all(_mix(seed, prob=0.5)[0] == _batch()[0])) for seed in range(30))
  assert 5 <= unchanged <= 25


def test_keeps_bfloat16_images():
  images, labels = _batch()
  out, targets = mixup_cutmix(jax.random.key(0), images.astype(jnp.bfloat16), labels, CLASSES,
                              switch_prob=0.0)
  assert out.dtype == jnp.bfloat16 and targets.dtype == jnp.float32


def test_default_config_is_the_official_recipe():
  mixup = default_mixup_config()
  mixup.lock()
  assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.switch_prob, mixup.prob,
          mixup.label_smoothing) == (0.8, 1.0, 0.5, 1.0, 0.1)


def test_erasing_fills_exactly_the_boxes_with_unit_normal_noise():
  images = jnp.full((3, 64, 48, 3), 5.0)
  boxes = jnp.array([[0, 0, 0, 0], [10, 4, 20, 30], [63, 47, 1, 1]], jnp.int32)
  out = np.asarray(jax.jit(fill_boxes)(jax.random.key(0), images, boxes))
  changed = np.any(out != 5.0, axis=-1)
  assert not changed[0].any()  # height 0: nothing erased
  expected = np.zeros((64, 48), bool)
  expected[10:30, 4:34] = True
  np.testing.assert_array_equal(changed[1], expected)
  assert changed[2].sum() == 1 and changed[2, 63, 47]
  noise = out[1][expected]
  assert abs(noise.mean()) < 0.1 and 0.9 < noise.std() < 1.1  # 1,800 per-pixel N(0, 1) draws
