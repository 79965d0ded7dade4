"""The model directory (`save_model` / `load_checkpoint`): exact round trip, format 2 with the
preprocessing and class names, format 1 still loading, atomic writes, clear errors."""
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx

import cvt_flax
from cvt_flax.convert import load_pytorch
from cvt_flax.io import CheckpointError, FormatNote, load_checkpoint, model_dir, save_model
from cvt_flax.preprocess import Preprocess
from helpers import DATA, assert_same_weights, load_fixture, logits_and_features


@pytest.fixture(scope='module')
def model():
  return load_pytorch(DATA / 'official_tiny.pth', spec=DATA / 'official_tiny.json')


@pytest.fixture
def saved(model, tmp_path):
  path = tmp_path / 'ckpt'
  save_model(model, path)
  return path


def test_round_trip_is_exact(model, saved):
  assert sorted(os.listdir(saved)) == ['config.json', 'state']
  doc = json.loads((saved / 'config.json').read_text())
  assert (doc['format'], doc['version']) == ('cvt_flax.model', 2)
  assert 'dtype' not in doc['config'] and 'attention_impl' not in doc['config']
  # The fixture is an official .pth of 10 classes: the official 224 px eval, no class names.
  assert doc['preprocess'] == Preprocess(224).to_dict() and doc['class_names'] is None
  loaded = load_checkpoint(saved)
  assert loaded.config == model.config
  assert (loaded.preprocess, loaded.class_names) == (model.preprocess, None)
  assert loaded.stage2.blocks[1].attn.conv_proj_k.bn.use_running_average  # eval mode
  assert_same_weights(model, loaded)
  _, io = load_fixture('official_tiny')
  images = io['input_1'].transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(logits_and_features(loaded, images)[0],
                                logits_and_features(model, images)[0])


def test_training_mode_model_and_nondefault_config(tmp_path):
  cfg = cvt_flax.make_config('tiny', dim_embed=(8, 16), cls_token=(False, False),
                             qkv_proj_method=('avg', 'dw_bn'), qkv_bias=(False, True),
                             drop_rate=(0.1, 0.1), drop_path_rate=(0.0, 0.2), num_classes=3,
                             activation='gelu')
  trained = cvt_flax.create_model(cfg, rngs=nnx.Rngs(1), dtype='bfloat16')  # training mode
  nnx.jit(lambda m, x: m(x))(trained, np.ones((2, 16, 16, 3), np.float32))  # moves BatchNorm stats
  prep = Preprocess(16, 'warp', mean=(0.5,) * 3, std=(0.5,) * 3)
  save_model(trained, tmp_path / 'm', preprocess=prep, class_names=['cat', 'dog', 'emu'])
  loaded = load_checkpoint(tmp_path / 'm')
  assert loaded.config == cfg and loaded.stage1.blocks[0].drop_path.deterministic
  assert loaded.compute.dtype == 'float32'  # compute settings are not saved: the loader's default
  assert (loaded.preprocess, loaded.class_names) == (prep, ('cat', 'dog', 'emu'))
  assert_same_weights(trained, loaded)
  assert int(loaded.stage1.blocks[0].attn.conv_proj_q.bn.num_batches_tracked.get_value()) == 1


def test_existing_path_needs_overwrite(model, saved):
  with pytest.raises(FileExistsError, match='overwrite=True'):
    save_model(model, saved)
  save_model(model, saved, overwrite=True)
  assert_same_weights(model, load_checkpoint(saved))
  assert sorted(os.listdir(saved.parent)) == ['ckpt']  # no temporary or old copies left


def test_interrupted_save_leaves_nothing_loadable(model, saved, monkeypatch):
  def crash(*args, **kwargs):
    raise KeyboardInterrupt('simulated kill during the save')
  monkeypatch.setattr(model_dir.files.json, 'dumps', crash)  # the config.json write, the last step
  with pytest.raises(KeyboardInterrupt):
    save_model(model, saved.parent / 'new')
  with pytest.raises(KeyboardInterrupt):
    save_model(model, saved, overwrite=True)
  assert sorted(os.listdir(saved.parent)) == ['ckpt']  # no 'new', no temporary directories
  monkeypatch.undo()
  assert_same_weights(model, load_checkpoint(saved))  # the old checkpoint is intact


