"""GPU backend: Pallas kernels with the Triton lowering.

One program per (q block, row, head) in the forward and dq passes, and per
(kv block, row, kv head) in the dk/dv pass. A program walks its compacted list
of non-empty blocks with two ``fori_loop``s: FULL blocks without the mask, then
PARTIAL blocks with :func:`prefix_dpo.masks.allowed`. Scores are kept in the
base-2 domain (``exp2``), as in JAX's Pallas GPU ``mha``; the log-sum-exp
residual ``lse2`` is in that domain too.

Layouts: q, do, o ``[batch, seq, heads, head_dim]``; k, v ``[batch, seq,
kv_heads, head_dim]``; ids ``[batch, seq]``; lse2, delta ``[batch, heads, seq]``.
``seq`` is a multiple of the block sizes and ``head_dim`` a power of two >= 16
(the wrapper pads).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.metadata import BlockMetadata
from prefix_dpo import masks

LOG2_E = math.log2(math.e)
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b


def _dot(a, b, dims=NN):
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


# Segment ids, branch ids and positions of the tokens of one block, each [block].
BlockIds = tuple[jax.Array, jax.Array, jax.Array]


def _block_ids(seg_ref, br_ref, n, block: int) -> BlockIds:
  """The ids of block ``n`` of size ``block``, from the row's [seq] id refs."""
  span = pl.ds(n * block, block)
  return seg_ref[span], br_ref[span], n * block + jnp.arange(block, dtype=jnp.int32)


def _mask(s, q_ids: BlockIds, k_ids: BlockIds):
  """``s`` [bq, bkv] with disallowed entries at -inf."""
  ok = masks.allowed(*(x[:, None] for x in q_ids), *(x[None, :] for x in k_ids))
  return jnp.where(ok, s, -jnp.inf)


def _kv_block_scores(q, q_ids: BlockIds, k_ref, v_ref, seg_ref, br_ref, j, *,
                     block_kv, scale2, masked):
  """Loads kv block ``j``; returns ``(k, v, scores)`` in base 2, masked if partial."""
  k_span = pl.ds(j * block_kv, block_kv)
  k, v = k_ref[k_span, :], v_ref[k_span, :]
  s = _dot(q, k, NT) * scale2
  if masked:
    s = _mask(s, q_ids, _block_ids(seg_ref, br_ref, j, block_kv))
  return k, v, s


def _visit_lists(body, full, count, carry):
  """Runs ``body(t, carry, masked)`` over FULL then PARTIAL list entries."""
  carry = lax.fori_loop(0, full, functools.partial(body, masked=False), carry)
  return lax.fori_loop(full, count, functools.partial(body, masked=True), carry)


def _params(num_warps, num_stages):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


class _QWalkSpecs(NamedTuple):
  """Grid and block specs of a pass whose program ``(q block i, row b, head h)``
  walks the kv blocks of q block ``i``: the forward and the dq pass."""
  grid: tuple[int, int, int]
  inputs: list[pl.BlockSpec]  # q, k, v, segment_ids, branch_ids
  lists: list[pl.BlockSpec]  # kv_blocks, kv_full, kv_count
  q_block: pl.BlockSpec  # [block_q, head_dim] of q, o, do, dq
  q_stats: pl.BlockSpec  # [block_q] of lse2, delta


def _q_walk_specs(q_shape: tuple[int, int, int, int], groups: int, block_q: int,
                  block_kv: int) -> _QWalkSpecs:
  """Specs for q ``[batch, seq, heads, head_dim]`` with ``groups`` query heads
  per kv head."""
  batch, seq, heads, head_dim = q_shape
  nq, nk = seq // block_q, seq // block_kv
  q_block = pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, i, h, 0))
  # k, v: the whole row of the kv head that query head h reads, [seq, head_dim].
  kv_row = pl.BlockSpec((None, seq, None, head_dim), lambda i, b, h: (b, 0, h // groups, 0))
  row = lambda i, b, h: (b, 0)
  ids = pl.BlockSpec((None, seq), row)
  per_q_block = pl.BlockSpec((None, nq), row)  # kv_full, kv_count of the row
  return _QWalkSpecs(
      grid=(nq, batch, heads),
      inputs=[q_block, kv_row, kv_row, ids, ids],
      lists=[pl.BlockSpec((None, None, nk), lambda i, b, h: (b, i, 0)),
             per_q_block, per_q_block],
      q_block=q_block,
      q_stats=pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i)))


