"""Convert official / HF PyTorch CvT weights to a cvt-flax model directory (or another layout).

  python -m cvt_flax.convert SRC OUT [--spec FILE] [--num-classes N] [--image-size N]
      [--activation quick_gelu|gelu] [--format flax|official|hf] [--check]

SRC: any checkpoint reference: an official `.pth` (state dict or training checkpoint), an HF
checkpoint directory or weights file with config.json beside it, a hub name (`microsoft/cvt-13`),
a cvt-flax model directory or a training workdir. OUT: a directory (`flax`, the default: the model
directory that `cvt_flax.from_pretrained` reads, with the source's eval transform and class names;
`hf`: config.json + model.safetensors + preprocessor_config.json) or a `.pth` file (`official`).

(This is the command-line entry point: unlike the rest of `cvt_flax.convert`, which sits below
`cvt_flax.io`, it uses `cvt_flax.io` to resolve references and write model directories.)

--check runs the PyTorch model on the source weights (transformers' CvT for HF sources, the
from-scratch official reference for official ones) and the converted Flax model on the same random
batch, prints the largest absolute logit difference, and exits with status 1 if it exceeds 1e-4.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import numpy as np
from flax import nnx

from cvt_flax import errors, files, io
from cvt_flax.convert import hf, pytorch, sources
from cvt_flax.convert.official import ConversionError
from cvt_flax.runtime import compiler, platforms

CHECK_TOLERANCE = 1e-4


def _parse_args(argv):
  p = argparse.ArgumentParser(prog='python -m cvt_flax.convert', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('src', help='official .pth, HF directory, or HF weights file')
  p.add_argument('out', help='output directory (flax, hf) or .pth file (official)')
  p.add_argument('--spec', help='model spec: official YAML, JSON, or a variant name (cvt-13...); '
                                'default: HF config.json or inferred from the weights')
  p.add_argument('--num-classes', type=int, help='default: the weights\' head; 0 drops the head')
  p.add_argument('--image-size', type=int,
                 help='evaluation resolution of an official .pth (default: from its file name, '
                      'e.g. 384 for ...-384x384-..., else 224)')
  p.add_argument('--revision', help='hub revision (branch, tag or commit) of a hub name')
  p.add_argument('--activation', choices=('quick_gelu', 'gelu'),
                 help='default: quick_gelu for official weights, gelu for HF')
  p.add_argument('--format', choices=('flax', 'official', 'hf'), default='flax')
  p.add_argument('--overwrite', action='store_true', help='replace an existing OUT')
  p.add_argument('--check', action='store_true', help='compare logits with PyTorch')
  p.add_argument('--check-size', type=int, default=224, help='image size of the --check batch')
  return p.parse_args(argv)


def _transformers_cannot_run(cfg) -> str | None:
  """Why transformers' CvT cannot run this architecture (see cvt_flax.convert.hf), or None."""
  if any(m != 'dw_bn' for m in cfg.qkv_proj_method):
    return f'qkv projection methods {list(cfg.qkv_proj_method)}'
  if any(d <= i for i, d in enumerate(cfg.depth)):  # it indexes per-stage rates by stage index
    return f'depths {list(cfg.depth)} (transformers needs depth[i] > i)'
  return None


def _torch_reference(src: sources.Source, cfg):
  """(PyTorch model on the source's own tensors, its name), in eval mode."""
  torch = errors.require('torch', 'torch')
  state = dict(src.state_dict)
  reason = _transformers_cannot_run(cfg) if src.layout == 'hf' else None
  if reason:
    print(f'check: transformers cannot run {reason}; using the PyTorch reference instead')
  if src.layout == 'hf' and not reason:
    transformers = errors.require('transformers', 'torch')
    model = transformers.CvtForImageClassification(
        transformers.CvtConfig.from_dict(src.hf_config))
    name = 'transformers CvtForImageClassification'
  else:
    reference = errors.require('cvt_flax.convert.torch_reference', 'torch')
    if src.layout == 'hf':
      state = hf.hf_to_official_state_dict(state, source=src.path)
    model = reference.build_reference_model(cfg)
    name = 'official CvT (PyTorch reference)'
  if cfg.num_classes == 0:
    state = {k: v for k, v in state.items() if not k.startswith(('head.', 'classifier.'))}
  missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()},
                                              strict=False)
  if unexpected or any(not k.endswith('num_batches_tracked') for k in missing):
    raise ConversionError(f'--check: {name} does not take these weights: missing {missing}, '
                          f'unexpected {unexpected}.')
  return model.eval(), name


def check_logits(src_path: str, model, size: int, seed: int = 0) -> float:
  """Max |logits(Flax) - logits(PyTorch)| on a random batch of two `size`x`size` images."""
  torch = errors.require('torch', 'torch')
  src = sources.read_source(src_path)
  reference, name = _torch_reference(src, model.config)
  images = np.random.default_rng(seed).normal(size=(2, model.config.in_chans, size, size))
  images = images.astype(np.float32)
  with torch.no_grad():
    out = reference(torch.from_numpy(images))
  want = (out.logits if hasattr(out, 'logits') else out).numpy()
  graphdef, state = nnx.split(model)
  forward = compiler.jit(lambda state, x: nnx.merge(graphdef, state)(x))  # one compile, not per op
  got = np.asarray(forward(state, images.transpose(0, 2, 3, 1)))
  diff = float(np.max(np.abs(got - want)))
  print(f'check: max |logit difference| = {diff:.3e} (Flax vs {name}, batch 2x{size}x{size}, '
        f'tolerance {CHECK_TOLERANCE:g})')
  return diff


def _save(model, args) -> None:
  if args.format == 'flax':
    try:
      io.save_model(model, args.out, overwrite=args.overwrite)
    except FileExistsError:
      errors.fail(f'{args.out} exists; pass --overwrite to replace it.')
  elif args.format == 'official':
    pytorch.save_official(model, args.out)
  else:
    pytorch.save_hf(model, args.out)
  cfg = model.config
  print(f'wrote {args.out} ({args.format}): {cfg.num_stages} stages, widths {list(cfg.dim_embed)}, '
        f'depths {list(cfg.depth)}, {cfg.num_classes} classes, activation {cfg.activation}')


def main(argv=None) -> int:
  args = _parse_args(argv)
  platforms.cpu_only_without_accelerator()
  with errors.reported():
    src = io.resolve(args.src, revision=args.revision)
    pytorch_source = io.detect(src) == io.PYTORCH
    if args.check and not pytorch_source:
      raise ConversionError(f'--check compares with PyTorch; {args.src} is a cvt-flax checkpoint.')
    # A PyTorch source at a URL is read (and --check'ed) from one local copy.
    local = (files.local_copy(src, sources.SOURCE_FILES) if pytorch_source
             else contextlib.nullcontext(src))
    with local as src:
      model = io.from_pretrained(src, spec=args.spec, num_classes=args.num_classes,
                                 activation=args.activation, image_size=args.image_size)
      _save(model, args)
      if args.check and check_logits(src, model, args.check_size) > CHECK_TOLERANCE:
        print('check FAILED: the converted model does not reproduce PyTorch', file=sys.stderr)
        return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
