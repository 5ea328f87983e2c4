"""The kernel inside a sharded step: ``shard_map`` over (batch, heads).

Attention is independent per row and per head, so each device runs the kernel
on its rows (batch over ``('data', 'fsdp')``) and its heads (over
``'tensor'``) with no communication. Query head ``h`` uses kv head
``h // groups``; contiguous head shards keep that pairing when ``kv_heads`` is
a multiple of the ``'tensor'`` size.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.sharding import Mesh, PartitionSpec as P

from kernels_pallas.block_sparse import block_sparse_attention


def sharded_block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                                   segment_ids: jax.Array, branch_ids: jax.Array,
                                   *, mesh: Mesh,
                                   batch_axes: Sequence[str] = ('data', 'fsdp'),
                                   head_axis: str | None = 'tensor',
                                   **kernel_kwargs: Any) -> jax.Array:
  """:func:`block_sparse_attention` with rows and heads sharded over ``mesh``.

  Args:
    q: ``[batch, seq, heads, head_dim]``; k, v: ``[batch, seq, kv_heads,
      head_dim]``; segment_ids, branch_ids: ``[batch, seq]``.
    mesh: the device mesh; axes it lacks are ignored.
    batch_axes: mesh axes sharding the batch.
    head_axis: mesh axis sharding heads and kv heads (``None``: replicated).
    **kernel_kwargs: passed to :func:`block_sparse_attention`.
  Returns:
    ``[batch, seq, heads, head_dim]``, sharded like q.
  """
  batch_axes = tuple(a for a in batch_axes if a in mesh.shape)
  head_axis = head_axis if head_axis in mesh.shape else None
  rows = 1
  for axis in batch_axes:
    rows *= mesh.shape[axis]
  if q.shape[0] % rows:
    raise ValueError(f'batch={q.shape[0]} is not divisible by the {rows} '
                     f'shards of mesh axes {batch_axes}')
  if head_axis is not None:
    tensor = mesh.shape[head_axis]
    if q.shape[2] % tensor or k.shape[2] % tensor:
      raise ValueError(f'heads={q.shape[2]} and kv_heads={k.shape[2]} must be '
                       f'multiples of mesh axis {head_axis!r} ({tensor})')
  kernel_kwargs.setdefault('sm_scale', q.shape[-1] ** -0.5)
  batch = batch_axes or None
  heads_spec = P(batch, None, head_axis, None)
  ids_spec = P(batch, None)

  def local(q, k, v, segment_ids, branch_ids):
    return block_sparse_attention(q, k, v, segment_ids, branch_ids, **kernel_kwargs)

  return jax.shard_map(local, mesh=mesh,
                       in_specs=(heads_spec, heads_spec, heads_spec, ids_spec, ids_spec),
                       out_specs=heads_spec, check_vma=False)(
                           q, k, v, segment_ids, branch_ids)
