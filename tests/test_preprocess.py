"""The one eval transform: its geometry, its PIL path (predict) against HF's image processor and
torchvision's rules, and its TF path (the input pipelines) against the PIL path, on real photos."""
import numpy as np
import pytest
import skimage.data
import tensorflow as tf
from PIL import Image
from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil

from cvt_flax import preprocess
from cvt_flax.data import config, pipeline
from cvt_flax.preprocess import Preprocess, PreprocessError

# scikit-image's photos: square, landscape, portrait-ish sizes; rocket's crop margin is odd.
PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket')


def _photo(name):
  return getattr(skimage.data, name)()


def _torchvision_geometry(height, width, size, crop_pct):
  """torchvision's Resize(int(size / crop_pct)) + CenterCrop(size), written out."""
  short = int(size / crop_pct)
  if height <= width:
    new_h, new_w = short, int(short * width / height)
  else:
    new_h, new_w = int(short * height / width), short
  return new_h, new_w, int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))


@pytest.mark.parametrize('height,width', [(224, 224), (300, 451), (427, 640), (640, 427),
                                          (257, 256), (333, 500), (8, 8), (1000, 31)])
def test_crop_geometry_rounds_as_torchvision_and_hf(height, width):
  ours = Preprocess(224).geometry(height, width)
  assert ours == _torchvision_geometry(height, width, 224, 0.875)
  floor = Preprocess(224, crop_offset='floor').geometry(height, width)
  assert floor[:2] == ours[:2] and floor[2:] == ((ours[0] - 224) // 2, (ours[1] - 224) // 2)
  assert Preprocess(384, 'warp').geometry(height, width) == (384, 384, 0, 0)


@pytest.mark.parametrize('size', [224, 384])
def test_pil_path_equals_hf_image_processor_on_photos(size):
  processor = ConvNextImageProcessorPil(size={'shortest_edge': size}, crop_pct=0.875)
  ours = preprocess.from_hf_processor(processor.to_dict())
  assert (ours.resize, ours.crop_offset) == ('warp' if size == 384 else 'crop', 'floor')
  for name in PHOTOS:
    want = processor(images=_photo(name), return_tensors='np')['pixel_values'][0]
    np.testing.assert_allclose(ours(_photo(name)), want.transpose(1, 2, 0), atol=1e-5, err_msg=name)


def test_hf_processor_configs_of_the_released_models():
  # microsoft/cvt-13's preprocessor_config.json (the old feature-extractor format: int size).
  released = {'crop_pct': 0.875, 'do_normalize': True, 'do_resize': True, 'resample': 3,
              'feature_extractor_type': 'ConvNextFeatureExtractor', 'size': 224,
              'image_mean': [0.485, 0.456, 0.406], 'image_std': [0.229, 0.224, 0.225]}
  assert preprocess.from_hf_processor(released) == Preprocess(224, crop_offset='floor')
  assert preprocess.from_hf_processor(dict(released, size=384)).resize == 'warp'
  written = preprocess.to_hf_processor(Preprocess(224, crop_offset='floor'))
  assert preprocess.from_hf_processor(written) == Preprocess(224, crop_offset='floor')
  with pytest.raises(PreprocessError, match='resample=0'):
    preprocess.from_hf_processor(dict(released, resample=0))


@pytest.mark.parametrize('prep', [Preprocess(224), Preprocess(224, crop_offset='floor'),
                                  Preprocess(384, 'warp'), Preprocess(96, crop_pct=0.9,
                                                                       interpolation='bilinear')])
def test_eval_pipeline_path_is_the_predict_path(prep):
  cfg = config.default_input_config()
  config.with_eval_preprocess(cfg, prep)
  assert config.eval_preprocess(cfg) == prep
  for name in PHOTOS:
    photo = _photo(name)
    pixels = pipeline.eval_transform(cfg, tf.io.encode_png(photo)).numpy()
    assert pixels.shape == (prep.image_size, prep.image_size, 3) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, prep.pixels(photo), err_msg=name)
    # What the eval step computes from them on the device is predict's input.
    np.testing.assert_array_equal(preprocess.normalize(pixels, prep.mean, prep.std), prep(photo))


def test_any_image_mode_becomes_rgb_as_in_the_pipeline():
  # Alpha is dropped, as the TF pipeline (decode channels=3), torchvision and HF do.
  rgba = np.dstack([np.full((10, 12, 3), 200, np.uint8), np.zeros((10, 12), np.uint8)])
  prep = Preprocess(8, 'warp', mean=(0, 0, 0), std=(1, 1, 1))
  np.testing.assert_allclose(prep(Image.fromarray(rgba)), 200 / 255, atol=1e-6)
  cfg = config.default_input_config()
  config.with_eval_preprocess(cfg, prep)
  np.testing.assert_array_equal(pipeline.eval_transform(cfg, tf.io.encode_png(rgba)).numpy(), 200)
  grey = Preprocess(8, 'warp')(Image.fromarray(np.full((9, 9), 128, np.uint8)))
  assert grey.shape == (8, 8, 3) and np.ptp(grey[..., 0]) < 1e-6


@pytest.mark.parametrize('fields,message', [
    (dict(image_size=0), 'image_size'), (dict(resize='squash'), 'resize'),
    (dict(crop_pct=1.5), 'crop_pct'), (dict(std=(1, 0, 1)), 'std'),
    (dict(interpolation='nearest'), 'interpolation'), (dict(crop_offset='ceil'), 'crop_offset')])
def test_bad_fields_are_named(fields, message):
  with pytest.raises(PreprocessError, match=f'preprocess.{message}='):
    Preprocess(**fields)
  with pytest.raises(PreprocessError, match='unknown preprocess fields'):
    Preprocess.from_dict({'image_size': 224, 'colour': 'rgb'})
