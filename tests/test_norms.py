"""LayerNorm and BatchNorm with their closed-form gradients (`cvt_flax.models.norms`) against the
exact answer, with autodiff of the textbook formulas (torch's two-pass variance) as the float32
noise floor."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cvt_flax.models import norms


def _exact(x, scale, bias, grad, epsilon=1e-5):
  """LayerNorm's output and gradients in float64 (NumPy)."""
  x, scale, grad = np.float64(x), np.float64(scale), np.float64(grad)
  centred = x - x.mean(-1, keepdims=True)
  rstd = 1 / np.sqrt((centred ** 2).mean(-1, keepdims=True) + epsilon)
  normalised = centred * rstd
  d_normalised = grad * scale
  dx = rstd * (d_normalised - d_normalised.mean(-1, keepdims=True)
               - normalised * (d_normalised * normalised).mean(-1, keepdims=True))
  rows = lambda a: a.reshape(-1, a.shape[-1])
  return (normalised * scale + np.float64(bias), dx, rows(grad * normalised).sum(0),
          rows(grad).sum(0))


def _textbook(x, scale, bias):
  layer = nnx.LayerNorm(x.shape[-1], epsilon=1e-5, use_fast_variance=False, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)
  state['scale'].set_value(scale)
  state['bias'].set_value(bias)
  return nnx.merge(graphdef, state)(x)


def _output_and_grads(fn, x, scale, bias, grad):
  out, vjp = jax.vjp(fn, x, scale, bias)
  return (out, *vjp(grad))


# Tokens of CvT's stage widths; a mean of 1e3 with std 1 (the residual stream can drift far from
# zero): the two-pass statistics stay exact where E[x^2] - E[x]^2 would cancel.
@pytest.mark.parametrize('mean', [0.0, 1e3])
@pytest.mark.parametrize('width', [64, 384])
def test_layer_norm_and_its_gradients_are_exact_to_float32_rounding(mean, width):
  rng = np.random.default_rng(0)
  x = rng.normal(mean, 1.0, (2, 197, width)).astype(np.float32)
  scale, bias = (rng.normal(offset, 0.1, width).astype(np.float32) for offset in (1.0, 0.0))
  grad = rng.normal(size=x.shape).astype(np.float32)
  exact = _exact(x, scale, bias, grad)
  ours = _output_and_grads(lambda *a: norms.layer_norm(*a, 1e-5, jnp.float32),
                           x, scale, bias, grad)
  floor = _output_and_grads(_textbook, x, scale, bias, grad)
  for what, got, noise, want in zip(('out', 'dx', 'dscale', 'dbias'), ours, floor, exact):
    error = np.abs(np.asarray(got, np.float64) - want).max()
    assert error <= 2 * np.abs(np.asarray(noise, np.float64) - want).max() + 1e-12, what


def test_layer_norm_computes_in_float32_and_returns_the_compute_dtype():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 64)), jnp.bfloat16)
  layer = norms.LayerNorm(64, dtype=jnp.bfloat16)
  y = layer(x)
  assert y.dtype == jnp.bfloat16
  want = _exact(np.asarray(x, np.float32), np.ones(64), np.zeros(64), np.zeros((2, 5, 64)))[0]
  assert np.abs(np.asarray(y, np.float64) - want).max() <= 2 ** -7 * np.abs(want).max()
  dx = jax.grad(lambda x: jnp.sum(layer(x).astype(jnp.float32)))(x)
  assert dx.dtype == jnp.bfloat16


def _exact_batch_norm(x, scale, bias, grads, epsilon=1e-5):
  """Training-mode BatchNorm's outputs (y, mean, biased var) and the input, scale and bias
  gradients for cotangents `grads` of all three, in float64 (NumPy)."""
  x, scale = np.float64(x), np.float64(scale)
  grad_y, grad_mean, grad_var = (np.float64(g) for g in grads)
  axes, count = tuple(range(x.ndim - 1)), np.prod(x.shape[:-1])
  mean = x.mean(axes)
  centred = x - mean
  var = (centred ** 2).mean(axes)
  rstd = 1 / np.sqrt(var + epsilon)
  normalised = centred * rstd
  d_normalised = grad_y * scale
  dx = (rstd * (d_normalised - d_normalised.mean(axes) - normalised * (
      d_normalised * normalised).mean(axes)) + grad_mean / count + grad_var * 2 * centred / count)
  return ((normalised * scale + np.float64(bias), mean, var),
          (dx, (grad_y * normalised).sum(axes), grad_y.sum(axes)))


@pytest.mark.parametrize('mean', [0.0, 1e3])
def test_batch_norm_and_its_gradients_are_exact_to_float32_rounding(mean):
  rng = np.random.default_rng(1)
  x = rng.normal(mean, 1.0, (4, 28, 28, 64)).astype(np.float32)  # a stage-1 key projection
  scale, bias = (rng.normal(offset, 0.1, 64).astype(np.float32) for offset in (1.0, 0.0))
  # Cotangents for the mean and variance too: the closed form must be right for all three outputs.
  grads = (rng.normal(size=x.shape).astype(np.float32), rng.normal(size=64).astype(np.float32),
           rng.normal(size=64).astype(np.float32))
  want_outs, want_grads = _exact_batch_norm(x, scale, bias, grads)

  def textbook(x, scale, bias):
    axes = (0, 1, 2)
    m = jnp.mean(x, axes)
    v = jnp.mean(jnp.square(x - m), axes)
    return (x - m) * jax.lax.rsqrt(v + 1e-5) * scale + bias, m, v

  def errors(fn):
    outs, vjp = jax.vjp(fn, x, scale, bias)
    return [np.abs(np.asarray(got, np.float64) - want).max()
            for got, want in zip((*outs, *vjp(grads)), (*want_outs, *want_grads))]

  ours = errors(lambda *a: norms.batch_norm(*a, 1e-5, jnp.float32))
  floor = errors(textbook)  # autodiff of the two-pass formula: the float32 noise floor
  for what, error, noise in zip(('y', 'mean', 'var', 'dx', 'dscale', 'dbias'), ours, floor):
    assert error <= 2 * noise + 1e-12, what
