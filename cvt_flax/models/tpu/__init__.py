"""The TPU backend: Pallas (Mosaic) kernels for what XLA would route through HBM, one op a module.

  token_attention  attention on the model's token layout, every key of an image in VMEM
  flash_attention  attention in blocks of 128 keys, for keys that do not fit
  mlp_residual     a block's second half (LayerNorm, MLP, stochastic depth, residual add), the
                   normalised tokens and the hidden layer kept in VMEM
  depthwise_conv   a block's three depthwise convolutions reading the token map once
                   (`depthwise_convs`), and with their training-mode BatchNorms
                   (`depthwise_convs_batch_norm`); its kernels take the whole map
                   (depthwise_conv_whole) or blocks of rows with a halo (depthwise_conv_rows)

This package's front door is these modules: `cvt_flax.models.compute` calls each op as
`tpu.<op>.<entry>`, through `tpu.sharded.on_batch_shards` where the batch is split over devices
(every entry is single-device), and asks `tpu.<op>.fits(...)` whether a shape fits its VMEM
plan. Every entry is a `jax.custom_vjp` whose backward pass is kernels too, and every kernel
declares a `pl.CostEstimate` of what it computes and moves, held to formulas from the shapes by the
tests.
`interpret=True` runs them in Pallas's TPU interpreter on any backend.
"""
from cvt_flax.models.tpu import (depthwise_conv, flash_attention, mlp_residual, sharded,
                                 token_attention)
