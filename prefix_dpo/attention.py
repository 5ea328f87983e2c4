"""Attention over rows described by per-token ids, with one dispatch point.

``impl='xla'`` is the reference: a dense masked softmax built from the ids by
:func:`prefix_dpo.masks.dense_mask`; correct on every backend.
``impl='pallas'`` is the block-sparse kernel of :mod:`kernels_pallas`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from prefix_dpo import masks

IMPLS = ('xla', 'pallas')


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
  if impl == 'pallas':
    from kernels_pallas import block_sparse_attention  # pylint: disable=g-import-not-at-top
    return block_sparse_attention(q, k, v, segment_ids, branch_ids,
                                  sm_scale=sm_scale)
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
  q = q.reshape(batch, seq, kv_heads, groups, head_dim)
  scores = jnp.einsum('bqhgd,bkhd->bhgqk', q, k,
                      preferred_element_type=jnp.float32) * sm_scale
  mask = masks.dense_mask(segment_ids, branch_ids)[:, None, None]
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  # A query with no visible key (padding) would get a uniform softmax: zero it.
  probs = jnp.where(mask.any(axis=-1, keepdims=True), probs, 0.0)
  out = jnp.einsum('bhgqk,bkhd->bqhgd', probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(batch, seq, heads, head_dim).astype(q.dtype)
