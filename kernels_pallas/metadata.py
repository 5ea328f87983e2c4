"""Block-sparsity metadata of the prefix-sharing mask, computed on device.

The rows are cut into query blocks of ``block_q`` tokens and key blocks of
``block_kv`` tokens. Every (query block, key block) pair is

* ``EMPTY``: no query of the block may attend any key of the block (never
  loaded, never computed);
* ``FULL``: every query may attend every key (computed without the
  element-wise mask);
* ``PARTIAL``: anything else (the kernel evaluates :func:`masks.allowed`).

The classification is exact for any int ids (not only well-formed layouts) and
costs ``O(seq * kv_blocks * log2(block_kv))`` per row instead of the
``O(seq**2)`` of evaluating the mask everywhere:

* FULL: query ``q`` sees all of key block ``j`` iff it sees four virtual keys
  built from the block's summaries (min/max segment, min/max non-zero branch,
  last index); the rule is monotone in each of them.
* non-EMPTY: ``q`` sees some key of block ``j`` iff it sees the earliest key of
  ``(q's segment, branch 0)`` or of ``(q's segment, q's branch)`` in the block.
  Those two keys are found by binary search in the block sorted by
  ``(segment, branch, index)``.

A query block's pair is FULL/non-EMPTY iff it is so for all/some of its
queries. Every test is a call of :func:`prefix_dpo.masks.allowed`.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from prefix_dpo import masks

EMPTY, PARTIAL, FULL = 0, 1, 2


class BlockMetadata(NamedTuple):
  """What the kernels need to visit only the non-empty blocks.

  Lists put the FULL blocks first, then the PARTIAL ones (each ascending), so a
  kernel runs an unmasked loop then a masked loop. Entries past ``*_count``
  repeat the last listed block (so a TPU pipeline re-uses its buffer and issues
  no DMA for them); they are never computed.
  """
  kind: jax.Array       # [batch, q_blocks, kv_blocks] int32: EMPTY/PARTIAL/FULL
  kv_blocks: jax.Array  # [batch, q_blocks, kv_blocks] int32 key blocks per q block
  kv_full: jax.Array    # [batch, q_blocks] int32: leading FULL entries
  kv_count: jax.Array   # [batch, q_blocks] int32: non-empty entries
  q_blocks: jax.Array   # [batch, kv_blocks, q_blocks] int32 q blocks per key block
  q_full: jax.Array     # [batch, kv_blocks] int32
  q_count: jax.Array    # [batch, kv_blocks] int32


def _lower_bound(sorted_seg: jax.Array, sorted_br: jax.Array, seg: jax.Array,
                 br: jax.Array) -> jax.Array:
  """First position in every sorted key block whose (segment, branch) >= (seg, br).

  Args:
    sorted_seg, sorted_br: ``[batch, kv_blocks, block_kv]``, each block sorted
      lexicographically by (segment, branch).
    seg, br: ``[batch, seq]`` the looked-up pairs (one per query).
  Returns:
    ``[batch, seq, kv_blocks]`` int32 in ``[0, block_kv]``.
  """
  batch, nk, bk = sorted_seg.shape
  seq = seg.shape[1]
  flat_seg, flat_br = sorted_seg.reshape(-1), sorted_br.reshape(-1)
  base = ((jnp.arange(batch, dtype=jnp.int32)[:, None, None] * nk
           + jnp.arange(nk, dtype=jnp.int32)[None, None, :]) * bk)
  s, b = seg[:, :, None], br[:, :, None]

  def step(_, bounds):
    lo, hi = bounds
    mid = (lo + hi) // 2
    at = base + jnp.minimum(mid, bk - 1)
    mid_seg, mid_br = flat_seg[at], flat_br[at]
    less = (mid_seg < s) | ((mid_seg == s) & (mid_br < b))
    active = lo < hi
    return (jnp.where(active & less, mid + 1, lo),
            jnp.where(active & ~less, mid, hi))

  shape = (batch, seq, nk)
  lo = jnp.zeros(shape, jnp.int32)
  hi = jnp.full(shape, bk, jnp.int32)
  lo, _ = lax.fori_loop(0, bk.bit_length(), step, (lo, hi))
  return lo


def token_block_visibility(segment_ids: jax.Array, branch_ids: jax.Array,
                           block_kv: int) -> tuple[jax.Array, jax.Array]:
  """Whether each query sees some / all keys of each key block.

  Args:
    segment_ids, branch_ids: ``[batch, seq]`` int32; ``seq % block_kv == 0``.
    block_kv: keys per block.
  Returns:
    ``(sees_some, sees_all)``, each ``[batch, seq, kv_blocks]`` bool.
  """
  batch, seq = segment_ids.shape
  nk, bk = seq // block_kv, block_kv
  seg = segment_ids.astype(jnp.int32)
  br = branch_ids.astype(jnp.int32)
  index = jnp.arange(seq, dtype=jnp.int32)
  q_seg, q_br, q_idx = seg[:, :, None], br[:, :, None], index[None, :, None]

  # Some: the earliest (segment, 0) and (segment, q's branch) keys of the block.
  k_seg, k_br = seg.reshape(batch, nk, bk), br.reshape(batch, nk, bk)
  k_idx = jnp.broadcast_to(index.reshape(1, nk, bk), (batch, nk, bk))
  s_seg, s_br, s_idx = lax.sort((k_seg, k_br, k_idx), dimension=2, num_keys=3)
  flat = [a.reshape(-1) for a in (s_seg, s_br, s_idx)]
  base = ((jnp.arange(batch, dtype=jnp.int32)[:, None, None] * nk
           + jnp.arange(nk, dtype=jnp.int32)[None, None, :]) * bk)
  sees_some = jnp.zeros((batch, seq, nk), bool)
  for target in (jnp.zeros_like(br), br):
    pos = jnp.minimum(_lower_bound(s_seg, s_br, seg, target), bk - 1)
    c_seg, c_br, c_idx = (a[base + pos] for a in flat)
    # The candidate is a real key of the block: no false positives.
    sees_some |= masks.allowed(q_seg, q_br, q_idx, c_seg, c_br, c_idx)

  # All: virtual keys at the block's extremes.
  min_seg = k_seg.min(axis=2)[:, None, :]
  max_seg = k_seg.max(axis=2)[:, None, :]
  nonzero = k_br != 0
  has_nonzero = nonzero.any(axis=2)
  big = jnp.iinfo(jnp.int32).max
  nz_min = jnp.where(has_nonzero, jnp.where(nonzero, k_br, big).min(axis=2), 0)
  nz_max = jnp.where(has_nonzero, jnp.where(nonzero, k_br, -big).max(axis=2), 0)
  nz_min, nz_max = nz_min[:, None, :], nz_max[:, None, :]
  last = (jnp.arange(nk, dtype=jnp.int32) * bk + bk - 1)[None, None, :]
  zero = jnp.zeros_like(min_seg)
  sees_all = (masks.allowed(q_seg, q_br, q_idx, min_seg, zero, last)
              & masks.allowed(q_seg, q_br, q_idx, max_seg, zero, last)
              & masks.allowed(q_seg, q_br, q_idx, min_seg, nz_min, last)
              & masks.allowed(q_seg, q_br, q_idx, min_seg, nz_max, last))
  return sees_some, sees_all


def classify_blocks(segment_ids: jax.Array, branch_ids: jax.Array, block_q: int,
                    block_kv: int) -> jax.Array:
  """EMPTY/PARTIAL/FULL of every (q block, kv block): ``[batch, nq, nk]`` int32."""
  batch, seq = segment_ids.shape
  if seq % block_q or seq % block_kv:
    raise ValueError(f'seq={seq} must be a multiple of block_q={block_q} and '
                     f'block_kv={block_kv}')
  some, every = token_block_visibility(segment_ids, branch_ids, block_kv)
  shape = (batch, seq // block_q, block_q, seq // block_kv)
  some = some.reshape(shape).any(axis=2)
  every = every.reshape(shape).all(axis=2)
  return jnp.where(every, FULL, jnp.where(some, PARTIAL, EMPTY)).astype(jnp.int32)


def compact(kind: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Lists of non-empty blocks along the last axis of ``kind``.

  Args:
    kind: ``[..., n]`` EMPTY/PARTIAL/FULL.
  Returns:
    ``(blocks [..., n], num_full [...], count [...])``: FULL blocks first, then
    PARTIAL, ascending within each; padded with the last listed block (0 when
    none is listed).
  """
  n = kind.shape[-1]
  rank = jnp.where(kind == FULL, 0, jnp.where(kind == PARTIAL, 1, 2))
  order = jnp.argsort(rank * n + jnp.arange(n, dtype=jnp.int32), axis=-1)
  order = order.astype(jnp.int32)
  count = (kind != EMPTY).sum(axis=-1, dtype=jnp.int32)
  num_full = (kind == FULL).sum(axis=-1, dtype=jnp.int32)
  last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  slot = jnp.arange(n, dtype=jnp.int32)
  blocks = jnp.where(slot < count[..., None], order, last)
  return blocks, num_full, count


