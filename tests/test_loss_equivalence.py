"""Every loss gives the same values, metrics and gradients in every layout.

``paired`` one sequence per row (the baseline) against ``paired`` packed and
``prefix_shared`` packed, on fixed example sets with N = 2, 3, 4 and mixed
responses per prompt. All batches share one static shape (a 4-response grid,
fixed rows), so each loss compiles once.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefix_dpo import layout, logprobs, losses, model as model_lib
from prefix_dpo.reward_model import RewardModel
from prefix_dpo.verify import max_rel_grad_diff

CFG = dataclasses.replace(model_lib.PRESETS['tiny'], vocab_size=64)
SEQ_LEN, ROWS, EXAMPLES, RESPONSES = 40, 12, 3, 4
LAYOUTS = (('paired', False), ('paired', True), ('prefix_shared', True))
REFERENCE_LOGPS = jnp.asarray(
    np.random.default_rng(0).normal(-20, 3, (EXAMPLES, RESPONSES)), jnp.float32)
# Non-default settings where a loss has them, so that every term is exercised.
OVERRIDES = {'sigmoid': {'label_smoothing': 0.1}, 'robust': {'label_smoothing': 0.1},
             'rpo': {'label_smoothing': 0.1}, 'simpo': {'label_smoothing': 0.1},
             'reward_model': {'center_rewards_coefficient': 0.01}}


def example_sets():
  """Fixed random sets: every example with 2, 3 or 4 responses, then mixed."""
  rng = np.random.default_rng(1)
  tokens = lambda lo, hi: rng.integers(1, CFG.vocab_size, int(rng.integers(lo, hi))).tolist()

  def one(n):
    # Short and long prompts, 1-token and longer responses.
    return layout.Example(tokens(1, 13), [tokens(1, 7) for _ in range(n)])

  sets = [[one(n) for _ in range(EXAMPLES)] for n in (2, 3, 4)]
  sets.append([one(4), one(2), one(3)][:EXAMPLES - 1])  # and an empty example slot
  return sets


SETS = example_sets()


def batch_of(examples, name, pack):
  batch = layout.build_batch(examples, layout=name, seq_len=SEQ_LEN, num_rows=ROWS,
                             max_examples=EXAMPLES, num_responses=RESPONSES, pack=pack)
  return {k: jnp.asarray(v) for k, v in batch.items()}


def make_step(loss_type):
  cfg = losses.default_loss_config()
  cfg.type = loss_type
  cfg.update(OVERRIDES.get(loss_type, {}))

  @nnx.jit
  @nnx.value_and_grad(has_aux=True)
  def step(model, batch):
    if losses.is_reward_model(cfg):
      scores = model.scores(batch)
      loss, metrics = losses.compute_loss(cfg, policy_logps=None, reference_logps=None,
                                          counts=None, response_mask=batch['response_mask'],
                                          scores=scores)
      return loss, (metrics, scores)
    logps, counts = logprobs.model_logprobs(model, batch, chunk_size=32)
    reference = REFERENCE_LOGPS if losses.uses_reference(cfg) else None
    loss, metrics = losses.compute_loss(cfg, policy_logps=logps, reference_logps=reference,
                                        counts=counts, response_mask=batch['response_mask'])
    return loss, (metrics, logps)

  return step


@pytest.mark.parametrize('loss_type', losses.LOSSES)
def test_every_layout_gives_the_same_loss_metrics_and_gradients(loss_type):
  decoder = model_lib.Decoder(CFG, rngs=nnx.Rngs(0))
  model = (RewardModel.from_decoder(decoder, rngs=nnx.Rngs(1))
           if loss_type == 'reward_model' else decoder)
  step = make_step(loss_type)
  for i, examples in enumerate(SETS):
    runs = {}
    for name, pack in LAYOUTS:
      batch = batch_of(examples, name, pack)
      (loss, (metrics, per_response)), grads = step(model, batch)
      runs[name, pack] = (float(loss), jax.device_get(metrics), np.asarray(per_response),
                          grads, int(batch['input_ids'].any(axis=1).sum()))
    loss, metrics, per_response, grads, rows = runs['paired', False]
    assert max(jax.tree.leaves(jax.tree.map(lambda g: float(jnp.abs(g).max()),
                                            nnx.to_pure_dict(grads)))) > 0
    for key, (loss_b, metrics_b, per_response_b, grads_b, rows_b) in runs.items():
      where = f'{loss_type}, set {i}, {key}'
      assert rows_b <= rows, where
      assert loss_b == pytest.approx(loss, rel=1e-5, abs=1e-5), where
      for name, value in metrics.items():
        assert float(metrics_b[name]) == pytest.approx(float(value), rel=1e-4, abs=1e-5), (
            where, name)
      np.testing.assert_allclose(per_response_b, per_response, rtol=1e-5, atol=1e-4,
                                 err_msg=where)
      assert max_rel_grad_diff(grads, grads_b) <= 1e-4, where
    # Prefix sharing packs the same examples into fewer rows.
    assert runs['prefix_shared', True][4] < rows
