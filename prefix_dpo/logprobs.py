"""Per-response log-probabilities from a laid-out batch.

Every response token ``j`` is scored by the logits at ``logit_index[j]`` of its
row (see :mod:`prefix_dpo.layout`), so the same code serves both layouts. The
``[tokens, vocab]`` logits are made chunk by chunk and rematerialised in the
backward pass: the whole batch's float32 logits never exist at once.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp


def token_logprobs(hidden: jax.Array, unembedding: jax.Array,
                   targets: jax.Array, *, chunk_size: int = 1024) -> jax.Array:
  """``log p(target | hidden)`` per token, in float32.

  Args:
    hidden: ``[tokens, hidden]`` predicting states (compute dtype).
    unembedding: ``[hidden, vocab]``.
    targets: ``[tokens]`` int token ids.
    chunk_size: tokens per logits chunk.
  Returns:
    ``[tokens]`` float32.
  """
  tokens = hidden.shape[0]
  chunk_size = max(1, min(chunk_size, tokens))
  chunks = -(-tokens // chunk_size)
  pad = chunks * chunk_size - tokens
  hidden = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(chunks, chunk_size, -1)
  targets = jnp.pad(targets, (0, pad)).reshape(chunks, chunk_size)
  weights = unembedding.astype(hidden.dtype)

  @jax.checkpoint
  def one_chunk(args):
    h, t = args
    logits = jnp.einsum('td,dv->tv', h, weights, preferred_element_type=jnp.float32)
    picked = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)

  return jax.lax.map(one_chunk, (hidden, targets)).reshape(-1)[:tokens]


def response_logprobs(hidden: jax.Array, unembedding: jax.Array,
                      batch: Mapping[str, jax.Array], *, num_examples: int,
                      num_responses: int, chunk_size: int = 1024,
                      max_targets: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Summed log-probs and token counts of every response.

  Args:
    hidden: ``[rows, seq, hidden]`` final hidden states.
    unembedding: ``[hidden, vocab]``.
    batch: ``input_ids``, ``logit_index``, ``target_slot`` ``[rows, seq]``.
    num_examples, num_responses: slot grid of the batch.
    chunk_size: tokens per logits chunk.
    max_targets: if set, only this many response tokens are scored (static
      compaction: logits of prompt and padding tokens are never computed). It
      must be at least the number of response tokens in the batch.
  Returns:
    ``(logps, counts)``, each ``[num_examples, num_responses]``: float32 sums
    and int32 token counts.
  """
  rows, seq, width = hidden.shape
  logit_index = batch['logit_index']
  slots = batch['target_slot'].reshape(-1)
  flat_logit = (logit_index + jnp.arange(rows)[:, None] * seq).reshape(-1)
  targets = batch['input_ids'].reshape(-1)
  if max_targets is not None:
    (keep,) = jnp.nonzero(slots >= 0, size=max_targets, fill_value=0)
    valid = jnp.arange(max_targets) < jnp.sum(slots >= 0)
    flat_logit, targets = flat_logit[keep], targets[keep]
    slots = jnp.where(valid, slots[keep], -1)
  predicting = jnp.take(hidden.reshape(rows * seq, width), flat_logit, axis=0)
  logps = token_logprobs(predicting, unembedding, targets, chunk_size=chunk_size)
  num_slots = num_examples * num_responses
  # Non-response tokens go to an extra slot that is dropped.
  segment = jnp.where(slots >= 0, slots, num_slots)
  sums = jax.ops.segment_sum(jnp.where(slots >= 0, logps, 0.0), segment,
                             num_segments=num_slots + 1)[:num_slots]
  counts = jax.ops.segment_sum((slots >= 0).astype(jnp.int32), segment,
                               num_segments=num_slots + 1)[:num_slots]
  shape = (num_examples, num_responses)
  return sums.reshape(shape), counts.reshape(shape)


def model_logprobs(model, batch: Mapping[str, jax.Array], *, chunk_size: int = 1024,
                   max_targets: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Runs ``model`` (a :class:`prefix_dpo.model.Decoder`) on a laid-out batch.

  Returns ``(logps, counts)`` ``[examples, responses]`` as
  :func:`response_logprobs`; the slot grid comes from ``response_mask``.
  """
  hidden = model(batch['input_ids'], batch['positions'], batch['segment_ids'],
                 batch['branch_ids'])
  num_examples, num_responses = batch['response_mask'].shape
  return response_logprobs(hidden, model.unembedding(), batch,
                           num_examples=num_examples, num_responses=num_responses,
                           chunk_size=chunk_size, max_targets=max_targets)
