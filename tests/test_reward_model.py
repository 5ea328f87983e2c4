"""RewardModel: scores from each response's last hidden state, in either layout."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefix_dpo import layout, losses, model as model_lib, sharding
from prefix_dpo.reward_model import RewardModel

CFG = dataclasses.replace(model_lib.PRESETS['tiny'], vocab_size=64)
EXAMPLES = [
    layout.Example([1, 5, 9, 2], [[7, 7, 3], [4, 8], [11]]),
    layout.Example([3], [[6, 2, 2, 9], [5]]),
    layout.Example([8, 8, 4, 12, 13], [[1], [2, 3], [4, 5, 6], [7]]),
]


scores_of = nnx.jit(lambda model, batch: model.scores(batch))
hidden_of = nnx.jit(lambda model, *ids: model(*ids))


def as_jax(batch):
  return {k: jnp.asarray(v) for k, v in batch.items()}


def test_scores_are_the_value_head_on_each_standalone_last_token():
  rm = RewardModel(CFG, rngs=nnx.Rngs(0))
  batch = layout.build_batch(EXAMPLES, layout='prefix_shared', seq_len=40, num_responses=4)
  scores = np.asarray(scores_of(rm, as_jax(batch)))
  # Every [prompt | response] on its own row, built by hand, in one forward pass.
  rows = [(e, k, list(ex.prompt) + list(r)) for e, ex in enumerate(EXAMPLES)
          for k, r in enumerate(ex.responses)]
  ids, positions, segments = (np.zeros((len(rows), 16), np.int32) for _ in range(3))
  for i, (_, _, tokens) in enumerate(rows):
    ids[i, :len(tokens)], positions[i, :len(tokens)] = tokens, np.arange(len(tokens))
    segments[i, :len(tokens)] = 1
  hidden = hidden_of(rm.backbone, jnp.asarray(ids), jnp.asarray(positions),
                     jnp.asarray(segments), jnp.zeros_like(jnp.asarray(ids)))
  head = np.asarray(rm.value_head[...])
  for i, (e, k, tokens) in enumerate(rows):
    np.testing.assert_allclose(scores[e, k], np.asarray(hidden[i, len(tokens) - 1]) @ head,
                               rtol=1e-5, atol=1e-5)
  assert np.all(scores[~batch['response_mask']] == 0)


def test_paired_and_packed_prefix_shared_scores_agree():
  rm = RewardModel(CFG, rngs=nnx.Rngs(1))
  paired = layout.build_batch(EXAMPLES, layout='paired', seq_len=16, pack=False)
  shared = layout.build_batch(EXAMPLES, layout='prefix_shared', seq_len=40, pack=True)
  assert shared['input_ids'].shape[0] < paired['input_ids'].shape[0]
  np.testing.assert_allclose(np.asarray(scores_of(rm, as_jax(paired))),
                             np.asarray(scores_of(rm, as_jax(shared))),
                             rtol=1e-5, atol=1e-5)


def test_wraps_an_existing_decoder_and_trains_it():
  decoder = model_lib.Decoder(CFG, rngs=nnx.Rngs(2))
  rm = RewardModel.from_decoder(decoder, rngs=nnx.Rngs(3))
  assert rm.backbone is decoder and rm.cfg == CFG
  batch = as_jax(layout.build_batch(EXAMPLES, layout='prefix_shared', seq_len=40))
  cfg = losses.default_loss_config()
  cfg.type = 'reward_model'

  def loss_fn(model):
    return losses.compute_loss(cfg, policy_logps=None, reference_logps=None, counts=None,
                               response_mask=batch['response_mask'],
                               scores=model.scores(batch))[0]

  grads = nnx.jit(nnx.grad(loss_fn))(rm)
  assert float(jnp.abs(grads.value_head[...]).max()) > 0
  assert float(jnp.abs(grads.backbone.layers[0].mlp.w_up[...]).max()) > 0


def test_value_head_has_logical_axes_and_builds_sharded():
  mesh = sharding.make_mesh({'data': -1})
  rm = sharding.create_sharded(lambda: RewardModel(CFG, rngs=nnx.Rngs(0)), mesh)
  assert rm.value_head.get_metadata()['out_sharding'] == ('embed',)
  assert rm.value_head[...].shape == (CFG.hidden_size,)
  assert rm.value_head[...].sharding.mesh.shape == mesh.shape
