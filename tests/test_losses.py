"""Each loss against numbers worked out by hand from its paper's formula.

The expected values are written in as literals, with the arithmetic in the
comments; they were not produced by prefix_dpo.losses.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefix_dpo import losses


def log_sigmoid(x):
  return -math.log1p(math.exp(-x))


def config(type_, **overrides):
  cfg = losses.default_loss_config()
  cfg.type = type_
  cfg.update(overrides)
  return cfg


def run(type_, policy, reference=None, counts=None, mask=None, scores=None, **hparams):
  shape = np.shape(policy if policy is not None else scores)
  return losses.compute_loss(
      config(type_, **hparams),
      policy_logps=None if policy is None else jnp.asarray(policy, jnp.float32),
      reference_logps=None if reference is None else jnp.asarray(reference, jnp.float32),
      counts=jnp.asarray(counts if counts is not None else np.ones(shape), jnp.int32),
      response_mask=jnp.asarray(mask if mask is not None else np.ones(shape), bool),
      scores=None if scores is None else jnp.asarray(scores, jnp.float32))


# One pair used throughout: policy chosen/rejected -10, -14 (2 and 4 tokens),
# reference -11, -12. Log-ratios +1 and -2, so h = 3.
POLICY, REFERENCE, COUNTS = [[-10.0, -14.0]], [[-11.0, -12.0]], [[2, 4]]


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


@pytest.mark.parametrize('label_smoothing, expected', [
    (0.0, 0.2014132779827524),   # log(1 + e^-1.5)
    (0.2, 0.5014132779827525),   # 0.8 log(1 + e^-1.5) + 0.2 log(1 + e^1.5)
])
def test_sigmoid_and_cdpo_by_hand(label_smoothing, expected):
  loss, m = run('sigmoid', POLICY, REFERENCE, COUNTS, beta=0.5,
                label_smoothing=label_smoothing)
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  assert float(m['rewards/chosen']) == pytest.approx(0.5)    # 0.5 * (-10 + 11)
  assert float(m['rewards/rejected']) == pytest.approx(-1.0)  # 0.5 * (-14 + 12)


def test_sigmoid_gradient_by_hand():
  # d/d log pi(y_w) of -log sigma(beta h) = -beta sigma(-beta h) = -0.5 / (1 + e^1.5).
  grad = jax.grad(lambda p: run('sigmoid', p, REFERENCE, COUNTS, beta=0.5)[0])(
      jnp.asarray(POLICY))
  np.testing.assert_allclose(np.asarray(grad), [[-0.09121276190317817, 0.09121276190317817]],
                             rtol=1e-6)


@pytest.mark.parametrize('label_smoothing, expected', [
    (0.0, 0.2014132779827524),    # = DPO
    # (0.8 log(1 + e^-1.5) - 0.2 log(1 + e^1.5)) / (1 - 0.4)
    #   = (0.8 * 0.2014133 - 0.2 * 1.7014133) / 0.6
    (0.2, -0.2985867220172477),
])
def test_robust_by_hand(label_smoothing, expected):
  loss, m = run('robust', POLICY, REFERENCE, COUNTS, beta=0.5, label_smoothing=label_smoothing)
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  assert float(m['rewards/margins']) == pytest.approx(1.5)


def test_robust_rejects_a_flip_rate_of_one_half():
  with pytest.raises(ValueError, match='label_smoothing'):
    run('robust', POLICY, REFERENCE, COUNTS, label_smoothing=0.5)


def test_ipo_by_hand_with_length_normalised_log_ratios():
  # Per token: policy -10/2 = -5, -14/4 = -3.5; reference -5.5, -3.
  # h = (-5 + 5.5) - (-3.5 + 3) = 1; tau = beta = 0.25, target 1 / (2 tau) = 2.
  # loss = (1 - 2)^2 = 1.
  loss, m = run('ipo', POLICY, REFERENCE, COUNTS, beta=0.25)
  assert float(loss) == pytest.approx(1.0, rel=1e-6)
  assert float(m['rewards/chosen']) == pytest.approx(0.125)    # 0.25 * 0.5
  assert float(m['rewards/rejected']) == pytest.approx(-0.125)  # 0.25 * -0.5
  assert float(m['logps/chosen']) == pytest.approx(-5.0)
  assert float(m['logps/rejected']) == pytest.approx(-3.5)


def test_ipo_is_zero_at_the_target_margin():
  # beta 0.5: target 1 = h.
  loss, _ = run('ipo', POLICY, REFERENCE, COUNTS, beta=0.5)
  assert float(loss) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize('beta, expected', [
    (0.25, 0.25),  # max(0, 1 - 0.25 * 3)
    (0.5, 0.0),    # max(0, 1 - 1.5)
    (0.1, 0.7),    # max(0, 1 - 0.3)
])
def test_hinge_by_hand(beta, expected):
  loss, _ = run('hinge', POLICY, REFERENCE, COUNTS, beta=beta)
  assert float(loss) == pytest.approx(expected, abs=1e-6)


def test_rpo_by_hand():
  # DPO log(1 + e^-1.5) = 0.2014133 plus alpha 0.5 * NLL per token 10 / 2 = 5.
  loss, m = run('rpo', POLICY, REFERENCE, COUNTS, beta=0.5, rpo_alpha=0.5)
  assert float(loss) == pytest.approx(2.7014132779827524, rel=1e-6)
  assert float(m['nll_loss']) == pytest.approx(5.0)
  assert float(m['rewards/margins']) == pytest.approx(1.5)


# Reference-free: policy -2 (4 tokens) and -6 (3 tokens): -0.5 and -2 per token.
FREE_POLICY, FREE_COUNTS = [[-2.0, -6.0]], [[4, 3]]


def test_simpo_by_hand():
  # beta 2, gamma 1: 2 * -0.5 - 2 * -2 - 1 = 2; loss = log(1 + e^-2).
  loss, m = run('simpo', FREE_POLICY, None, FREE_COUNTS, beta=2.0, simpo_gamma=1.0)
  assert float(loss) == pytest.approx(0.1269280110429725, rel=1e-6)
  assert float(m['rewards/chosen']) == pytest.approx(-1.0)
  assert float(m['rewards/rejected']) == pytest.approx(-4.0)
  assert float(m['rewards/accuracies']) == 1.0
  assert float(m['logps/chosen']) == pytest.approx(-0.5)


def test_simpo_ignores_any_reference():
  cfg = config('simpo')
  args = dict(policy_logps=jnp.asarray(FREE_POLICY), counts=jnp.asarray(FREE_COUNTS),
              response_mask=jnp.ones((1, 2), bool))
  a, _ = losses.compute_loss(cfg, reference_logps=None, **args)
  b, _ = losses.compute_loss(cfg, reference_logps=jnp.array([[5.0, -9.0]]), **args)
  assert float(a) == float(b)


def test_orpo_by_hand():
  # log odds(a) = a - log(1 - e^a):
  #   a = -0.5: -0.5 - log(0.3934693) = 0.4327521;  a = -2: -2 - log(0.8646647) = -1.8545865
  # ratio 2.2873387; log sigma(ratio) = -0.0967059; NLL = 0.5.
  # loss = 0.5 + 0.1 * 0.0967059.
  loss, m = run('orpo', FREE_POLICY, None, FREE_COUNTS, orpo_lambda=0.1)
  assert float(loss) == pytest.approx(0.50967058636494, rel=1e-6)
  assert float(m['nll_loss']) == pytest.approx(0.5)
  assert float(m['log_odds_chosen']) == pytest.approx(2.2873386716983295, rel=1e-5)
  assert float(m['log_odds_ratio']) == pytest.approx(-0.09670586364939958, rel=1e-5)
  assert float(m['rewards/chosen']) == pytest.approx(-0.05)  # lambda * -0.5
  assert float(m['rewards/accuracies']) == 1.0


def test_orpo_is_finite_for_a_certain_response():
  # Probability 1 (log-prob 0): odds are infinite; the loss must stay finite.
  loss, grad = jax.value_and_grad(lambda p: run('orpo', p, None, [[3, 3]])[0])(
      jnp.array([[0.0, -1.0]]))
  assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))


def test_plackett_luce_by_hand():
  # beta 1, rewards r = policy - reference = [2, 0, 1], ranked best first:
  # -log(e^2 / (e^2 + e^0 + e^1)) - log(e^0 / (e^0 + e^1))
  #   = log(11.107338) - 2 + log(3.718282) = 0.4076058 + 1.3132617
  loss, m = run('plackett_luce', [[-8.0, -10.0, -9.0]], [[-10.0, -10.0, -10.0]],
                [[3, 3, 3]], beta=1.0)
  assert float(loss) == pytest.approx(1.720867651962603, rel=1e-6)
  assert float(m['rewards/accuracies']) == 1.0  # best vs each: 2 > 0, 2 > 1


def test_plackett_luce_with_two_responses_is_dpo():
  pl, _ = run('plackett_luce', POLICY, REFERENCE, COUNTS, beta=0.5)
  assert float(pl) == pytest.approx(0.2014132779827524, rel=1e-6)


def test_plackett_luce_masks_missing_responses():
  # Example 2 has only 2 real responses: its term is the DPO term log(1 + e^-2).
  # Mean over examples of 1.7208677 (as above) and 0.1269280.
  policy = [[-8.0, -10.0, -9.0], [-8.0, -10.0, 100.0]]
  reference = [[-10.0, -10.0, -10.0]] * 2
  mask = [[True, True, True], [True, True, False]]
  loss, _ = run('plackett_luce', policy, reference, [[3, 3, 3]] * 2, mask, beta=1.0)
  assert float(loss) == pytest.approx((1.720867651962603 + 0.1269280110429725) / 2,
                                      rel=1e-6)


def test_reward_model_bradley_terry_over_all_pairs_by_hand():
  # Scores [1, 3, 0], response 0 ranked best, then 1, then 2. Pairs (i < j):
  # (0,1): log(1 + e^2) = 2.1269280, (0,2): log(1 + e^-1) = 0.3132617,
  # (1,2): log(1 + e^-3) = 0.0485874; mean 0.8295924.
  loss, m = run('reward_model', None, scores=[[1.0, 3.0, 0.0]])
  assert float(loss) == pytest.approx(0.8295923500449792, rel=1e-6)
  assert float(m['rewards/accuracies']) == pytest.approx(2 / 3)   # (0,2), (1,2)
  assert float(m['accuracy']) == pytest.approx(2 / 3)
  assert float(m['rewards/margins']) == pytest.approx(2 / 3)      # (-2 + 1 + 3) / 3
  assert float(m['margin']) == pytest.approx(2 / 3)
  assert float(m['rewards/chosen']) == pytest.approx(5 / 3)       # (1 + 1 + 3) / 3
  assert float(m['rewards/rejected']) == pytest.approx(1.0)       # (3 + 0 + 0) / 3


def test_reward_model_centering_by_hand():
  # + 0.01 * mean((1 + 3)^2, (1 + 0)^2, (3 + 0)^2) = 0.01 * 26 / 3.
  loss, _ = run('reward_model', None, scores=[[1.0, 3.0, 0.0]],
                center_rewards_coefficient=0.01)
  assert float(loss) == pytest.approx(0.9162590167116459, rel=1e-6)


def test_reward_model_two_responses_is_trl_reward_loss():
  loss, m = run('reward_model', None, scores=[[0.5, -1.0], [2.0, 3.0]])
  # mean(log(1 + e^-1.5), log(1 + e^1)) = (0.2014133 + 1.3132617) / 2
  assert float(loss) == pytest.approx((0.2014132779827524 + 1.3132616875182228) / 2,
                                      rel=1e-6)
  assert float(m['accuracy']) == 0.5


# -- properties shared by every loss -----------------------------------------

def _grid_inputs(type_):
  rng = np.random.default_rng(0)
  policy = rng.normal(-20, 3, (3, 4)).astype(np.float32)
  reference = rng.normal(-20, 3, (3, 4)).astype(np.float32)
  counts = rng.integers(1, 12, (3, 4)).astype(np.int32)
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
  cfg = config(type_)
  return cfg, policy, reference, counts, mask


@pytest.mark.parametrize('type_', losses.LOSSES)
def test_padding_slots_never_leak_into_values_or_gradients(type_):
  cfg, policy, reference, counts, mask = _grid_inputs(type_)
  counts[~mask] = 0

  def loss_of(policy, reference, scores):
    return losses.compute_loss(cfg, policy_logps=policy, reference_logps=reference,
                               counts=jnp.asarray(counts), response_mask=jnp.asarray(mask),
                               scores=scores)

  clean = loss_of(jnp.asarray(policy), jnp.asarray(reference), jnp.asarray(policy) / 10)
  garbage = np.where(mask, policy, np.float32(np.nan))
  junk_ref = np.where(mask, reference, np.float32(np.inf))
  fn = lambda p, s: loss_of(p, jnp.asarray(junk_ref), s)
  (loss, metrics), grads = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(
      jnp.asarray(garbage), jnp.asarray(garbage) / 10)
  assert float(loss) == pytest.approx(float(clean[0]), rel=1e-6)
  for key, value in metrics.items():
    assert float(value) == pytest.approx(float(clean[1][key]), rel=1e-6), key
  for grad in grads:
    assert np.all(np.isfinite(np.asarray(grad)))
    assert np.all(np.asarray(grad)[~mask] == 0)


@pytest.mark.parametrize('type_', losses.LOSSES)
def test_every_loss_reports_trl_metrics(type_):
  cfg, policy, reference, counts, mask = _grid_inputs(type_)
  _, metrics = losses.compute_loss(
      cfg, policy_logps=jnp.asarray(policy),
      reference_logps=jnp.asarray(reference) if losses.uses_reference(cfg) else None,
      counts=jnp.asarray(counts), response_mask=jnp.asarray(mask),
      scores=jnp.asarray(policy) / 10 if losses.is_reward_model(cfg) else None)
  expected = {'loss', 'rewards/chosen', 'rewards/rejected', 'rewards/accuracies',
              'rewards/margins'}
  if not losses.is_reward_model(cfg):
    expected |= {'logps/chosen', 'logps/rejected'}
  assert expected <= set(metrics)
  assert all(np.shape(v) == () and np.isfinite(float(v)) for v in metrics.values())
  assert 0.0 <= float(metrics['rewards/accuracies']) <= 1.0


@pytest.mark.parametrize('type_', ['sigmoid', 'robust', 'ipo', 'hinge', 'rpo', 'simpo',
                                   'orpo'])
def test_pairwise_losses_average_best_versus_each_rejected(type_):
  # Loss of [best, a, b] = mean of the losses of [best, a] and [best, b]
  # (per-example NLL terms count once, so compare the pair terms only).
  cfg, policy, reference, counts, _ = _grid_inputs(type_)
  p, r, c = policy[1:2, :3], reference[1:2, :3], counts[1:2, :3]

  def loss(cols):
    value, metrics = losses.compute_loss(
        cfg, policy_logps=jnp.asarray(p[:, cols]), reference_logps=jnp.asarray(r[:, cols]),
        counts=jnp.asarray(c[:, cols]), response_mask=jnp.ones((1, len(cols)), bool))
    nll_weight = cfg.rpo_alpha if type_ == 'rpo' else 1.0
    return float(value) - nll_weight * float(metrics.get('nll_loss', 0.0))

  assert loss([0, 1, 2]) == pytest.approx((loss([0, 1]) + loss([0, 2])) / 2, rel=1e-5)


# -- the config API ------------------------------------------------------------

def test_default_config_and_reference_use():
  cfg = losses.default_loss_config()
  assert cfg.type == 'sigmoid' and cfg.beta == 0.1 and cfg.label_smoothing == 0.0
  reference_free = {t for t in losses.LOSSES if not losses.uses_reference(config(t))}
  assert reference_free == {'simpo', 'orpo', 'reward_model'}
  assert [t for t in losses.LOSSES if losses.is_reward_model(config(t))] == ['reward_model']


def test_unknown_loss_type_lists_the_known_names():
  with pytest.raises(ValueError, match='known: sigmoid, robust, ipo'):
    run('dpo_v2', POLICY, REFERENCE, COUNTS)
  with pytest.raises(ValueError, match='plackett_luce'):
    losses.uses_reference(config('nope'))


def test_misconfigurations_are_errors():
  with pytest.raises(ValueError, match='label_smoothing'):
    run('ipo', POLICY, REFERENCE, COUNTS, label_smoothing=0.1)
  with pytest.raises(ValueError, match='reference_logps'):
    run('sigmoid', POLICY, None, COUNTS)
  with pytest.raises(ValueError, match='scores'):
    run('reward_model', POLICY)
  with pytest.raises(ValueError, match='beta'):
    run('sigmoid', POLICY, REFERENCE, COUNTS, beta=0.0)