def block_metadata(segment_ids: jax.Array, branch_ids: jax.Array, block_q: int,
                   block_kv: int, *, skip_empty: bool = True) -> BlockMetadata:
  """Classification and visiting lists of a batch of rows (jit-able).

  Args:
    segment_ids, branch_ids: ``[batch, seq]`` int32, ``seq`` a multiple of
      both block sizes.
    block_q, block_kv: block sizes.
    skip_empty: ``False`` lists EMPTY blocks too, as PARTIAL (the kernel then
      visits every block: a dense masked flash attention, for benchmarks).
  """
  kind = classify_blocks(segment_ids, branch_ids, block_q, block_kv)
  visit = kind if skip_empty else jnp.where(kind == EMPTY, PARTIAL, kind)
  kv_blocks, kv_full, kv_count = compact(visit)
  q_blocks, q_full, q_count = compact(jnp.swapaxes(visit, 1, 2))
  return BlockMetadata(kind, kv_blocks, kv_full, kv_count, q_blocks, q_full,
                       q_count)


def brute_force_kind(segment_ids, branch_ids, block_q: int, block_kv: int):
  """The classification from the dense mask (numpy or jax; tests and checks)."""
  mask = masks.dense_mask(segment_ids, branch_ids)
  batch, seq, _ = mask.shape
  tiles = mask.reshape(batch, seq // block_q, block_q, seq // block_kv, block_kv)
  some = tiles.any(axis=(2, 4))
  every = tiles.all(axis=(2, 4))
  return (every * FULL + (some & ~every) * PARTIAL).astype('int32')
