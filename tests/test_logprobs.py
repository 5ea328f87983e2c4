import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from prefix_dpo import layout, logprobs
from tests import strategies

VOCAB, WIDTH = 64, 8


def naive(hidden, unembedding, examples, batch):
  """Per-response sums from full float64 logits, looping token by token."""
  logits = np.einsum('rsd,dv->rsv', np.asarray(hidden, np.float64), np.asarray(unembedding, np.float64))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  n = batch['response_mask'].shape[1]
  out = np.zeros((len(examples), n))
  for (row, col), slot in np.ndenumerate(batch['target_slot']):
    if slot >= 0:
      out[slot // n, slot % n] += logp[row, batch['logit_index'][row, col], batch['input_ids'][row, col]]
  return out


@given(strategies.example_lists(max_size=4, vocab_size=VOCAB),
       st.sampled_from(layout.LAYOUTS), st.integers(1, 40), st.booleans())
def test_chunked_log_probs_equal_the_naive_sum(examples, name, chunk, compact):
  batch = layout.build_batch(examples, layout=name, seq_len=48)
  rows = batch['input_ids'].shape[0]
  hidden = jax.random.normal(jax.random.key(rows), (rows, 48, WIDTH))
  unembedding = jax.random.normal(jax.random.key(1), (WIDTH, VOCAB))
  max_targets = int((batch['target_slot'] >= 0).sum()) + 3 if compact else None
  logps, counts = logprobs.response_logprobs(
      hidden, unembedding, {k: jnp.asarray(v) for k, v in batch.items()},
      num_examples=len(examples), num_responses=batch['response_mask'].shape[1],
      chunk_size=chunk, max_targets=max_targets)
  mask = batch['response_mask']
  np.testing.assert_allclose(np.asarray(logps)[mask], naive(hidden, unembedding, examples, batch)[mask],
                             rtol=1e-5, atol=1e-4)
  lengths = [[len(r) for r in ex.responses] + [0] * (mask.shape[1] - len(ex.responses))
             for ex in examples]
  np.testing.assert_array_equal(np.asarray(counts), lengths)


def test_gradient_flows_through_chunks_and_ignores_padding():
  batch = layout.build_batch([layout.Example([1, 2], [[3, 4], [5]])], layout='prefix_shared',
                             seq_len=10)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  hidden = jax.random.normal(jax.random.key(0), (1, 10, WIDTH))
  unembedding = jax.random.normal(jax.random.key(1), (WIDTH, VOCAB))
  grad = jax.grad(lambda h: logprobs.response_logprobs(
      h, unembedding, batch, num_examples=1, num_responses=2, chunk_size=3)[0].sum())(hidden)
  used = np.zeros(10, bool)
  used[[1, 2]] = True  # last prompt token (predicts both first tokens), chosen[0]
  assert np.all(np.abs(np.asarray(grad[0]))[~used] == 0)
  assert np.all(np.abs(np.asarray(grad[0]))[used].sum(-1) > 0)
