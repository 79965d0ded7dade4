"""A new user's mistakes, each through its real command in a subprocess: one `error:` line that
names the thing and the fix, exit status 2, no traceback; a bug in a config keeps its traceback."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import cvt_flax
from cvt_flax.errors import ConfigError
from cvt_flax.training import loop, optim
from cvt_flax.training.run import resolve_num_steps
from helpers import DATA, ROOT, load_config_module, subprocess_env, tiny_config


def _run(*args, cwd=ROOT):
  return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=subprocess_env(),
                        capture_output=True, text=True, timeout=600)


def _one_error_line(proc, *needles) -> str:
  """The command failed as a user's mistake: status 2, one line on stderr naming `needles`."""
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
  assert lines[0].startswith('error: ') and 'Traceback' not in proc.stderr, proc.stderr
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


@pytest.fixture(scope='module')
def workdir(digits_dir, tmp_path_factory):
  """runs/digits: a 4-step tiny digits run with checkpoints at steps 3 and 4."""
  path = tmp_path_factory.mktemp('user') / 'runs' / 'digits'
  loop.train_and_evaluate(tiny_config(digits_dir, num_train_steps=4), str(path))
  return path


def test_the_workdir_records_the_values_and_paths_used(workdir):
  resolved = json.loads((workdir / 'train_config.json').read_text())['resolved']
  assert resolved == {'total_steps': 4, 'steps_per_epoch': 89, 'warmup_steps': 2, 'peak_lr': 1e-3,
                      'eval_split': 'test'}
  compute = json.loads((workdir / 'compute.json').read_text())
  assert (compute['settings']['attention_impl'], compute['settings']['platform']) == ('blocked',
                                                                                    'cpu')
  assert [row['conv'][0] for row in compute['stages']] == ['shifts'] * len(compute['stages'])


def _folder(root, splits: dict[str, int], classes=10):
  """root/<split>/<class>/: `splits[split]` undecodable .jpg files per class (0: empty classes)."""
  for split, count in splits.items():
    for c in range(classes):
      (root / split / f'c{c}').mkdir(parents=True)
      for i in range(count):
        (root / split / f'c{c}' / f'{i}.jpg').write_bytes(b'not an image')
  return root


@pytest.mark.parametrize('command,needles', [
    (['train.py', '--config', 'configs/digits.py', '--workdir', 'W', '--config.num_train_step=10'],
     ["--config.num_train_step: the config has no field 'num_train_step'",
      'did you mean --config.num_train_steps?']),
    (['-m', 'cvt_flax.aot', '--config', 'configs/digits.py', '--topology', 'v5e-8',
      '--config.batch_sise=8'], ["no field 'batch_sise'", 'did you mean --config.batch_size?']),
    (['-m', 'cvt_flax.aot', '--config', 'configs/digits.py', '--topology', 'v5e-8',
      '--config.input.image_sise=8'], ['did you mean --config.input.image_size?']),
    (['train.py', '--config', 'configs/digit.py', '--workdir', 'W'],
     ['--config configs/digit.py: no such config file', 'digits.py, finetune.py, imagenet.py']),
    (['train.py', '--config', 'configs/finetune.py:cifar1000', '--workdir', 'W'],
     ['finetune.py:cifar1000: expected one of cifar10, cifar100', 'imagefolder:ROOT']),
    (['train.py', '--config', 'configs/imagenet.py:cvt-13', '--workdir', 'W'],
     ['<cvt-13|cvt-21|cvt-w24>,<224|384>']),
    (['train.py', '--config', 'configs/digits.py', '--workdir', 'W', '--config.batch_size=abc'],
     ['--config.batch_size=abc']),
])
def test_config_mistakes_are_one_line(command, needles):
  _one_error_line(_run(*command), *needles)
  assert not (ROOT / 'W').exists()


def test_a_bug_in_a_config_file_keeps_its_traceback(tmp_path):
  config = tmp_path / 'broken.py'
  config.write_text('def get_config(arg=None):\n  return undefined_name\n')
  proc = _run('train.py', '--config', config, '--workdir', tmp_path / 'W')
  assert proc.returncode == 1 and 'NameError' in proc.stderr and 'Traceback' in proc.stderr


def test_a_run_that_never_starts_leaves_no_workdir(tmp_path):
  proc = _run('train.py', '--config', 'configs/digits.py', '--workdir', tmp_path / 'W',
              '--config.input.dataset=digitz')
  _one_error_line(proc, "input.dataset='digitz': no such dataset; did you mean 'digits'?")
  assert not (tmp_path / 'W').exists()


def test_evaluate_takes_the_datasets_evaluation_split_and_names_it(workdir, digits_dir):
  proc = _run('-m', 'cvt_flax.evaluate', '--checkpoint', workdir, '--dataset', 'digits',
              '--data-dir', digits_dir, '--batch-size', '120')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'{workdir} on digits test: top-1' in proc.stdout  # digits has train and test


