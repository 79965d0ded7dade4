"""Plotting helpers for the Colab notebooks: image grids, top-k labels, curves, confusion matrices,
error histograms, attention overlays and feature-map PCA.

Presentation only: numpy in, matplotlib `Figure` out (matplotlib is imported lazily, so importing
this module costs nothing). Nothing here computes model outputs; pass in what the library returns.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np


def _pyplot():
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _grid(n: int, ncols: int, cell_w: float, cell_h: float):
  """A figure with n axes in rows of `ncols` (unused trailing axes hidden); returns (fig, axes)."""
  ncols = max(1, min(ncols, n))
  nrows = max(1, math.ceil(n / ncols))
  # Constrained layout leaves room for titles and a suptitle (tight_layout ignores the latter).
  fig, axes = _pyplot().subplots(nrows, ncols, figsize=(cell_w * ncols, cell_h * nrows),
                                 squeeze=False, layout='constrained')
  axes = axes.ravel()
  for ax in axes[n:]:
    ax.axis('off')
  return fig, axes[:n]


def _short(label: str, width: int = 24) -> str:
  """The first synonym of an ImageNet label ('tabby, tabby cat' -> 'tabby'), cut to `width`."""
  label = label.split(',')[0]
  return label if len(label) <= width else label[:width - 1] + '…'


def denormalize(images, mean, std) -> np.ndarray:
  """Normalised images (..., 3) -> displayable float images in [0, 1]."""
  images = np.asarray(images, np.float32) * np.asarray(std, np.float32)
  return np.clip(images + np.asarray(mean, np.float32), 0.0, 1.0)


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str] | None = None, *, ncols: int = 6,
               size: float = 2.0, suptitle: str | None = None):
  """Images (H, W, 3) or (H, W) in a grid, each with an optional (multi-line) title."""
  title_lines = max((t.count('\n') + 1 for t in titles), default=0) if titles else 0
  fig, axes = _grid(len(images), ncols, size, size + 0.25 * title_lines)
  for i, (ax, img) in enumerate(zip(axes, images)):
    img = np.asarray(img)
    ax.imshow(img, cmap='gray' if img.ndim == 2 else None)
    ax.set_title(titles[i] if titles else '', fontsize=9)
    ax.axis('off')
  if suptitle:
    fig.suptitle(suptitle)
  return fig


def plot_top_k(images: Sequence[np.ndarray], names: Sequence[Sequence[str]], probs, *,
               titles: Sequence[str] | None = None, ncols: int = 2, suptitle: str | None = None):
  """Each image next to a bar chart of its top-k labels and probabilities (best on top)."""
  probs = np.asarray(probs)
  fig, axes = _grid(2 * len(images), 2 * ncols, 2.6, 2.4)
  for i, img in enumerate(images):
    ax_img, ax_bar = axes[2 * i], axes[2 * i + 1]
    ax_img.imshow(np.asarray(img))
    ax_img.set_title(titles[i] if titles else '', fontsize=10)
    ax_img.axis('off')
    k = len(names[i])
    bars = ax_bar.barh(np.arange(k)[::-1], probs[i], color='tab:blue')
    ax_bar.bar_label(bars, [f'{p:.1%}' for p in probs[i]], fontsize=7, padding=2)
    ax_bar.set_yticks(np.arange(k)[::-1], [_short(n) for n in names[i]], fontsize=8)
    ax_bar.set_xlim(0, 1)
    ax_bar.set_xlabel('probability', fontsize=8)
    ax_bar.tick_params(axis='x', labelsize=7)
  if suptitle:
    fig.suptitle(suptitle, color='red')
  return fig


def _series(records: Sequence[Mapping], key: str):
  points = [(r['step'], r[key]) for r in records if key in r]
  return [p[0] for p in points], [p[1] for p in points]


def plot_training_curves(records: Sequence[Mapping]):
  """Train loss, eval top-1/top-5 and the learning rate against steps (records of metrics.jsonl)."""
  fig, (ax_loss, ax_acc, ax_lr) = _pyplot().subplots(1, 3, figsize=(13, 3.4))
  ax_loss.plot(*_series(records, 'train/loss'), label='train loss')
  steps, eval_loss = _series(records, 'eval/loss')
  if steps:
    ax_loss.plot(steps, eval_loss, 'o-', label='eval loss')
  ax_loss.set(xlabel='step', ylabel='loss', title='Loss')
  ax_loss.legend()
  lowest = 100.0
  for key, style in (('eval/top1', 'o-'), ('eval/top5', 's--')):
    steps, acc = _series(records, key)
    acc = 100 * np.asarray(acc)
    ax_acc.plot(steps, acc, style, label=key.split('/')[1])
    lowest = min([lowest, *acc])
  ax_acc.set(xlabel='step', ylabel='accuracy (%)', title='Eval accuracy',
             ylim=(max(0.0, lowest - 5), 100.5))
  ax_acc.legend()
  ax_lr.plot(*_series(records, 'train/lr'))
  ax_lr.set(xlabel='step', ylabel='learning rate', title='Learning rate')
  ax_lr.ticklabel_format(axis='y', style='sci', scilimits=(0, 0))
  for ax in (ax_loss, ax_acc, ax_lr):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  return fig


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
  """counts[true, predicted] (int64, num_classes x num_classes)."""
  counts = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(counts, (np.asarray(labels), np.asarray(predictions)), 1)
  return counts


def plot_confusion_matrix(counts: np.ndarray, class_names: Sequence[str] | None = None, *,
                          max_annotated: int = 20):
  """Row-normalised colours, raw counts written in the cells (up to `max_annotated` classes)."""
  n = len(counts)
  rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
  side = min(1.5 + 0.45 * n, 12)
  fig, ax = _pyplot().subplots(figsize=(side + 1, side))
  image = ax.imshow(rates, cmap='Blues', vmin=0, vmax=1)
  fig.colorbar(image, ax=ax, fraction=0.046, label='fraction of the true class')
  if n <= max_annotated:
    for (i, j), count in np.ndenumerate(counts):
      if count:
        ax.text(j, i, str(count), ha='center', va='center', fontsize=8,
                color='white' if rates[i, j] > 0.5 else 'black')
    names = [_short(c, 12) for c in class_names] if class_names else list(range(n))
    ax.set_xticks(range(n), names, rotation=90 if n > 10 else 0)
    ax.set_yticks(range(n), names)
  accuracy = np.trace(counts) / max(counts.sum(), 1)
  ax.set(xlabel='predicted', ylabel='true', title=f'Confusion matrix (accuracy {accuracy:.1%})')
  fig.tight_layout()
  return fig


def plot_error_histograms(groups: Mapping[str, Mapping[str, np.ndarray]], *,
                          tolerance: float = 1e-5):
  """Histograms of absolute differences on log axes: one panel per group (e.g. per reference
  implementation), one line per output in it, the tolerance marked."""
  tiny = np.finfo(np.float32).tiny  # exact zeros would vanish from a log axis
  all_errors = np.concatenate([np.abs(np.ravel(e)) for g in groups.values() for e in g.values()])
  positive = all_errors[all_errors > 0]
  low = math.floor(math.log10(max(positive.min() if positive.size else 1e-12, 1e-12)))
  high = math.ceil(math.log10(max(all_errors.max(), tolerance) * 1.01))
  bins = np.logspace(low, high, 4 * (high - low) + 1)  # 4 bins per decade
  fig, axes = _pyplot().subplots(1, len(groups), figsize=(6 * len(groups), 3.6), squeeze=False)
  for ax, (title, errors) in zip(axes[0], groups.items()):
    for name, err in errors.items():
      err = np.maximum(np.abs(np.ravel(err)), tiny)
      ax.hist(err, bins=bins, histtype='step', linewidth=1.5, label=f'{name} (max {err.max():.1e})')
    ax.axvline(tolerance, color='red', linestyle='--', label=f'tolerance {tolerance:g}')
    ax.set(xscale='log', yscale='log', xlabel='absolute difference', ylabel='count', title=title)
    ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def plot_activation_curves(curves: Mapping[str, Callable], reference: str, *,
                           x_range: tuple[float, float] = (-4.0, 4.0)):
  """Left: the activation curves. Right: |curve - reference| on a log scale (`reference` is a key
  of `curves`)."""
  x = np.linspace(*x_range, 801, dtype=np.float32)
  values = {name: np.asarray(fn(x), np.float64) for name, fn in curves.items()}
  fig, (ax_f, ax_d) = _pyplot().subplots(1, 2, figsize=(12, 3.8))
  for name, y in values.items():
    ax_f.plot(x, y, label=name)
    if name != reference:
      diff = np.abs(y - values[reference])
      ax_d.plot(x, np.maximum(diff, 1e-9), label=f'{name} (max {diff.max():.1e})')
  ax_f.set(xlabel='x', ylabel='f(x)', title='Activations (indistinguishable at this scale)')
  ax_d.set(xlabel='x', ylabel='|difference|', yscale='log', ylim=(1e-7, 1),
           title=f'|f(x) - {reference}(x)|')
  for ax in (ax_f, ax_d):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


# --------------------------------------------------------------------------------------------------
# Attention and feature maps.

def kv_grid_shape(num_tokens: int, feature_hw: tuple[int, int]) -> tuple[int, int]:
  """The (rows, cols) grid of `num_tokens` key/value tokens of a (h, w) token map.

  The kv map is the token map subsampled by stride_kv (conv or ceil-mode pooling), so its aspect
  ratio is the map's; of the factorisations of num_tokens the one closest to it is the grid.
  """
  h, w = feature_hw
  pairs = [(r, num_tokens // r) for r in range(1, num_tokens + 1) if num_tokens % r == 0]
  return min(pairs, key=lambda rc: abs(math.log(rc[0] / rc[1]) - math.log(h / w)))


def cls_attention(attention, feature_hw: tuple[int, int]) -> np.ndarray:
  """Cls-token attention over the spatial tokens, as maps: (B, heads, rows, cols).

  `attention`: one block's (B, heads, 1 + q, 1 + kv) probabilities from
  `cvt_flax.models.attention_maps` (a stage with a cls token: token 0 is the cls token).
  `feature_hw`: that stage's token map (h, w), e.g. `model.features(x)['stage2'].shape[1:3]`.
  """
  attention = np.asarray(attention, np.float32)
  spatial = attention[:, :, 0, 1:]
  rows, cols = kv_grid_shape(spatial.shape[-1], feature_hw)
  return spatial.reshape(*spatial.shape[:2], rows, cols)


def upsample(map2d: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of a 2-D float map to (height, width) (for overlays on the image)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  img = Image.fromarray(np.asarray(map2d, np.float32))  # float32 -> PIL mode 'F'
  return np.asarray(img.resize((size[1], size[0]), Image.BILINEAR))


def plot_attention_overlays(image: np.ndarray, maps: np.ndarray, titles: Sequence[str], *,
                            ncols: int = 7, suptitle: str | None = None):
  """The image, then each (rows, cols) map upsampled over it as a heat map (own colour scale)."""
  image = np.asarray(image)
  fig, axes = _grid(len(maps) + 1, ncols, 2.2, 2.5)
  axes[0].imshow(image)
  axes[0].set_title('image', fontsize=9)
  for ax, attn, title in zip(axes[1:], maps, titles):
    ax.imshow(image)
    ax.imshow(upsample(attn, image.shape[:2]), cmap='inferno', alpha=0.6)
    ax.set_title(title, fontsize=9)
  for ax in axes:
    ax.axis('off')
  if suptitle:
    fig.suptitle(suptitle)
  return fig


def pca_rgb(feature_map: np.ndarray) -> np.ndarray:
  """(H, W, C) features -> (H, W, 3) in [0, 1]: the first 3 principal components as colours."""
  fmap = np.asarray(feature_map, np.float64)
  h, w, c = fmap.shape
  flat = fmap.reshape(-1, c)
  flat = flat - flat.mean(axis=0)
  _, _, vt = np.linalg.svd(flat, full_matrices=False)
  comps = flat @ vt[:3].T
  if comps.shape[1] < 3:  # fewer than 3 channels: pad with grey
    comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
  low, high = np.percentile(comps, 1, axis=0), np.percentile(comps, 99, axis=0)
  rgb = (comps - low) / np.maximum(high - low, 1e-12)
  return np.clip(rgb, 0, 1).reshape(h, w, 3).astype(np.float32)


def plot_feature_maps(image: np.ndarray, feature_maps: Mapping[str, np.ndarray], *,
                      num_channels: int = 4):
  """One row per stage: the image, a PCA colouring, and the `num_channels` most varying channels."""
  plt = _pyplot()
  ncols = 2 + num_channels
  fig, axes = plt.subplots(len(feature_maps), ncols, figsize=(2.1 * ncols, 2.3 * len(feature_maps)),
                           squeeze=False)
  for row, (name, fmap) in zip(axes, feature_maps.items()):
    fmap = np.asarray(fmap, np.float32)
    h, w, c = fmap.shape
    row[0].imshow(image)
    row[0].set_title('image', fontsize=9)
    row[1].imshow(pca_rgb(fmap), interpolation='nearest')
    row[1].set_title(f'{name}: {h}x{w}x{c}, PCA', fontsize=9)
    top = np.argsort(-fmap.reshape(-1, c).var(axis=0))[:num_channels]
    for ax, ch in zip(row[2:], top):
      ax.imshow(fmap[..., ch], cmap='viridis', interpolation='nearest')
      ax.set_title(f'{name} channel {ch}', fontsize=9)
    for ax in row:
      ax.axis('off')
  fig.tight_layout()
  return fig
