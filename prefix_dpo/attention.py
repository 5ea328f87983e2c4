"""Attention over rows described by per-token ids, with one dispatch point.

``impl='xla'`` is the reference: a dense masked softmax built from the ids by
:func:`prefix_dpo.masks.dense_mask`; correct on every backend.
``impl='xla_blocked'`` computes only the (query block, key block) tiles that
the mask leaves non-empty, in plain XLA (fast on CPU; no kernel needed).
``impl='pallas'`` is the block-sparse kernel of :mod:`kernels_pallas`.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax
import jax.numpy as jnp

from prefix_dpo import masks

IMPLS = ('xla', 'xla_blocked', 'pallas')
BLOCK = 64  # tile size of 'xla_blocked'

# Static tile budget of 'xla_blocked', read when a computation is traced.
_MAX_TILES: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    'max_tiles', default=None)


@contextlib.contextmanager
def tile_budget(max_tiles: int | None) -> Iterator[None]:
  """Caps the tiles 'xla_blocked' computes, for computations traced inside.

  Shapes must be static, so the number of non-empty tiles is fixed at trace
  time: by default every tile on or below the diagonal (always enough). A
  caller that knows its batches (e.g. the benchmark, from
  :func:`count_tiles`) passes a tighter budget. A batch with more non-empty
  tiles than the budget gets NaN outputs -- loud, unlike dropped tiles; a
  dense fallback branch would cost its ``seq ** 2`` buffers and compile time
  in every step.
  """
  token = _MAX_TILES.set(max_tiles)
  try:
    yield
  finally:
    _MAX_TILES.reset(token)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
              branch_ids: jax.Array, *, impl: str = 'xla',
              sm_scale: float | None = None) -> jax.Array:
  """Masked attention with the prefix-sharing rule.

  Args:
    q: ``[batch, seq, heads, head_dim]``.
    k, v: ``[batch, seq, kv_heads, head_dim]``; ``heads % kv_heads == 0``.
    segment_ids, branch_ids: ``[batch, seq]`` int32.
    impl: ``'xla'`` or ``'pallas'``.
    sm_scale: softmax scale; default ``head_dim ** -0.5``.
  Returns:
    ``[batch, seq, heads, head_dim]`` in q's dtype; zeros for padding queries.
  """
  if sm_scale is None:
    sm_scale = q.shape[-1] ** -0.5
  if impl == 'xla':
    return xla_attention(q, k, v, segment_ids, branch_ids, sm_scale=sm_scale)
  if impl == 'xla_blocked':
    return blocked_attention(q, k, v, segment_ids, branch_ids, sm_scale=sm_scale,
                             max_tiles=_MAX_TILES.get())
  if impl == 'pallas':
    import kernels_pallas  # pylint: disable=g-import-not-at-top
    # pallas_call cannot be partitioned by the compiler: under a multi-device
    # mesh (jax.set_mesh, as the trainer does) each device runs the kernel on
    # its rows and heads via shard_map.
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
      return kernels_pallas.block_sparse_attention(q, k, v, segment_ids, branch_ids,
                                                   sm_scale=sm_scale)
    return kernels_pallas.sharded_block_sparse_attention(
        q, k, v, segment_ids, branch_ids, mesh=mesh, sm_scale=sm_scale)
  raise ValueError(f'unknown attention impl {impl!r}; expected one of {IMPLS}')


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                  segment_ids: jax.Array, branch_ids: jax.Array, *,
                  sm_scale: float) -> jax.Array:
  """Dense reference attention; scores and softmax in float32."""
  batch, seq, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  if heads % kv_heads:
    raise ValueError(f'heads={heads} is not a multiple of kv_heads={kv_heads}')
  groups = heads // kv_heads
  q, k, v = _heads_major(q, k, v, kv_heads)
  scores = jnp.einsum('bhqd,bhkd->bhqk', q, k,
                      preferred_element_type=jnp.float32) * sm_scale
  scores = scores.reshape(batch, kv_heads, groups, seq, seq)
  mask = masks.dense_mask(segment_ids, branch_ids)[:, None, None]
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  # A query with no visible key (padding) would get a uniform softmax: zero it.
  probs = jnp.where(mask.any(axis=-1, keepdims=True), probs, 0.0)
  probs = probs.reshape(batch, kv_heads, groups * seq, seq)
  out = jnp.einsum('bhqk,bhkd->bhqd', probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return _seq_major(out, groups).astype(q.dtype)


def _heads_major(q: jax.Array, k: jax.Array, v: jax.Array, kv_heads: int):
  """``[b, s, h, d]`` -> q ``[b, kv, g * s, d]``, k/v ``[b, kv, s, d]``.

  Leading batch dims and a trailing contraction dim: the layout XLA's CPU dot
  emitter handles well (the grouped 5-D einsum ran ~4x slower).
  """
  batch, seq, heads, head_dim = q.shape
  groups = heads // kv_heads
  q = q.reshape(batch, seq, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
  q = q.reshape(batch, kv_heads, groups * seq, head_dim)
  return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _seq_major(out: jax.Array, groups: int) -> jax.Array:
  """``[b, kv, g * s, d]`` -> ``[b, s, kv * g, d]`` (inverse of the q layout)."""
  batch, kv_heads, gs, head_dim = out.shape
  seq = gs // groups
  out = out.reshape(batch, kv_heads, groups, seq, head_dim).transpose(0, 3, 1, 2, 4)
  return out.reshape(batch, seq, kv_heads * groups, head_dim)

def _block_visibility(segment_ids, branch_ids, block: int):
  """``[batch, n, n]`` bool: whether (query block, key block) has an allowed pair.

  Works on numpy and jax arrays; ``seq`` must be a multiple of ``block``.
  """
  batch, seq = segment_ids.shape
  n = seq // block
  mask = masks.dense_mask(segment_ids, branch_ids)
  return mask.reshape(batch, n, block, n, block).any(axis=(2, 4))


def count_tiles(segment_ids, branch_ids, block: int = BLOCK) -> int:
  """Non-empty tiles of a host batch: the budget :func:`tile_budget` needs."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  seg, br = np.asarray(segment_ids), np.asarray(branch_ids)
  pad = -seg.shape[1] % block
  seg, br = (np.pad(x, ((0, 0), (0, pad))) for x in (seg, br))
  return int(_block_visibility(seg, br, block).sum())


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                      segment_ids: jax.Array, branch_ids: jax.Array, *,
                      sm_scale: float, block: int = BLOCK,
                      max_tiles: int | None = None) -> jax.Array:
  """Attention over the non-empty tiles only; equal to :func:`xla_attention`.

  The rows are cut into ``block``-token blocks. The (row, query block, key
  block) tiles with at least one allowed pair are listed (at most
  ``max_tiles``, a static number), gathered, scored with the exact mask, and
  softmax-normalised across the tiles of each query block with segment sums.
  Cost and memory scale with the allowed pairs, not with ``seq ** 2``:
  padding, other packed examples, sibling responses and the causal upper
  triangle are skipped.

  Args and returns as :func:`xla_attention`; ``max_tiles=None`` budgets every
  tile on or below the diagonal (always enough); with fewer, a batch with
  more non-empty tiles gives NaN (see :func:`tile_budget`).
  """
  batch, seq, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  if heads % kv_heads:
    raise ValueError(f'heads={heads} is not a multiple of kv_heads={kv_heads}')
  groups = heads // kv_heads
  block = min(block, seq)
  pad = -seq % block
  if pad:  # padding tokens have segment 0: never visible
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    segment_ids, branch_ids = (jnp.pad(x, ((0, 0), (0, pad)))
                               for x in (segment_ids, branch_ids))
  n = (seq + pad) // block
  causal_tiles = batch * n * (n + 1) // 2
  budget = causal_tiles if max_tiles is None else max(1, min(max_tiles, causal_tiles))
  visible = _block_visibility(segment_ids, branch_ids, block).reshape(-1)
  count = jnp.sum(visible)
  (tile,) = jnp.nonzero(visible, size=budget, fill_value=0)
  valid = jnp.arange(budget) < count
  q_block = tile // n                           # row * n + query block
  k_block = (tile // (n * n)) * n + tile % n    # row * n + key block
  index = jnp.arange(n * block, dtype=jnp.int32).reshape(n, block)
  ids = lambda x, b: x.reshape(batch * n, block)[b]
  tile_mask = masks.allowed(
      ids(segment_ids, q_block)[:, :, None], ids(branch_ids, q_block)[:, :, None],
      index[q_block % n][:, :, None], ids(segment_ids, k_block)[:, None, :],
      ids(branch_ids, k_block)[:, None, :], index[k_block % n][:, None, :])
  tile_mask = (tile_mask & valid[:, None, None])[:, None, None]  # [t, 1, 1, q, k]
  # Blocks as [row * n, kv, (g *) block, d], then one gather per operand.
  blocks = lambda x, h: x.reshape(batch * n, block, kv_heads, h, head_dim).transpose(
      0, 2, 3, 1, 4).reshape(batch * n, kv_heads, h * block, head_dim)
  qt = blocks(q, groups)[q_block]  # [t, kv, g * q, d]
  kt = blocks(k, 1)[k_block]       # [t, kv, k, d]
  vt = blocks(v, 1)[k_block]
  scores = jnp.einsum('thqd,thkd->thqk', qt, kt, preferred_element_type=jnp.float32)
  scores = scores.reshape(budget, kv_heads, groups, block, block) * sm_scale
  scores = jnp.where(tile_mask, scores, jnp.finfo(jnp.float32).min)
  # Unused budget slots go to an extra segment that is dropped.
  seg = jnp.where(valid, q_block, batch * n)
  segments = dict(segment_ids=seg, num_segments=batch * n + 1, indices_are_sorted=True)
  # The max only stabilises exp(); its gradient cancels.
  top = jax.lax.stop_gradient(jax.ops.segment_max(scores.max(axis=-1), **segments))
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  probs = jnp.where(tile_mask, jnp.exp(scores - top[seg][..., None]), 0.0)
  total = jax.ops.segment_sum(probs.sum(axis=-1), **segments)[:-1]  # [bn, kv, g, q]
  probs = probs.reshape(budget, kv_heads, groups * block, block)
  out = jnp.einsum('thqk,thkd->thqd', probs.astype(v.dtype), vt,
                   preferred_element_type=jnp.float32)
  out = jax.ops.segment_sum(out, **segments)[:-1]  # [bn, kv, g * q, d]
  total = total.reshape(batch * n, kv_heads, groups * block, 1)
  # Queries that see nothing (padding) get zeros, as in xla_attention.
  out = jnp.where(total > 0, out / jnp.where(total > 0, total, 1.0), 0.0)
  out = out.reshape(batch, n, kv_heads, groups, block, head_dim).transpose(0, 1, 4, 2, 3, 5)
  out = out.reshape(batch, n * block, heads, head_dim).astype(q.dtype)
  if budget < causal_tiles:  # some tiles may not fit: poison, never drop silently
    out = jnp.where(count <= budget, out, jnp.nan)
  return out[:, :seq]