def test_evaluate_names_the_split_a_folder_lacks_and_its_empty_classes(workdir, tmp_path):
  only_train = _folder(tmp_path / 'only_train', {'train': 1})
  _one_error_line(_run('-m', 'cvt_flax.evaluate', '--checkpoint', workdir, '--dataset',
                       f'imagefolder:{only_train}'),
                  'has no validation, val, test split', '(train)', '--split')
  hollow = _folder(tmp_path / 'hollow', {'test': 0})
  _one_error_line(_run('-m', 'cvt_flax.evaluate', '--checkpoint', workdir, '--dataset',
                       f'imagefolder:{hollow}', '--split', 'test'), f'no images in {hollow}')
  hollow_test = _folder(tmp_path / 'hollow_test', {'train': 1, 'test': 0})
  _one_error_line(_run('-m', 'cvt_flax.evaluate', '--checkpoint', workdir, '--dataset',
                       f'imagefolder:{hollow_test}'),
                  f'{hollow_test}/test holds no images (its class directories c0, c1')


def test_evaluate_on_undecodable_images_prints_only_its_line(workdir, tmp_path):
  bad = _folder(tmp_path / 'bad', {'test': 1})
  _one_error_line(_run('-m', 'cvt_flax.evaluate', '--checkpoint', workdir, '--dataset',
                       f'imagefolder:{bad}'), f'{bad}/test/c0/0.jpg', 'Unknown image file format')


def test_references_mean_what_the_user_meant(workdir):
  user = workdir.parent.parent  # runs/ exists there, so runs/digitz can only be a path
  image = user / 'x.png'
  Image.fromarray(np.full((20, 20, 3), 128, np.uint8)).save(image)
  _one_error_line(_run('-m', 'cvt_flax.predict', '--checkpoint', 'runs/digitz', 'x.png', cwd=user),
                  'runs/digitz: no such file or directory; did you mean runs/digits?')
  _one_error_line(_run('-m', 'cvt_flax.predict', '--checkpoint', 'cvt13/model.pth', 'x.png',
                       cwd=user), 'cvt13/model.pth: no such file or directory')
  proc = _run('-m', 'cvt_flax.predict', '--checkpoint', 'runs/digits/checkpoints/3', 'x.png',
              cwd=user)
  assert proc.returncode == 0 and proc.stderr == '', proc.stderr[-3000:]
  at_3 = cvt_flax.from_pretrained(workdir / 'checkpoints' / '3')  # that step, not the newest
  want = cvt_flax.load_checkpoint(workdir, step=3)
  newest = cvt_flax.load_checkpoint(workdir)
  kernel = lambda m: np.asarray(m.head.kernel.get_value())
  assert np.array_equal(kernel(at_3), kernel(want)) and not np.array_equal(kernel(at_3),
                                                                           kernel(newest))


def test_an_old_model_format_is_one_note_line(tmp_path):
  image = tmp_path / 'x.png'
  Image.fromarray(np.full((20, 20, 3), 128, np.uint8)).save(image)
  proc = _run('-m', 'cvt_flax.predict', '--checkpoint', DATA / 'v1_official_tiny', image)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.startswith('note: ') and len(proc.stderr.strip().splitlines()) == 1
  assert 'format version 1' in proc.stderr


def test_flops_prints_as_it_goes_and_helps_by_its_command():
  proc = _run('-m', 'cvt_flax.flops', '--variants', 'tiny', '--sizes', '32')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'XLA compiles each of the 1 models' in proc.stderr
  assert proc.stdout.splitlines()[2].startswith('| tiny | 32 |')
  assert 'usage: python -m cvt_flax.flops' in _run('-m', 'cvt_flax.flops', '--help').stdout
  _one_error_line(_run('-m', 'cvt_flax.flops', '--variants', 'cvt-99', '--no-xla'),
                  "Unknown CvT variant 'cvt-99'")
  helped = _run('-m', 'cvt_flax.evaluate', '--help').stdout
  assert '\n        --split validation --data-dir $TFDS_DATA_DIR' in helped  # its own line


def test_a_shortened_finetune_keeps_its_shape():
  """--config.num_train_steps=40 on finetune.py: the warmup and evaluations follow, and the rate
  decays to its end; a warmup that outlasts the run is an error naming both lengths."""
  c = load_config_module('finetune').get_config('imagefolder:/data')
  c.lock()
  c.num_train_steps = 40  # as --config.num_train_steps=40 sets it
  assert (c.optimizer.warmup_steps, c.eval_every_steps) == (2, 8)
  assert c.to_dict()['optimizer']['warmup_steps'] == 2  # what train_config.json records
  total, per_epoch = resolve_num_steps(c, num_train_examples=1000)
  schedule = optim.make_lr_schedule(c.optimizer, batch_size=c.batch_size, total_steps=total,
                                    steps_per_epoch=per_epoch)
  lrs = np.array([schedule(i) for i in range(total + 1)])
  assert lrs.argmax() == 2 and np.all(np.diff(lrs[2:]) < 0)
  np.testing.assert_allclose(lrs[-1], c.optimizer.min_lr, rtol=1e-5)
  c.optimizer.warmup_steps = 7  # an explicit warmup wins over the reference
  c.num_train_steps = 80
  assert (c.optimizer.warmup_steps, c.eval_every_steps) == (7, 16)
  digits = load_config_module('digits').get_config()
  digits.num_train_steps = 40  # its warmup is 2 epochs: 44 steps of 64 images out of 1,437
  with pytest.raises(ConfigError, match=r'warmup of 44 steps .*warmup_epochs=2 x 22 steps per '
                     r'epoch.* end of the run at 40 steps.*warmup_steps below 40'):
    optim.make_lr_schedule(digits.optimizer, batch_size=64, total_steps=40, steps_per_epoch=22)
