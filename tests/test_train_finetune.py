"""Fine-tuning: init_from a converted .pth, a saved model or a training workdir; new head on purpose."""
import numpy as np
import pytest
from flax import nnx

from cvt_flax.training import loop
from cvt_flax.convert import load_pytorch
from cvt_flax.io import load_checkpoint, save_model
from cvt_flax.models import create_model
from cvt_flax.models.weights import host_weights
from cvt_flax.training.init_from import InitFromError
from cvt_flax.training.run import build_run, create_initial_state, init_weights_from
from helpers import DATA, TINY_MODEL, tiny_config

def _initial_weights(cfg, workdir, source):
  """The train state a run would start from, as 'path.to.leaf' -> numpy (params + batch stats)."""
  run = build_run(cfg, str(workdir), source.config)
  state = create_initial_state(run, init_weights_from(cfg, run, source))
  model = nnx.merge(run.graphdef, state.params, state.batch_stats, state.rngs)
  return host_weights(model)


def _saved_tiny_model(path, num_classes):
  model = create_model(TINY_MODEL, num_classes=num_classes, rngs=nnx.Rngs(7))
  save_model(model, path)
  return load_checkpoint(path)


def test_official_pth_at_a_new_resolution(digits_dir, tmp_path):
  pth = str(DATA / 'official_tiny.pth')  # 3 stages, 10 classes, made for 64 px images
  spec = str(DATA / 'official_tiny.json')  # widths of 16/32/48 do not reveal the head count
  cfg = tiny_config(digits_dir, init_from=pth, init_from_spec=spec, num_train_steps=2,
                    checkpoint_every_steps=2, **{'optimizer.warmup_steps': 1})
  cfg.model = {'variant': 'init_from', 'drop_path_rate': (0.0, 0.0, 0.1)}
  cfg.input.image_size = 32  # no position embeddings: the weights work at any resolution
  source = load_pytorch(pth, spec=spec)
  start = _initial_weights(cfg, tmp_path / 'check', source)
  want = host_weights(source)
  assert sorted(start) == sorted(want)
  for key, value in want.items():  # digits has 10 classes too: every tensor, head included
    np.testing.assert_array_equal(start[key], value, err_msg=key)
  result = loop.train_and_evaluate(cfg, str(tmp_path / 'run'))
  assert result['step'] == 2 and 0 <= result['eval/top1'] <= 1
  trained = load_checkpoint(str(tmp_path / 'run'))  # the workdir loads as a model
  assert trained.config.dim_embed == (16, 32, 48) and trained.config.drop_path_rate[-1] == 0.1


def test_new_head_must_be_explicit(digits_dir, tmp_path):
  source_dir = str(tmp_path / 'seven_classes')
  source = _saved_tiny_model(source_dir, num_classes=7)
  cfg = tiny_config(digits_dir, init_from=source_dir)
  with pytest.raises(InitFromError) as err:
    loop.train_and_evaluate(cfg, str(tmp_path / 'refused'))
  message = str(err.value)
  assert source_dir in message
  assert 'head.kernel: checkpoint (32, 7), model (32, 10)' in message
  assert 'head.bias: checkpoint (7,), model (10,)' in message
  assert '--config.init_new_head=True' in message

  cfg.init_new_head = True
  start = _initial_weights(cfg, tmp_path / 'check', source)
  want = host_weights(source)
  for key, value in want.items():
    if not key.startswith('head.'):
      np.testing.assert_array_equal(start[key], value, err_msg=key)
  assert start['head.kernel'].shape == (32, 10) and start['head.bias'].shape == (10,)
  result = loop.train_and_evaluate(cfg, str(tmp_path / 'run'))
  assert result['step'] == 6


def test_other_architecture_lists_keys(digits_dir, tmp_path):
  source_dir = str(tmp_path / 'model')
  _saved_tiny_model(source_dir, num_classes=10)
  cfg = tiny_config(digits_dir, init_from=source_dir, init_new_head=True)
  cfg.model.dim_embed = (16, 48)
  cfg.model.num_heads = (1, 3)
  cfg.model.depth = (1, 2)
  with pytest.raises(InitFromError) as err:
    loop.train_and_evaluate(cfg, str(tmp_path / 'run'))
  message = str(err.value)
  assert 'missing keys' in message and 'stage1.blocks.1.attn.proj_q.kernel' in message
  assert 'stage1.patch_embed.proj.kernel: checkpoint (3, 3, 16, 32), model (3, 3, 16, 48)' in message
  assert "variant='init_from'" in message and 'init_new_head' not in message


def test_init_from_a_training_workdir(digits_dir, tmp_path):
  first = str(tmp_path / 'first')
  loop.train_and_evaluate(tiny_config(digits_dir), first)
  trained = load_checkpoint(first)
  cfg = tiny_config(digits_dir, init_from=first)
  start = _initial_weights(cfg, tmp_path / 'check', trained)
  for key, value in host_weights(trained).items():
    np.testing.assert_array_equal(start[key], value, err_msg=key)
  # The weights really are the trained ones, not a fresh initialisation.
  fresh = host_weights(create_model(TINY_MODEL, num_classes=10,
                                    rngs=nnx.Rngs(params=0, dropout=1)))
  assert not np.array_equal(fresh['head.kernel'], start['head.kernel'])
