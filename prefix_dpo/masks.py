"""The attention-mask rule of prefix sharing: the one source of truth.

Every token carries two ids:
  * ``segment_id``: which packed example it belongs to (0 = padding).
  * ``branch_id``: 0 for the shared prompt, k >= 1 for response k.

Query q may attend key k iff
  same non-zero segment  AND  k at or before q in the row  AND
  (k is in the prompt  OR  k is in q's own response).

The reference attention, the Pallas kernel (inside its blocks and in its block
metadata) and the tests all call :func:`allowed`, so the rule exists once.
"""
from __future__ import annotations

from typing import Any

import numpy as np

Array = Any  # numpy or jax array; the rule only uses operators both support.


def allowed(q_segment: Array, q_branch: Array, q_index: Array,
            k_segment: Array, k_branch: Array, k_index: Array) -> Array:
  """Element-wise mask rule; broadcasts like its operands.

  Written with operators only (no ``np.``/``jnp.`` calls) so that it runs on
  numpy arrays, jax arrays and inside Pallas kernels alike. ``*_index`` is the
  token's index in the row (not its RoPE position).
  """
  same_example = (q_segment == k_segment) & (q_segment > 0)
  causal = k_index <= q_index
  visible_branch = (k_branch == 0) | (k_branch == q_branch)
  return same_example & causal & visible_branch


def dense_mask(segment_ids: Array, branch_ids: Array) -> Array:
  """The full mask of a batch of rows.

  Args:
    segment_ids: ``[batch, seq]`` int.
    branch_ids: ``[batch, seq]`` int.
  Returns:
    ``[batch, seq(query), seq(key)]`` bool, of the array type of the inputs.
  """
  seq = segment_ids.shape[-1]
  index = np.arange(seq, dtype=np.int32)
  return allowed(segment_ids[..., :, None], branch_ids[..., :, None],
                 index[:, None], segment_ids[..., None, :],
                 branch_ids[..., None, :], index[None, :])
