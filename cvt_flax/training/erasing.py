"""timm's RandomErasing(mode='pixel') on the device: the input pipeline draws each example's box
(`cvt_flax.data.augment.erasing_box`, keyed by the example's seed) and the train step fills it with
noise here, after normalising, so the host neither makes the noise nor ships float32 images.

The noise is keyed by the train step (`fold_in(key(seed), step)`), as Mixup's draws are: the batch
of step t, boxes and noise, stays a function of (config, seed, t, process), so resume is exact.
"""
import jax
import jax.numpy as jnp


def fill_boxes(key, images, boxes):
  """`images` (B, H, W, C), normalised, with each example's box filled with per-pixel N(0, 1) noise.

  `boxes`: int32 (B, 4), (top, left, height, width) per example; a zero height erases nothing.
  """
  _, height, width, _ = images.shape
  top, left, box_h, box_w = (boxes[:, i, None, None] for i in range(4))
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
  noise = jax.random.normal(key, images.shape, images.dtype)
  return jnp.where(inside[..., None], noise, images)