# ----------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, seg_ref, br_ref, blocks_ref, full_ref,
                count_ref, o_ref, lse_ref, *, scale2, block_q, block_kv):
  i = pl.program_id(0)
  q = q_ref[...]
  head_dim = q.shape[-1]
  q_ids = _block_ids(seg_ref, br_ref, i, block_q)

  def body(t, carry, masked):
    acc, m, l = carry
    k, v, s = _kv_block_scores(q, q_ids, k_ref, v_ref, seg_ref, br_ref, blocks_ref[t],
                               block_kv=block_kv, scale2=scale2, masked=masked)
    m_next = jnp.maximum(m, s.max(axis=1))
    # Rows with no visible key yet keep m = -inf: subtract 0 there, not -inf.
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    p = jnp.exp2(s - m_safe[:, None])
    alpha = jnp.exp2(m - m_safe)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_next, l * alpha + p.sum(axis=1)

  carry = (jnp.zeros((block_q, head_dim), jnp.float32),
           jnp.full((block_q,), -jnp.inf, jnp.float32),
           jnp.zeros((block_q,), jnp.float32))
  acc, m, l = _visit_lists(body, full_ref[i], count_ref[i], carry)
  seen = l > 0  # padding queries see nothing: output 0, never NaN
  l_safe = jnp.where(seen, l, 1.0)
  o_ref[...] = jnp.where(seen[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log2(l_safe), 0.0)


def forward(q, k, v, segment_ids, branch_ids, meta: BlockMetadata, *,
            sm_scale: float, block_q: int, block_kv: int, interpret,
            num_warps: int | None = None, num_stages: int = 2):
  """Returns ``(o [batch, seq, heads, head_dim], lse2 [batch, heads, seq])``."""
  batch, seq, heads, head_dim = q.shape
  if num_warps is None:
    num_warps = 4 if head_dim <= 64 else 8
  kernel = functools.partial(_fwd_kernel, scale2=sm_scale * LOG2_E,
                             block_q=block_q, block_kv=block_kv)
  specs = _q_walk_specs(q.shape, heads // k.shape[2], block_q, block_kv)
  return pl.pallas_call(
      kernel,
      grid=specs.grid,
      in_specs=[*specs.inputs, *specs.lists],
      out_specs=[specs.q_block, specs.q_stats],  # o, lse2
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, seq), jnp.float32)],
      compiler_params=_params(num_warps, num_stages),
      interpret=interpret,
      name='block_sparse_attention_fwd',
  )(q, k, v, segment_ids, branch_ids, meta.kv_blocks, meta.kv_full, meta.kv_count)


# ---------------------------------------------------------------- backward


