"""The mission's property: prefix_shared == paired, in log-probs, loss and gradients."""
import dataclasses

import jax
import numpy as np
import jax.numpy as jnp
from flax import nnx
from hypothesis import given, settings, strategies as st

from prefix_dpo import layout, logprobs, losses, model as model_lib
from prefix_dpo.verify import max_rel_grad_diff
from tests import strategies

CFG = dataclasses.replace(model_lib.PRESETS['tiny'], vocab_size=64)
SEQ_LEN, ROWS, EXAMPLES, RESPONSES = 48, 12, 4, 3
POLICY = model_lib.Decoder(CFG, rngs=nnx.Rngs(0))
REFERENCE_LOGPS = jnp.asarray(np.random.default_rng(0).normal(-20, 3, (EXAMPLES, RESPONSES)),
                              jnp.float32)


@nnx.jit
@nnx.value_and_grad(has_aux=True)
def dpo(model, batch):
  logps, _ = logprobs.model_logprobs(model, batch, chunk_size=32)
  loss, _ = losses.dpo_sigmoid(logps, REFERENCE_LOGPS, batch['response_mask'], beta=0.5)
  return loss, logps


def run(examples, name, pack):
  batch = layout.build_batch(examples, layout=name, seq_len=SEQ_LEN, num_rows=ROWS,
                             max_examples=EXAMPLES, num_responses=RESPONSES, pack=pack)
  (loss, logps), grads = dpo(POLICY, {k: jnp.asarray(v) for k, v in batch.items()})
  return float(loss), np.asarray(logps), grads, batch['response_mask']


@settings(max_examples=12)
@given(strategies.example_lists(max_size=EXAMPLES, vocab_size=64, max_prompt=20),
       st.booleans())
def test_prefix_shared_equals_paired(examples, pack):
  loss_p, logps_p, grads_p, mask = run(examples, 'paired', pack=False)
  loss_s, logps_s, grads_s, _ = run(examples, 'prefix_shared', pack=pack)
  counts = np.array([[len(r) for r in ex.responses] + [1] * (RESPONSES - len(ex.responses))
                     for ex in examples] + [[1] * RESPONSES] * (EXAMPLES - len(examples)))
  assert np.max(np.abs(logps_p - logps_s)[mask] / counts[mask]) <= 1e-5
  assert abs(loss_p - loss_s) <= 1e-5
  assert max_rel_grad_diff(grads_p, grads_s) <= 1e-4
  assert max(jax.tree.leaves(jax.tree.map(lambda g: float(jnp.abs(g).max()),
                                          nnx.to_pure_dict(grads_p)))) > 0
