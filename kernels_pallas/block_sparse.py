"""Public entry: block-sparse attention with the prefix-sharing mask rule.

Pads the rows to whole blocks (segment 0), computes the block metadata from
the ids, picks the GPU (Triton) or TPU (Mosaic) kernels and differentiates
them with ``jax.custom_vjp`` (backward kernels for dq and dk/dv).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from kernels_pallas import gpu, tpu
from kernels_pallas.metadata import BlockMetadata, block_metadata

BACKENDS = ('gpu', 'tpu')
# (block_q, block_kv) defaults: forward, backward.
DEFAULT_BLOCKS = {'gpu': ((64, 64), (64, 64)), 'tpu': ((128, 128), (128, 128))}


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static settings of one call (hashable: a ``custom_vjp`` nondiff arg)."""
  backend: str
  sm_scale: float
  block_q: int
  block_kv: int
  bwd_block_q: int
  bwd_block_kv: int
  interpret: Any
  gpu_params: tuple[tuple[str, Any], ...] = ()

  def run(self, fn_name: str, *args, backward: bool = False):
    module = gpu if self.backend == 'gpu' else tpu
    bq, bkv = ((self.bwd_block_q, self.bwd_block_kv) if backward
               else (self.block_q, self.block_kv))
    extra = dict(self.gpu_params) if self.backend == 'gpu' else {}
    return getattr(module, fn_name)(*args, sm_scale=self.sm_scale, block_q=bq,
                                    block_kv=bkv, interpret=self.interpret,
                                    **extra)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention(q, k, v, seg, br, fwd_meta: BlockMetadata,
               bwd_meta: BlockMetadata, cfg: KernelConfig):
  return cfg.run('forward', q, k, v, seg, br, fwd_meta)[0]


def _attention_fwd(q, k, v, seg, br, fwd_meta, bwd_meta, cfg):
  o, lse = cfg.run('forward', q, k, v, seg, br, fwd_meta)
  return o, (q, k, v, seg, br, bwd_meta, o, lse)


def _attention_bwd(cfg, residuals, do):
  q, k, v, seg, br, bwd_meta, o, lse = residuals
  dq, dk, dv = cfg.run('backward', q, k, v, seg, br, o, lse, do, bwd_meta,
                       backward=True)
  return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def default_backend() -> str:
  """The kernel family for ``jax.default_backend()``: 'tpu' on TPU, else 'gpu'."""
  return 'tpu' if jax.default_backend() == 'tpu' else 'gpu'


def _interpret_mode(interpret: Any, backend: str) -> Any:
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  if interpret is True and backend == 'tpu':
    # The TPU interpreter simulates scalar prefetch, VMEM scratch and DMAs.
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    return pltpu.InterpretParams()
  return interpret


def _check_blocks(backend: str, *sizes: int) -> None:
  for size in sizes:
    if backend == 'tpu' and size % 128:
      raise ValueError(f'TPU block sizes must be multiples of 128, got {size}')
    if backend == 'gpu' and (size < 16 or size & (size - 1)):
      raise ValueError(f'GPU block sizes must be powers of two >= 16, got {size}')


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                           segment_ids: jax.Array, branch_ids: jax.Array, *,
                           sm_scale: float | None = None,
                           block_q: int | None = None,
                           block_kv: int | None = None,
                           bwd_block_q: int | None = None,
                           bwd_block_kv: int | None = None,
                           interpret: Any = None, backend: str | None = None,
                           skip_empty: bool = True,
                           gpu_params: dict[str, Any] | None = None) -> jax.Array:
  """Attention with the prefix-sharing rule, visiting only non-empty blocks.

  Args:
    q: ``[batch, seq, heads, head_dim]``.
    k, v: ``[batch, seq, kv_heads, head_dim]``; ``heads % kv_heads == 0``.
    segment_ids, branch_ids: ``[batch, seq]`` int (see :mod:`prefix_dpo.masks`).
    sm_scale: softmax scale; default ``head_dim ** -0.5``.
    block_q, block_kv: forward block sizes (GPU: powers of two >= 16, default
      64; TPU: multiples of 128, default 128).
    bwd_block_q, bwd_block_kv: backward block sizes; default the forward's.
    interpret: run the kernels in interpret mode; ``None`` = on CPU only.
      ``True`` means the generic interpreter for GPU kernels and
      ``pltpu.InterpretParams()`` for TPU kernels; any other value is passed to
      ``pallas_call`` as is.
    backend: ``'gpu'`` (Triton) or ``'tpu'`` (Mosaic) kernels; default from
      ``jax.default_backend()``.
    skip_empty: ``False`` visits the empty blocks too (benchmark baseline).
    gpu_params: Triton ``num_warps`` / ``num_stages`` overrides.
  Returns:
    ``[batch, seq, heads, head_dim]`` in q's dtype; zeros for queries that see
    no key (padding).
  """
  batch, seq, heads, head_dim = q.shape
  if k.shape != v.shape or k.shape[:2] != (batch, seq) or k.shape[3] != head_dim:
    raise ValueError(f'k {k.shape} and v {v.shape} must be [batch, seq, '
                     f'kv_heads, head_dim] matching q {q.shape}')
  if heads % k.shape[2]:
    raise ValueError(f'heads={heads} is not a multiple of kv_heads={k.shape[2]}')
  if segment_ids.shape != (batch, seq) or branch_ids.shape != (batch, seq):
    raise ValueError(f'ids {segment_ids.shape}, {branch_ids.shape} must be '
                     f'[batch, seq] = {(batch, seq)}')
  backend = backend or default_backend()
  if backend not in BACKENDS:
    raise ValueError(f'backend={backend!r}; expected one of {BACKENDS}')
  (fq, fkv), (bq, bkv) = DEFAULT_BLOCKS[backend]
  # The backward follows explicit forward sizes unless given its own.
  bwd_block_q = bwd_block_q or block_q or bq
  bwd_block_kv = bwd_block_kv or block_kv or bkv
  block_q, block_kv = block_q or fq, block_kv or fkv
  _check_blocks(backend, block_q, block_kv, bwd_block_q, bwd_block_kv)
  if sm_scale is None:
    sm_scale = head_dim ** -0.5
  cfg = KernelConfig(backend, float(sm_scale), block_q, block_kv, bwd_block_q,
                     bwd_block_kv, _interpret_mode(interpret, backend),
                     tuple(sorted((gpu_params or {}).items())))

  # Whole blocks: pad the rows with segment 0 (never attended, zero output).
  multiple = math.lcm(block_q, block_kv, bwd_block_q, bwd_block_kv)
  padded = -(-seq // multiple) * multiple
  # Triton loads need power-of-two sizes: zero-pad head_dim (scores unchanged).
  width = head_dim
  if backend == 'gpu':
    width = max(16, 1 << (head_dim - 1).bit_length())
  pad4 = ((0, 0), (0, padded - seq), (0, 0), (0, width - head_dim))
  q, k, v = (jnp.pad(x, pad4) for x in (q, k, v))
  seg, br = (jnp.pad(x.astype(jnp.int32), ((0, 0), (0, padded - seq)))
             for x in (segment_ids, branch_ids))

  fwd_meta = block_metadata(seg, br, block_q, block_kv, skip_empty=skip_empty)
  if (bwd_block_q, bwd_block_kv) == (block_q, block_kv):
    bwd_meta = fwd_meta
  else:
    bwd_meta = block_metadata(seg, br, bwd_block_q, bwd_block_kv,
                              skip_empty=skip_empty)
  out = _attention(q, k, v, seg, br, fwd_meta, bwd_meta, cfg)
  return out[:, :seq, :, :head_dim]
