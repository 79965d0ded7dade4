"""The TPU backend: Pallas (Mosaic) kernels for what XLA would route through HBM.

`token_attention` keeps the attention scores in VMEM with every key of an image there, on the
model's token layout (`mha`); `flash_attention` does it in blocks of 128 keys, for keys that do
not fit (`attention`); `fused_mlp_block` keeps the normalised tokens and the MLP's hidden layer
there (`mlp`); `depthwise_convs` reads a token map once for a block's three convolutional
projections, and `depthwise_convs_batch_norm` does so with their training-mode BatchNorms
(`dwconv`). All are `jax.custom_vjp`s whose backward passes are kernels too, and every
kernel declares a `pl.CostEstimate` of what it computes and moves, held to formulas from the
shapes by the tests. `interpret=True` runs them in Pallas's TPU interpreter on any backend.
"""
from cvt_flax.models.tpu.attention import (BLOCK_K, BLOCK_Q, dkv_cost, dq_cost, flash_attention,
                                           forward_cost)
from cvt_flax.models.tpu.blocks import on_batch_shards
from cvt_flax.models.tpu.dwconv import depthwise_convs, depthwise_convs_batch_norm
from cvt_flax.models.tpu.mlp import fused_mlp_block
from cvt_flax.models.tpu.mha import token_attention
