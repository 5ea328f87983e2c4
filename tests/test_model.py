import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefix_dpo import layout, logprobs, model as model_lib
from prefix_dpo.layout import Example

CFG = dataclasses.replace(model_lib.PRESETS['tiny'], vocab_size=64, num_layers=2)


@pytest.fixture(scope='module')
def model():
  return model_lib.Decoder(CFG, rngs=nnx.Rngs(0))


@nnx.jit
def _logps(model, batch):
  return logprobs.model_logprobs(model, batch, chunk_size=16)[0]


def logps_of(model, examples, **kwargs):
  batch = layout.build_batch(examples, layout='prefix_shared', seq_len=32, num_rows=2,
                             max_examples=3, num_responses=3, **kwargs)
  return np.asarray(_logps(model, {k: jnp.asarray(v) for k, v in batch.items()}))


@pytest.mark.parametrize('position', range(3))
def test_changing_response_one_leaves_the_others_bit_identical(model, position):
  a = [Example([1, 2, 3, 4], [[5, 6, 7], [8, 9], [10]])]
  changed = [5, 6, 7]
  changed[position] = 60
  b = [Example([1, 2, 3, 4], [changed, [8, 9], [10]])]
  la, lb = logps_of(model, a), logps_of(model, b)
  assert la[0, 0] != lb[0, 0]
  np.testing.assert_array_equal(la[0, 1:], lb[0, 1:])


def test_a_longer_response_one_moves_the_others_without_changing_them(model):
  la = logps_of(model, [Example([1, 2, 3, 4], [[5, 6, 7], [8, 9], [10]])])
  lb = logps_of(model, [Example([1, 2, 3, 4], [[5, 60, 61, 62, 63], [8, 9], [10]])])
  np.testing.assert_allclose(la[0, 1:], lb[0, 1:], atol=1e-5)


def test_another_packed_example_and_padding_change_nothing(model):
  ex = Example([1, 2, 3], [[4, 5], [6]])
  alone = logps_of(model, [ex])
  packed = logps_of(model, [Example([9, 8, 7, 6, 5], [[4], [3, 2]]), ex])
  packed_other = logps_of(model, [Example([9, 1, 7, 6, 5], [[11], [3, 12]]), ex])
  np.testing.assert_allclose(alone[0, :2], packed[1, :2], atol=1e-5)
  np.testing.assert_array_equal(packed[1], packed_other[1])
  # Padding tokens' ids do not matter.
  batch = layout.build_batch([ex], layout='prefix_shared', seq_len=32, num_rows=2,
                             max_examples=3, num_responses=3)
  batch['input_ids'][batch['segment_ids'] == 0] = 33
  noisy = np.asarray(_logps(model, {k: jnp.asarray(v) for k, v in batch.items()}))
  np.testing.assert_array_equal(noisy, alone)


def test_padding_queries_give_finite_hidden_states(model):
  batch = layout.build_batch([Example([1], [[2], [3]])], layout='paired', seq_len=8,
                             num_rows=2)
  hidden = model(*(jnp.asarray(batch[k]) for k in
                   ('input_ids', 'positions', 'segment_ids', 'branch_ids')))
  assert hidden.shape == (2, 8, CFG.hidden_size)
  assert bool(jnp.isfinite(hidden).all())


def test_llama3_rope_scaling_matches_reference_formula():
  scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                 original_max_position_embeddings=8192)
  inv = np.asarray(model_lib.rope_inv_freq(128, 500000.0, scaling))
  base = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
  # Hand-written from Meta's reference apply_scaling().
  expected = []
  for f in base:
    wavelen = 2 * np.pi / f
    if wavelen < 8192 / 4.0:
      expected.append(f)
    elif wavelen > 8192 / 1.0:
      expected.append(f / 8.0)
    else:
      s = (8192 / wavelen - 1.0) / (4.0 - 1.0)
      expected.append((1 - s) * f / 8.0 + s * f)
  np.testing.assert_allclose(inv, expected, rtol=1e-5)


def test_rope_rotation_is_relative():
  x = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
  y = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))
  inv = model_lib.rope_inv_freq(8, 10000.0)
  def dot(pq, pk):
    q = model_lib.apply_rope(x, jnp.array([[pq]]), inv)
    k = model_lib.apply_rope(y, jnp.array([[pk]]), inv)
    return float(jnp.sum(q * k))
  assert dot(7, 3) == pytest.approx(dot(104, 100), rel=1e-4)


@pytest.mark.parametrize('overrides', [dict(tie_embeddings=True), dict(qkv_bias=True),
                                       dict(qk_norm=True), dict(remat=True),
                                       dict(dtype='bfloat16')])
def test_variants_run_and_learnable(overrides):
  cfg = dataclasses.replace(CFG, **overrides)
  m = model_lib.Decoder(cfg, rngs=nnx.Rngs(1))
  batch = layout.build_batch([Example([1, 2], [[3], [4, 5]])], layout='prefix_shared',
                             seq_len=8)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  def loss(m):
    return -logprobs.model_logprobs(m, batch)[0].sum()
  value, grads = nnx.value_and_grad(loss)(m)
  assert np.isfinite(float(value))
  norms = jax.tree.leaves(jax.tree.map(lambda g: float(jnp.abs(g).max()), grads))
  assert all(np.isfinite(norms)) and max(norms) > 0


def test_bad_model_config_is_a_clear_error():
  with pytest.raises(ValueError, match='unknown model config keys'):
    model_lib.ModelConfig.from_dict({'hidden': 3})
  with pytest.raises(ValueError, match='not a multiple'):
    model_lib.ModelConfig(num_heads=3, num_kv_heads=2)
