"""TPU backend: Pallas kernels with the Mosaic lowering.

Block skipping as in splash attention: the grid's last axis walks the slots of
a compacted block list, the lists are scalar-prefetch operands
(``PrefetchScalarGridSpec``), and the k/v (or q/do) index maps read the block
to fetch from them. Slots past a list's count repeat its last block, so the
pipeline sees an unchanged block index and issues no DMA; the body is skipped
with ``pl.when``. FULL slots skip the element-wise mask.

Layouts (the wrapper transposes): q, do, o ``[batch, heads, seq, head_dim]``;
k, v ``[batch, kv_heads, seq, head_dim]``. Ids and per-row statistics are
replicated over a lane (``[.., seq, 128]``, "column") or sublane (``[.., 8,
seq]``, "row") axis, as splash attention does, so that they broadcast against
``[block_q, block_kv]`` tiles without relayouts. Block sizes are multiples of
128. Softmax statistics are in the natural-log domain.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.metadata import BlockMetadata
from prefix_dpo import masks

LANES, SUBLANES = 128, 8
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b


def _dot(a, b, dims=NN):
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _widen(x: jax.Array, width: int) -> jax.Array:
  """``[rows, 128]`` lane-replicated values to ``[rows, width]``."""
  if width % LANES == 0:
    return jnp.tile(x, (1, width // LANES))
  if width < LANES:
    return x[:, :width]
  raise ValueError(f'width {width} must be < 128 or a multiple of 128')


def as_columns(x: jax.Array) -> jax.Array:
  """``[..., seq]`` to ``[..., seq, 128]`` (lane-replicated)."""
  return jnp.broadcast_to(x[..., None], (*x.shape, LANES))


def as_rows(x: jax.Array) -> jax.Array:
  """``[..., seq]`` to ``[..., 8, seq]`` (sublane-replicated)."""
  return jnp.broadcast_to(x[..., None, :], (*x.shape[:-1], SUBLANES, x.shape[-1]))


def _div(x, d: int):
  # lax.div, not //: floor division lowers through sign(), which Mosaic avoids.
  return x if d == 1 else lax.div(x, d)


def _slot_steps(t, full, count, step):
  """Runs ``step(masked)`` for a FULL or PARTIAL slot; nothing past ``count``."""
  pl.when(t < full)(lambda: step(False))
  pl.when((t >= full) & (t < count))(lambda: step(True))


def _params(n_parallel: int, n_arbitrary: int):
  return pltpu.CompilerParams(
      dimension_semantics=('parallel',) * n_parallel + ('arbitrary',) * n_arbitrary)


class _QWalkSpecs(NamedTuple):
  """Grid and block specs of a pass whose grid ``(b, h, q block i, list slot
  t)`` walks each q block's kv list (the scalar-prefetched ``blocks``): the
  forward and the dq pass."""
  grid: tuple[int, int, int, int]
  # q, k, v; q segment, branch ids (columns); kv segment, branch ids (rows).
  inputs: list[pl.BlockSpec]
  q_block: pl.BlockSpec  # [block_q, head_dim] of q, o, do, dq
  q_stats: pl.BlockSpec  # [block_q, 128] of lse, delta (columns)


def _q_walk_specs(q_shape: tuple[int, int, int, int], groups: int, block_q: int,
                  block_kv: int) -> _QWalkSpecs:
  """Specs for q ``[batch, heads, seq, head_dim]`` with ``groups`` query heads
  per kv head."""
  batch, heads, seq, head_dim = q_shape

  def kv_map(b, h, i, t, blocks, full, count):
    return b, _div(h, groups), blocks[b, i, t], 0

  def kv_ids_map(b, h, i, t, blocks, full, count):
    return b, 0, blocks[b, i, t]

  q_map = lambda b, h, i, t, *_: (b, h, i, 0)
  q_ids_map = lambda b, h, i, t, *_: (b, i, 0)
  q_block = pl.BlockSpec((None, None, block_q, head_dim), q_map)
  kv_block = pl.BlockSpec((None, None, block_kv, head_dim), kv_map)
  q_ids = pl.BlockSpec((None, block_q, LANES), q_ids_map)
  kv_ids = pl.BlockSpec((None, SUBLANES, block_kv), kv_ids_map)
  return _QWalkSpecs(
      grid=(batch, heads, seq // block_q, seq // block_kv),
      inputs=[q_block, kv_block, kv_block, q_ids, q_ids, kv_ids, kv_ids],
      q_block=q_block,
      q_stats=pl.BlockSpec((None, None, block_q, LANES), q_map))


def _mask_q_major(s, i, j, qseg_ref, qbr_ref, kseg_ref, kbr_ref):
  """``s`` [block_q, block_kv] of q block ``i`` and kv block ``j`` with
  disallowed entries at -inf; q ids are columns, kv ids rows."""
  block_q, block_kv = s.shape
  ok = masks.allowed(
      _widen(qseg_ref[...], block_kv), _widen(qbr_ref[...], block_kv),
      i * block_q + lax.broadcasted_iota(jnp.int32, s.shape, 0),
      kseg_ref[:1, :], kbr_ref[:1, :],
      j * block_kv + lax.broadcasted_iota(jnp.int32, s.shape, 1))
  return jnp.where(ok, s, -jnp.inf)


# ----------------------------------------------------------------- forward


def _fwd_kernel(blocks_ref, full_ref, count_ref, q_ref, k_ref, v_ref, qseg_ref,
                qbr_ref, kseg_ref, kbr_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref,
                *, sm_scale, block_kv, num_slots):
  b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(t == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def step(masked):
    j = blocks_ref[b, i, t]
    s = _dot(q_ref[...], k_ref[...], NT) * sm_scale  # [bq, bkv]
    if masked:
      s = _mask_q_major(s, i, j, qseg_ref, qbr_ref, kseg_ref, kbr_ref)
    m_prev, l_prev = m_ref[...], l_ref[...]  # [bq, 128]
    m_next = jnp.maximum(m_prev, s.max(axis=-1)[:, None])
    # Rows with no visible key yet keep m = -inf: subtract 0 there, not -inf.
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    p = jnp.exp(s - _widen(m_safe, block_kv))
    alpha = jnp.exp(m_prev - m_safe)
    m_ref[...] = m_next
    l_ref[...] = alpha * l_prev + p.sum(axis=-1)[:, None]
    v = v_ref[...]
    head_dim = acc_ref.shape[-1]
    acc_ref[...] = (_widen(alpha, head_dim) * acc_ref[...]
                    + _dot(p.astype(v.dtype), v))

  _slot_steps(t, full_ref[b, i], count_ref[b, i], step)

  @pl.when(t == num_slots - 1)
  def _finish():
    l = l_ref[...]
    seen = l > 0  # padding queries see nothing: output 0, never NaN
    l_safe = jnp.where(seen, l, 1.0)
    inv_l = jnp.where(seen, 1.0 / l_safe, 0.0)
    o = acc_ref[...] * _widen(inv_l, acc_ref.shape[-1])
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_ref[...] + jnp.log(l_safe), 0.0)


def forward(q, k, v, segment_ids, branch_ids, meta: BlockMetadata, *,
            sm_scale: float, block_q: int, block_kv: int, interpret):
  """Same contract as :func:`kernels_pallas.gpu.forward`; lse in natural log."""
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [b, h, s, d]
  batch, heads, seq, head_dim = q.shape
  groups = heads // k.shape[1]
  seg_col, br_col = as_columns(segment_ids), as_columns(branch_ids)
  seg_row, br_row = as_rows(segment_ids), as_rows(branch_ids)
  specs = _q_walk_specs(q.shape, groups, block_q, block_kv)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=specs.grid,
      in_specs=specs.inputs,
      out_specs=[specs.q_block, specs.q_stats],  # o, lse
      scratch_shapes=[pltpu.VMEM((block_q, LANES), jnp.float32),
                      pltpu.VMEM((block_q, LANES), jnp.float32),
                      pltpu.VMEM((block_q, head_dim), jnp.float32)],
  )
  kernel = functools.partial(_fwd_kernel, sm_scale=sm_scale, block_kv=block_kv,
                             num_slots=seq // block_kv)
  o, lse = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, seq, LANES), jnp.float32)],
      compiler_params=_params(3, 1),
      interpret=interpret,
      name='block_sparse_attention_fwd',
  )(meta.kv_blocks, meta.kv_full, meta.kv_count, q, k, v, seg_col, br_col,
    seg_row, br_row)
  return jnp.swapaxes(o, 1, 2), lse[..., 0]


# ---------------------------------------------------------------- backward


def _dq_kernel(blocks_ref, full_ref, count_ref, q_ref, k_ref, v_ref, qseg_ref,
               qbr_ref, kseg_ref, kbr_ref, do_ref, lse_ref, delta_ref, dq_ref,
               acc_ref, *, sm_scale, block_kv, num_slots):
  b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(t == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def step(masked):
    j = blocks_ref[b, i, t]
    k, v = k_ref[...], v_ref[...]
    s = _dot(q_ref[...], k, NT) * sm_scale
    if masked:
      s = _mask_q_major(s, i, j, qseg_ref, qbr_ref, kseg_ref, kbr_ref)
    p = jnp.exp(s - _widen(lse_ref[...], block_kv))
    dp = _dot(do_ref[...], v, NT)
    ds = p * (dp - _widen(delta_ref[...], block_kv))
    acc_ref[...] += _dot(ds.astype(k.dtype), k)

  _slot_steps(t, full_ref[b, i], count_ref[b, i], step)

  @pl.when(t == num_slots - 1)
  def _finish():
    dq_ref[...] = (acc_ref[...] * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(blocks_ref, full_ref, count_ref, q_ref, k_ref, v_ref, qseg_ref,
                qbr_ref, kseg_ref, kbr_ref, do_ref, lse_ref, delta_ref, dk_ref,
                dv_ref, dk_acc, dv_acc, *, sm_scale, block_q, block_kv, groups,
                num_slots):
  # Transposed tiles [block_kv, block_q] (keys in sublanes), as splash's dkv.
  b, j, g, t = (pl.program_id(0), pl.program_id(2), pl.program_id(3),
                pl.program_id(4))

  @pl.when((g == 0) & (t == 0))
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  def step(masked):
    i = blocks_ref[b, j, t]
    q, do = q_ref[...], do_ref[...]
    st = _dot(k_ref[...], q, NT) * sm_scale  # [bkv, bq]
    if masked:
      shape = (block_kv, block_q)
      ok = masks.allowed(
          qseg_ref[:1, :], qbr_ref[:1, :],
          i * block_q + lax.broadcasted_iota(jnp.int32, shape, 1),
          _widen(kseg_ref[...], block_q), _widen(kbr_ref[...], block_q),
          j * block_kv + lax.broadcasted_iota(jnp.int32, shape, 0))
      st = jnp.where(ok, st, -jnp.inf)
    pt = jnp.exp(st - lse_ref[:1, :])
    dv_acc[...] += _dot(pt.astype(do.dtype), do)
    dpt = _dot(v_ref[...], do, NT)
    dst = pt * (dpt - delta_ref[:1, :])
    dk_acc[...] += _dot(dst.astype(q.dtype), q)

  _slot_steps(t, full_ref[b, j], count_ref[b, j], step)

  @pl.when((g == groups - 1) & (t == num_slots - 1))
  def _finish():
    dk_ref[...] = (dk_acc[...] * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def backward(q, k, v, segment_ids, branch_ids, o, lse, do, meta: BlockMetadata,
             *, sm_scale: float, block_q: int, block_kv: int, interpret):
  """Same contract as :func:`kernels_pallas.gpu.backward`; lse in natural log."""
  delta = jnp.einsum('bshd,bshd->bhs', o.astype(jnp.float32), do.astype(jnp.float32))
  q, k, v, do = (jnp.swapaxes(x, 1, 2) for x in (q, k, v, do))
  batch, heads, seq, head_dim = q.shape
  kv_heads = k.shape[1]
  groups = heads // kv_heads
  nq, nk = seq // block_q, seq // block_kv
  seg_col, br_col = as_columns(segment_ids), as_columns(branch_ids)
  seg_row, br_row = as_rows(segment_ids), as_rows(branch_ids)
  # dq: like the forward, walking the kv lists.
  specs = _q_walk_specs(q.shape, groups, block_q, block_kv)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, sm_scale=sm_scale, block_kv=block_kv,
                        num_slots=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=specs.grid,
          # The forward's operands, then do, lse, delta.
          in_specs=[*specs.inputs, specs.q_block, specs.q_stats, specs.q_stats],
          out_specs=specs.q_block,
          scratch_shapes=[pltpu.VMEM((block_q, head_dim), jnp.float32)],
      ),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(3, 1),
      interpret=interpret,
      name='block_sparse_attention_dq',
  )(meta.kv_blocks, meta.kv_full, meta.kv_count, q, k, v, seg_col, br_col,
    seg_row, br_row, do, as_columns(lse), as_columns(delta))

  # dk, dv: per kv block, walk the q lists of every query head of the group.
  def qh_map(b, h, j, g, t, blocks, full, count):
    return b, h * groups + g, blocks[b, j, t], 0

  def q_ids_row_map(b, h, j, g, t, blocks, full, count):
    return b, 0, blocks[b, j, t]

  def stats_row_map(b, h, j, g, t, blocks, full, count):
    return b, h * groups + g, 0, blocks[b, j, t]

  k_map = lambda b, h, j, g, t, *_: (b, h, j, 0)
  k_ids_map = lambda b, h, j, g, t, *_: (b, j, 0)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, sm_scale=sm_scale, block_q=block_q,
                        block_kv=block_kv, groups=groups, num_slots=nq),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(batch, kv_heads, nk, groups, nq),
          in_specs=[
              pl.BlockSpec((None, None, block_q, head_dim), qh_map),
              pl.BlockSpec((None, None, block_kv, head_dim), k_map),
              pl.BlockSpec((None, None, block_kv, head_dim), k_map),
              pl.BlockSpec((None, SUBLANES, block_q), q_ids_row_map),
              pl.BlockSpec((None, SUBLANES, block_q), q_ids_row_map),
              pl.BlockSpec((None, block_kv, LANES), k_ids_map),
              pl.BlockSpec((None, block_kv, LANES), k_ids_map),
              pl.BlockSpec((None, None, block_q, head_dim), qh_map),
              pl.BlockSpec((None, None, SUBLANES, block_q), stats_row_map),
              pl.BlockSpec((None, None, SUBLANES, block_q), stats_row_map),
          ],
          out_specs=[pl.BlockSpec((None, None, block_kv, head_dim), k_map),
                     pl.BlockSpec((None, None, block_kv, head_dim), k_map)],
          scratch_shapes=[pltpu.VMEM((block_kv, head_dim), jnp.float32),
                          pltpu.VMEM((block_kv, head_dim), jnp.float32)],
      ),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(3, 2),
      interpret=interpret,
      name='block_sparse_attention_dkv',
  )(meta.q_blocks, meta.q_full, meta.q_count, q, k, v, seg_row, br_row, seg_col,
    br_col, do, as_rows(lse), as_rows(delta))
  return tuple(jnp.swapaxes(x, 1, 2) for x in (dq, dk, dv))
