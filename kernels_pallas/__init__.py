"""Pallas block-sparse attention for prefix-shared, packed rows.

:func:`block_sparse_attention` is the entry point (GPU Triton and TPU Mosaic
kernels, forward and backward); :mod:`kernels_pallas.metadata` computes which
blocks to visit; :func:`sharded_block_sparse_attention` wraps it in
``shard_map``.
"""
from kernels_pallas.block_sparse import BACKENDS, block_sparse_attention, default_backend
from kernels_pallas.metadata import BlockMetadata, block_metadata, classify_blocks
from kernels_pallas.sharding import sharded_block_sparse_attention

__all__ = ['BACKENDS', 'BlockMetadata', 'block_metadata', 'block_sparse_attention',
           'classify_blocks', 'default_backend', 'sharded_block_sparse_attention']
