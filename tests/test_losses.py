import math

import jax.numpy as jnp
import numpy as np
import pytest

from prefix_dpo import losses


def log_sigmoid(x):
  return -math.log1p(math.exp(-x))


@pytest.mark.parametrize('label_smoothing', [0.0, 0.2])
def test_sigmoid_dpo_matches_the_formula_by_hand(label_smoothing):
  # policy chosen/rejected -10, -14; reference -11, -12; beta 0.5.
  # h = (-10 + 11) - (-14 + 12) = 3; logits = 1.5.
  policy = jnp.array([[-10.0, -14.0]])
  reference = jnp.array([[-11.0, -12.0]])
  loss, m = losses.dpo_sigmoid(policy, reference, jnp.ones((1, 2), bool), beta=0.5,
                               label_smoothing=label_smoothing)
  expected = -(1 - label_smoothing) * log_sigmoid(1.5) - label_smoothing * log_sigmoid(-1.5)
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  assert float(m['rewards/chosen']) == pytest.approx(0.5)
  assert float(m['rewards/rejected']) == pytest.approx(-1.0)
  assert float(m['rewards/margins']) == pytest.approx(1.5)
  assert float(m['rewards/accuracies']) == 1.0
  assert float(m['logps/chosen']) == -10.0 and float(m['logps/rejected']) == -14.0


def test_known_value_at_zero_margin_is_log2():
  loss, _ = losses.dpo_sigmoid(jnp.zeros((3, 2)), jnp.zeros((3, 2)), jnp.ones((3, 2), bool))
  assert float(loss) == pytest.approx(math.log(2), rel=1e-6)


def test_masked_examples_and_responses_do_not_count():
  policy = jnp.array([[-1.0, -3.0, -2.0], [50.0, -50.0, 0.0]])
  mask = jnp.array([[True, True, True], [False, False, False]])
  loss, m = losses.dpo_sigmoid(policy, jnp.zeros_like(policy), mask, beta=1.0)
  # Pairs (0,1): h = 2 and (0,2): h = 1; the second example is padding.
  expected = -(log_sigmoid(2.0) + log_sigmoid(1.0)) / 2
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  assert float(m['rewards/margins']) == pytest.approx(1.5)
  np.testing.assert_allclose(float(m['logps/rejected']), -2.5)