def test_not_a_checkpoint_directory(tmp_path):
  with pytest.raises(CheckpointError, match='does not exist'):
    load_checkpoint(tmp_path / 'nope')
  (tmp_path / 'file').write_text('x')
  with pytest.raises(CheckpointError, match='is not a directory'):
    load_checkpoint(tmp_path / 'file')
  with pytest.raises(CheckpointError, match='config.json: missing; not a cvt-flax model'):
    load_checkpoint(tmp_path)


def _edit_config(path, **changes):
  doc = json.loads((path / 'config.json').read_text())
  doc.update(changes)
  (path / 'config.json').write_text(json.dumps(doc))


@pytest.mark.parametrize('content,message', [
    ('{"format": "cvt_flax.model", ', 'corrupt, not valid JSON'),
    ('[1, 2]', "format 'list', expected 'cvt_flax.model'"),
    ('{"format": "orbax", "version": 1}', "format 'orbax', expected 'cvt_flax.model'"),
    ('{"format": "cvt_flax.model", "version": "one"}', "corrupt format version 'one'"),
    ('{"format": "cvt_flax.model", "version": 3, "config": {}}',
     'format version 3 was written by a newer cvt-flax; this one reads up to version 2'),
    ('{"format": "cvt_flax.model", "version": 2, "config": {"dim_embed": [8], "x": 1}}',
     r"invalid model document.*unknown fields \['x'\]"),
    ('{"format": "cvt_flax.model", "version": 2, "config": {}, "class_names": ["a"]}',
     'invalid model document.*1 class names for a model with 1000 classes'),
    ('{"format": "cvt_flax.model", "version": 2, "config": {}, "preprocess": {"resize": "squash"}}',
     r"invalid model document.*preprocess.resize='squash'"),
])
def test_bad_config_json(saved, content, message):
  (saved / 'config.json').write_text(content)
  with pytest.raises(CheckpointError, match=message):
    load_checkpoint(saved)


# Orbax's async machinery reports an 'Event loop is closed' from a finaliser after a failed restore.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_missing_or_truncated_state(saved):
  data_dir = saved / 'state' / 'd'
  for name in os.listdir(data_dir):
    blob = (data_dir / name).read_bytes()
    (data_dir / name).write_bytes(blob[:len(blob) // 3])
  with pytest.raises(CheckpointError, match=r'state: truncated or corrupt Orbax state'):
    load_checkpoint(saved)
  for name in os.listdir(saved / 'state'):
    if name != 'd':
      path = saved / 'state' / name
      if path.is_file():
        path.unlink()
  with pytest.raises(CheckpointError, match=r'state: truncated or corrupt Orbax state'):
    load_checkpoint(saved)
  shutil.rmtree(saved / 'state')
  with pytest.raises(CheckpointError, match='state: missing; the model has a config but no weights'):
    load_checkpoint(saved)


def test_state_that_does_not_match_the_config(model, saved):
  cfg = dataclasses.replace(model.config, num_classes=4, depth=(1, 1, 3))
  _edit_config(saved, config=cfg.to_dict())
  with pytest.raises(CheckpointError) as info:
    load_checkpoint(saved)
  msg = str(info.value)
  assert 'the stored weights do not match the model in config.json' in msg
  assert 'missing keys (' in msg and 'stage2.blocks.2.attn.proj_q.kernel' in msg
  assert 'head.kernel: stored (48, 10), config needs (48, 4)' in msg


def test_version_1_directory_as_main_wrote_it_loads_and_predicts_as_before(fixtures_dir):
  """tests/data/v1_official_tiny was written by save_model of format version 1 (the code before
  format 2): no preprocessing or class names, compute settings inside "config"."""
  doc = json.loads((fixtures_dir / 'v1_official_tiny' / 'config.json').read_text())
  assert doc['version'] == 1 and doc['config']['dtype'] == 'float32'
  with pytest.warns(FormatNote, match='format version 1.*official ImageNet eval transform at 224'):
    old = load_checkpoint(fixtures_dir / 'v1_official_tiny')
  assert old.preprocess == Preprocess(224) and old.class_names is None  # 10 classes: no names
  new = load_pytorch(DATA / 'official_tiny.pth', spec=DATA / 'official_tiny.json')
  assert_same_weights(old, new)
  assert old.config == new.config