def _dq_kernel(q_ref, k_ref, v_ref, seg_ref, br_ref, do_ref, lse_ref, delta_ref,
               blocks_ref, full_ref, count_ref, dq_ref, *, sm_scale, block_q,
               block_kv):
  i = pl.program_id(0)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_ids = _block_ids(seg_ref, br_ref, i, block_q)
  scale2 = sm_scale * LOG2_E

  def body(t, dq, masked):
    k, v, s = _kv_block_scores(q, q_ids, k_ref, v_ref, seg_ref, br_ref, blocks_ref[t],
                               block_kv=block_kv, scale2=scale2, masked=masked)
    p = jnp.exp2(s - lse[:, None])
    ds = p * (_dot(do, v, NT) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  dq = jnp.zeros(q.shape, jnp.float32)
  dq = _visit_lists(body, full_ref[i], count_ref[i], dq)
  dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, seg_ref, br_ref, do_ref, lse_ref, delta_ref,
                blocks_ref, full_ref, count_ref, dk_ref, dv_ref, *, sm_scale,
                block_q, block_kv, groups):
  j = pl.program_id(0)
  k, v = k_ref[...], v_ref[...]
  k_ids = _block_ids(seg_ref, br_ref, j, block_kv)
  scale2 = sm_scale * LOG2_E
  full, count = full_ref[j], count_ref[j]

  def head(g, carry):
    def body(t, carry, masked):
      dk, dv = carry
      i = blocks_ref[t]
      q_span = pl.ds(i * block_q, block_q)
      q, do = q_ref[q_span, g, :], do_ref[q_span, g, :]
      lse, delta = lse_ref[g, q_span], delta_ref[g, q_span]
      s = _dot(q, k, NT) * scale2
      if masked:
        s = _mask(s, _block_ids(seg_ref, br_ref, i, block_q), k_ids)
      p = jnp.exp2(s - lse[:, None])
      dv = dv + _dot(p.astype(do.dtype).T, do)
      ds = p * (_dot(do, v, NT) - delta[:, None])
      return dk + _dot(ds.astype(q.dtype).T, q), dv

    return _visit_lists(body, full, count, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, groups, head, (zeros, zeros))
  dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, segment_ids, branch_ids, o, lse, do, meta: BlockMetadata,
             *, sm_scale: float, block_q: int, block_kv: int, interpret,
             num_warps: int | None = None, num_stages: int = 2):
  """Returns ``(dq, dk, dv)`` in the dtypes of q, k, v.

  ``meta`` must be the metadata of (``block_q``, ``block_kv``), the backward
  block sizes (they may differ from the forward's).
  """
  batch, seq, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  groups = heads // kv_heads
  nq, nk = seq // block_q, seq // block_kv
  if num_warps is None:
    num_warps = 4 if block_q * block_kv <= 64 * 64 and head_dim <= 64 else 8
  # delta_i = sum_d o_id * do_id: cheap and element-wise, left to XLA.
  delta = jnp.einsum('bshd,bshd->bhs', o.astype(jnp.float32), do.astype(jnp.float32))
  params = _params(num_warps, num_stages)

  specs = _q_walk_specs(q.shape, groups, block_q, block_kv)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, sm_scale=sm_scale, block_q=block_q,
                        block_kv=block_kv),
      grid=specs.grid,
      # The forward's operands with do, lse, delta before the lists.
      in_specs=[*specs.inputs, specs.q_block, specs.q_stats, specs.q_stats,
                *specs.lists],
      out_specs=specs.q_block,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params,
      interpret=interpret,
      name='block_sparse_attention_dq',
  )(q, k, v, segment_ids, branch_ids, do, lse, delta, meta.kv_blocks,
    meta.kv_full, meta.kv_count)

  row = lambda j, b, h: (b, 0)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, sm_scale=sm_scale, block_q=block_q,
                        block_kv=block_kv, groups=groups),
      grid=(nk, batch, kv_heads),
      in_specs=[
          # All the query heads of this kv head: [seq, groups, head_dim].
          pl.BlockSpec((None, seq, groups, head_dim), lambda j, b, h: (b, 0, h, 0)),
          pl.BlockSpec((None, block_kv, None, head_dim), lambda j, b, h: (b, j, h, 0)),
          pl.BlockSpec((None, block_kv, None, head_dim), lambda j, b, h: (b, j, h, 0)),
          pl.BlockSpec((None, seq), row),
          pl.BlockSpec((None, seq), row),
          pl.BlockSpec((None, seq, groups, head_dim), lambda j, b, h: (b, 0, h, 0)),
          pl.BlockSpec((None, groups, seq), lambda j, b, h: (b, h, 0)),
          pl.BlockSpec((None, groups, seq), lambda j, b, h: (b, h, 0)),
          pl.BlockSpec((None, None, nq), lambda j, b, h: (b, j, 0)),
          pl.BlockSpec((None, nk), row),
          pl.BlockSpec((None, nk), row),
      ],
      out_specs=[
          pl.BlockSpec((None, block_kv, None, head_dim), lambda j, b, h: (b, j, h, 0)),
          pl.BlockSpec((None, block_kv, None, head_dim), lambda j, b, h: (b, j, h, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params,
      interpret=interpret,
      name='block_sparse_attention_dkv',
  )(q, k, v, segment_ids, branch_ids, do, lse, delta, meta.q_blocks,
    meta.q_full, meta.q_count)
  return dq, dk, dv
