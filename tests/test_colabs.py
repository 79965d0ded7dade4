"""The Colab notebooks (colabs/*.ipynb) run top to bottom in their FAST offline mode.

Each notebook is executed with nbclient in a fresh `python3` kernel (this venv's ipykernel) with
CVT_FLAX_FAST=1, the Agg matplotlib backend, a scratch working directory and TFDS data dir;
then one result of each is checked against the library or against the notebook's own claims.
"""
import json
import math
import re

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

from helpers import ROOT

COLABS = ROOT / 'colabs'
NOTEBOOKS = ('inference', 'finetune', 'parity', 'attention')
CELL_TIMEOUT_S = 600  # a CvT compile on a loaded 2-core machine can take minutes
_NUMBER = r'([0-9.]+(?:e[-+]?\d+)?)'


def run_notebook(name, tmp_path, monkeypatch) -> str:
  """Executes colabs/<name>.ipynb in tmp_path (raises on any cell error); returns its stdout,
  after checking that the setup cell printed the device line (JAX on this CPU machine's CPU)."""
  monkeypatch.setenv('CVT_FLAX_FAST', '1')
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
  nb = nbformat.read(COLABS / f'{name}.ipynb', as_version=4)
  NotebookClient(nb, kernel_name='python3', timeout=CELL_TIMEOUT_S,
                 resources={'metadata': {'path': str(tmp_path)}}).execute()
  text = ''.join(out.text for cell in nb.cells if cell.cell_type == 'code'
                 for out in cell.outputs if out.output_type == 'stream' and out.name == 'stdout')
  assert re.search(r'^jax [\d.]+, backend cpu, devices \[CpuDevice\(id=0\)\]; accelerator on this '
                   r'machine: none$', text, re.M), text[:500]
  return text


def assert_figures(tmp_path, *names):
  for name in names:
    path = tmp_path / 'figures' / f'{name}.png'
    assert path.is_file(), f'{path} was not written'
    with Image.open(path) as img:
      assert min(img.size) > 100, f'{path}: {img.size} is not a real figure'


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_is_committed_clean_with_badge_and_switches(name):
  nb = nbformat.read(COLABS / f'{name}.ipynb', as_version=4)
  nbformat.validate(nb)
  code_cells = [c for c in nb.cells if c.cell_type == 'code']
  assert all(not c.outputs and c.execution_count is None for c in code_cells), \
      f'{name}.ipynb: outputs must be stripped before committing'
  assert f'/blob/main/colabs/{name}.ipynb' in nb.cells[0].source, 'first cell: the Colab badge'
  setup = code_cells[0].source
  for line in ("REPO = 'https://github.com/cvt-flax/cvt-flax'",
               "FAST = os.environ.get('CVT_FLAX_FAST') == '1'", "'google.colab' in sys.modules",
               "runpy.run_path('cvt-flax/cvt_flax/accelerators.py')['install']('./cvt-flax'",
               'platforms.check_jax_devices()'):
    assert line in setup, f'{name}.ipynb setup cell lacks {line!r}'


def test_inference_notebook_shows_the_library_predictions(tmp_path, monkeypatch, fixtures_dir):
  text = run_notebook('inference', tmp_path, monkeypatch)
  assert_figures(tmp_path, 'inference_top5')
  assert 'RANDOM WEIGHTS' in text  # offline weights must be flagged as meaningless
  # The same photos through the library directly must give the printed top-5 (index, probability).
  import skimage.data  # pylint: disable=g-import-not-at-top
  from cvt_flax import from_pretrained, predict  # pylint: disable=g-import-not-at-top
  model = from_pretrained(fixtures_dir / 'official_tiny.pth',
                          spec=fixtures_dir / 'official_tiny.json')
  photos = ('astronaut', 'coffee', 'chelsea', 'rocket')
  results = predict.classify(model, [Image.fromarray(getattr(skimage.data, p)()) for p in photos])
  for photo, top in zip(photos, results):
    block = text.split(f'\n{photo}\n', 1)[1]
    printed = re.findall(r'^  \d\. +([0-9.]+)%  \[(\d+)\]', block, re.M)[:5]
    assert [int(i) for _, i in printed] == [e['index'] for e in top], photo
    np.testing.assert_allclose([float(q) / 100 for q, _ in printed], [e['prob'] for e in top],
                               atol=6e-5)


@pytest.mark.slow  # a 60-step training in a kernel: ~1.5 min on 2 cores (CI runs it)
def test_finetune_notebook_trains_and_evaluates(tmp_path, monkeypatch):
  from cvt_flax.training.metrics import read_metrics  # pylint: disable=g-import-not-at-top
  text = run_notebook('finetune', tmp_path, monkeypatch)
  assert_figures(tmp_path, 'finetune_curves', 'finetune_confusion', 'finetune_mistakes')
  match = re.search(
      rf'final test top-1: {_NUMBER}% on (\d+) images \(the trainer reported {_NUMBER}%\)', text)
  assert match, text[-2000:]
  ours, count, reported = float(match[1]), int(match[2]), float(match[3])
  assert count == 360  # the digits test split, each image once
  # The notebook's predictions from the reloaded checkpoint agree with the trainer's final eval.
  assert ours == pytest.approx(reported, abs=0.01)
  last_eval = [r for r in read_metrics(tmp_path / 'runs' / 'digits' / 'metrics.jsonl')
               if 'eval/top1' in r][-1]
  assert last_eval['step'] == 60
  assert 100 * last_eval['eval/top1'] == pytest.approx(ours, abs=0.01)
  assert ours > 50  # it learned: chance is 10%


