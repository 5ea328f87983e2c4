import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from prefix_dpo import layout, masks


def brute_force(segment_ids, branch_ids):
  seq = len(segment_ids)
  out = np.zeros((seq, seq), bool)
  for q, k in itertools.product(range(seq), repeat=2):
    out[q, k] = (segment_ids[q] > 0 and segment_ids[q] == segment_ids[k] and k <= q
                 and branch_ids[k] in (0, branch_ids[q]))
  return out


def test_rule_on_a_prefix_shared_row():
  # [p p | c c | r] + padding
  seg = np.array([[1, 1, 1, 1, 1, 0]])
  br = np.array([[0, 0, 1, 1, 2, 0]])
  m = masks.dense_mask(seg, br)[0].astype(int)
  np.testing.assert_array_equal(m, [
      [1, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0],
      [1, 1, 1, 0, 0, 0],
      [1, 1, 1, 1, 0, 0],
      [1, 1, 0, 0, 1, 0],  # rejected sees the prompt and itself, not chosen
      [0, 0, 0, 0, 0, 0],  # padding sees nothing
  ])


@pytest.mark.parametrize('seed', range(5))
def test_dense_mask_equals_brute_force_numpy_and_jax(seed):
  rng = np.random.default_rng(seed)
  seg = np.sort(rng.integers(0, 4, size=(2, 17)), axis=-1)
  br = rng.integers(0, 4, size=(2, 17))
  for row in range(2):
    expected = brute_force(seg[row], br[row])
    np.testing.assert_array_equal(masks.dense_mask(seg, br)[row], expected)
    np.testing.assert_array_equal(
        np.asarray(masks.dense_mask(jnp.asarray(seg), jnp.asarray(br)))[row], expected)


def test_layout_rows_hide_other_responses_and_examples():
  examples = [layout.Example([1, 2, 3], [[4], [5, 6], [7]]), layout.Example([8], [[9], [10]])]
  batch = layout.build_batch(examples, layout='prefix_shared', seq_len=16)
  mask = masks.dense_mask(batch['segment_ids'], batch['branch_ids'])[0]
  seg, br = batch['segment_ids'][0], batch['branch_ids'][0]
  for q, k in itertools.product(range(16), repeat=2):
    if mask[q, k]:
      assert seg[q] == seg[k] > 0 and k <= q and br[k] in (0, br[q])