def test_parity_notebook_matches_pytorch_within_1e5(tmp_path, monkeypatch):
  text = run_notebook('parity', tmp_path, monkeypatch)
  assert_figures(tmp_path, 'parity_errors', 'parity_gelu')
  diffs = [float(x) for x in re.findall(rf'max abs difference {_NUMBER}', text)]
  assert len(diffs) == 2 * 4, text  # official and HF: 3 stages + logits each
  assert max(diffs) < 1e-5
  # The activation table: each activation matches its own PyTorch reference only.
  row = re.compile(rf'^(QuickGELU|exact GELU|tanh GELU) +{_NUMBER} +{_NUMBER}$', re.M)
  rows = {m[1]: (float(m[2]), float(m[3])) for m in row.finditer(text)}
  assert set(rows) == {'QuickGELU', 'exact GELU', 'tanh GELU'}, text
  assert rows['QuickGELU'][0] < 1e-5 and rows['exact GELU'][1] < 1e-5
  assert rows['QuickGELU'][1] > 1e-4 and rows['exact GELU'][0] > 1e-4


def test_attention_notebook_maps_cls_attention_onto_the_key_grid(tmp_path, monkeypatch,
                                                                 fixtures_dir):
  text = run_notebook('attention', tmp_path, monkeypatch)
  assert_figures(tmp_path, 'attention_heads', 'attention_blocks', 'attention_features')
  spec = json.loads((fixtures_dir / 'official_tiny.json').read_text())['spec']
  tokens = 224 // math.prod(spec['PATCH_STRIDE'])  # the last stage's token map side
  keys = math.ceil(tokens / spec['STRIDE_KV'][-1])  # 3x3 conv, padding 1, stride_kv
  match = re.search(r'(\d+) heads; the cls token attends to a (\d+)x(\d+) grid of keys', text)
  assert match, text
  assert (int(match[1]), int(match[2]), int(match[3])) == (spec['NUM_HEADS'][-1], keys, keys)
  shares = re.search(r'on the image tokens .*: \[([^\]]+)\]', text)[1].split()
  assert len(shares) == spec['NUM_HEADS'][-1]
  assert all(0 < float(s) <= 1 for s in shares)


# --------------------------------------------------------------------------------------------------
# The notebooks' plotting helpers (cvt_flax.viz): the parts that compute something.

def test_cls_attention_grid_matches_the_models_key_tokens_on_a_non_square_image(fixtures_dir):
  from cvt_flax import load_pytorch, viz  # pylint: disable=g-import-not-at-top
  from cvt_flax.models import attention_maps  # pylint: disable=g-import-not-at-top
  model = load_pytorch(fixtures_dir / 'official_tiny.pth', spec=fixtures_dir / 'official_tiny.json')
  cfg = model.config
  images = np.random.default_rng(0).standard_normal((1, 64, 160, 3)).astype(np.float32)
  maps = attention_maps(model, images)
  h, w = model.features(images)['stage2'].shape[1:3]
  k, s, p = cfg.kernel_qkv[-1], cfg.stride_kv[-1], cfg.padding_kv[-1]
  expected = ((h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)  # the dw conv's output size
  cls = viz.cls_attention(maps[-1][-1], (h, w))
  assert cls.shape == (1, cfg.num_heads[-1]) + expected
  # Row-major: key token 1 + r * cols + c is grid cell (r, c).
  flat = np.asarray(maps[-1][-1])[0, :, 0, 1:]
  np.testing.assert_array_equal(cls[0, :, 1, 2], flat[:, expected[1] + 2])


def test_confusion_matrix_counts_true_by_predicted():
  from cvt_flax import viz  # pylint: disable=g-import-not-at-top
  counts = viz.confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], 3)
  np.testing.assert_array_equal(counts, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])


def test_pca_rgb_orders_pixels_along_the_main_direction_of_variation():
  from cvt_flax import viz  # pylint: disable=g-import-not-at-top
  ramp = np.linspace(-1, 1, 16)
  fmap = np.zeros((4, 4, 8))
  fmap[..., 3] = 5 * ramp.reshape(4, 4)  # the dominant direction: channel 3
  fmap += 0.01 * np.random.default_rng(0).standard_normal(fmap.shape)
  rgb = viz.pca_rgb(fmap)
  assert rgb.shape == (4, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
  first = rgb[..., 0].ravel()
  assert abs(np.corrcoef(first, ramp)[0, 1]) > 0.99
