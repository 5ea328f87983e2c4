"""Preference losses over per-response log-probs, selectable by name.

Inputs are ``[examples, responses]`` grids (``[E, N]``). Responses are ranked
best first: response 0 is the chosen (best) response, responses 1.. are
rejected. ``response_mask`` marks real responses (batches padded to a static
grid have empty slots and empty examples). Because every loss sees only these
grids, the same numbers come out of the ``paired`` and ``prefix_shared``
layouts.

With N > 2 responses the pairwise losses average over the pairs (0, k) -- best
versus each rejected, every pair sharing one prompt computation -- which is
the standard loss for N = 2. ``plackett_luce`` uses the whole ranking and
``reward_model`` every ordered pair (i, j), i < j.

Losses are averaged over the valid pairs (or examples, for per-example terms)
of the batch. Metrics use TRL's names; ``rewards/*`` are each loss's implicit
rewards, averaged over the same pairs as the loss.

``compute_loss(cfg, ...)`` is the entry point; ``cfg`` is a
:func:`default_loss_config` with ``cfg.type`` one of :data:`LOSSES`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

Metrics = dict[str, jax.Array]


def default_loss_config() -> ml_collections.ConfigDict:
  """``loss`` config: the loss type and every loss's hyper-parameters.

  Defaults follow TRL (``DPOConfig``, ``CPOConfig``, ``ORPOConfig``,
  ``RewardConfig``) except where noted.
  """
  cfg = ml_collections.ConfigDict()
  cfg.type = 'sigmoid'
  # Inverse temperature of the implicit reward (DPO beta; IPO tau; SLiC 1 / delta;
  # SimPO beta -- the SimPO paper uses 2.0 to 2.5, TRL defaults to 0.1).
  cfg.beta = 0.1
  # Flip probability for conservative (sigmoid, rpo, simpo) and robust DPO.
  cfg.label_smoothing = 0.0
  # rpo: weight of the chosen response's NLL (TRL rpo_alpha; paper: 1.0).
  cfg.rpo_alpha = 1.0
  # simpo: target reward margin gamma (TRL simpo_gamma).
  cfg.simpo_gamma = 0.5
  # orpo: weight lambda of the odds-ratio term (TRL's ORPOConfig calls it beta).
  cfg.orpo_lambda = 0.1
  # reward_model: weight of the mean squared pair score sum (0 = off; TRL's
  # center_rewards_coefficient, paper value 0.01).
  cfg.center_rewards_coefficient = 0.0
  return cfg


# --------------------------------------------------------------------------
# Helpers.


def _mean(values: jax.Array, weight: jax.Array) -> jax.Array:
  """Weighted mean; 0 when the weights are all 0 (an all-padding batch)."""
  return jnp.sum(values * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def _pair_weight(response_mask: jax.Array) -> jax.Array:
  """``[E, N-1]`` float32: 1 where (best, k) is a real pair."""
  return (response_mask[:, :1] & response_mask[:, 1:]).astype(jnp.float32)


def _example_weight(response_mask: jax.Array) -> jax.Array:
  """``[E]`` float32: 1 for examples with at least one pair."""
  return jnp.any(_pair_weight(response_mask) > 0, axis=1).astype(jnp.float32)


def _per_token(logps: jax.Array, counts: jax.Array) -> jax.Array:
  """Length-normalised log-probs ``logps / counts`` (empty slots divide by 1)."""
  return logps / jnp.maximum(counts, 1).astype(logps.dtype)


def _masked(values: jax.Array, response_mask: jax.Array) -> jax.Array:
  # Padded slots may hold anything (e.g. a score read at row index 0); zero them
  # so that neither values nor gradients pick up NaN or inf from them.
  return jnp.where(response_mask, values, 0.0)


def _masked_all(response_mask: jax.Array, *grids: jax.Array) -> tuple[jax.Array, ...]:
  return tuple(_masked(grid, response_mask) for grid in grids)


def _conservative_sigmoid(logits: jax.Array, label_smoothing: float) -> jax.Array:
  """``-(1 - eps) log sigma(z) - eps log sigma(-z)`` elementwise."""
  return (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits)
          - label_smoothing * jax.nn.log_sigmoid(-logits))


def _pair_metrics(loss: jax.Array, rewards: jax.Array, logps: jax.Array,
                  response_mask: jax.Array) -> Metrics:
  """TRL's metrics over best-vs-each pairs.

  Args:
    loss: the scalar loss.
    rewards: ``[E, N]`` implicit rewards of each response.
    logps: ``[E, N]`` log-probs as the loss uses them (summed or per token).
    response_mask: ``[E, N]`` bool.
  """
  weight = _pair_weight(response_mask)
  rewards = jax.lax.stop_gradient(rewards)
  logps = jax.lax.stop_gradient(logps)
  shape = weight.shape
  chosen, rejected = jnp.broadcast_to(rewards[:, :1], shape), rewards[:, 1:]
  return {
      'loss': loss,
      'rewards/chosen': _mean(chosen, weight),
      'rewards/rejected': _mean(rejected, weight),
      'rewards/accuracies': _mean((chosen > rejected).astype(jnp.float32), weight),
      'rewards/margins': _mean(chosen - rejected, weight),
      'logps/chosen': _mean(jnp.broadcast_to(logps[:, :1], shape), weight),
      'logps/rejected': _mean(logps[:, 1:], weight),
  }


def _log1mexp(x: jax.Array) -> jax.Array:
  """``log(1 - exp(x))`` for ``x < 0``, accurate on both sides of ``-log 2``.

  (Maechler 2012.) ``x`` is clamped below 0 so that a response with
  probability ~1 gives a large finite value rather than ``-inf``.
  """
  x = jnp.minimum(x, -1e-6)
  near_zero = x > -jnp.log(2.0)
  # Each branch gets a safe input so the unused one has finite gradients.
  a = jnp.log(-jnp.expm1(jnp.where(near_zero, x, -1.0)))
  b = jnp.log1p(-jnp.exp(jnp.where(near_zero, -1.0, x)))
  return jnp.where(near_zero, a, b)


# --------------------------------------------------------------------------
# Losses with a reference model.


def sigmoid(policy_logps: jax.Array, reference_logps: jax.Array, counts: jax.Array,
            response_mask: jax.Array, *, beta: float = 0.1,
            label_smoothing: float = 0.0) -> tuple[jax.Array, Metrics]:
  """DPO (Rafailov et al. 2023, eq. 7); conservative DPO with label smoothing.

  ``loss = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)`` with
  ``h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))``
  (cDPO: Mitchell 2023, "A note on DPO with noisy preferences", eq. 3).
  Rewards ``beta (log pi(y) - log ref(y))``.

  Args:
    policy_logps, reference_logps: ``[E, N]`` float32 summed response log-probs.
    counts: ``[E, N]`` tokens per response (unused).
    response_mask: ``[E, N]`` bool.
  Returns:
    ``(loss, metrics)``.
  """
  del counts
  policy_logps, reference_logps = _masked_all(response_mask, policy_logps, reference_logps)
  rewards = beta * (policy_logps - reference_logps)
  logits = rewards[:, :1] - rewards[:, 1:]
  loss = _mean(_conservative_sigmoid(logits, label_smoothing), _pair_weight(response_mask))
  return loss, _pair_metrics(loss, rewards, policy_logps, response_mask)


def robust(policy_logps: jax.Array, reference_logps: jax.Array, counts: jax.Array,
           response_mask: jax.Array, *, beta: float = 0.1,
           label_smoothing: float = 0.0) -> tuple[jax.Array, Metrics]:
  """Robust DPO (Chowdhury et al. 2024, "Provably robust DPO").

  ``loss = ((1 - eps) (-log sigma(beta h)) - eps (-log sigma(-beta h))) / (1 - 2 eps)``
  with ``h`` as in :func:`sigmoid` and ``eps = label_smoothing < 1/2`` the
  preference flip rate: an unbiased estimate of the clean-label DPO loss.
  """
  del counts
  if not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f'robust: label_smoothing={label_smoothing} must be in [0, 0.5)')
  policy_logps, reference_logps = _masked_all(response_mask, policy_logps, reference_logps)
  rewards = beta * (policy_logps - reference_logps)
  logits = rewards[:, :1] - rewards[:, 1:]
  per_pair = ((-(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits)
               + label_smoothing * jax.nn.log_sigmoid(-logits))
              / (1.0 - 2.0 * label_smoothing))
  loss = _mean(per_pair, _pair_weight(response_mask))
  return loss, _pair_metrics(loss, rewards, policy_logps, response_mask)


def ipo(policy_logps: jax.Array, reference_logps: jax.Array, counts: jax.Array,
        response_mask: jax.Array, *, beta: float = 0.1) -> tuple[jax.Array, Metrics]:
  """IPO (Azar et al. 2023, "A general theoretical paradigm...", eq. 17).

  ``loss = (h - 1 / (2 beta))^2`` with ``beta`` the paper's tau. As TRL does
  (and unlike the paper), ``h`` uses length-normalised log-probs
  ``log pi(y) / |y|``, so the target margin does not depend on length; the
  rewards and ``logps/*`` metrics are length-normalised too.
  """
  policy_logps, reference_logps = _masked_all(response_mask, policy_logps, reference_logps)
  policy = _per_token(policy_logps, counts)
  reference = _per_token(reference_logps, counts)
  h = (policy[:, :1] - reference[:, :1]) - (policy[:, 1:] - reference[:, 1:])
  loss = _mean((h - 1.0 / (2.0 * beta)) ** 2, _pair_weight(response_mask))
  return loss, _pair_metrics(loss, beta * (policy - reference), policy, response_mask)


def hinge(policy_logps: jax.Array, reference_logps: jax.Array, counts: jax.Array,
          response_mask: jax.Array, *, beta: float = 0.1) -> tuple[jax.Array, Metrics]:
  """SLiC hinge loss (Zhao et al. 2023, "SLiC-HF") on normalised likelihoods.

  ``loss = max(0, 1 - beta h) = beta max(0, delta - h)``, ``delta = 1 / beta``,
  with ``h`` as in :func:`sigmoid`: TRL's form, the reference-normalised
  likelihood of RSO (Liu et al. 2024) rather than SLiC's raw log-probs.
  """
  del counts
  policy_logps, reference_logps = _masked_all(response_mask, policy_logps, reference_logps)
  rewards = beta * (policy_logps - reference_logps)
  logits = rewards[:, :1] - rewards[:, 1:]
  loss = _mean(jax.nn.relu(1.0 - logits), _pair_weight(response_mask))
  return loss, _pair_metrics(loss, rewards, policy_logps, response_mask)


def _chosen_nll(policy_logps: jax.Array, counts: jax.Array,
                response_mask: jax.Array) -> jax.Array:
  """``mean_examples -log pi(y_w) / |y_w|`` over examples with a pair."""
  nll = -_per_token(_masked(policy_logps, response_mask)[:, 0], counts[:, 0])
  return _mean(nll, _example_weight(response_mask))


def rpo(policy_logps: jax.Array, reference_logps: jax.Array, counts: jax.Array,
        response_mask: jax.Array, *, beta: float = 0.1, label_smoothing: float = 0.0,
        rpo_alpha: float = 1.0) -> tuple[jax.Array, Metrics]:
  """RPO (Pang et al. 2024, "Iterative reasoning preference optimization").

  ``loss = DPO + alpha * (-log pi(y_w) / |y_w|)``: :func:`sigmoid` plus the
  chosen response's length-normalised NLL, averaged over examples (TRL
  averages the NLL over all chosen tokens of the batch instead).
  """
  dpo_loss, metrics = sigmoid(policy_logps, reference_logps, counts, response_mask,
                              beta=beta, label_smoothing=label_smoothing)
  nll = _chosen_nll(policy_logps, counts, response_mask)
  loss = dpo_loss + rpo_alpha * nll
  return loss, {**metrics, 'loss': loss, 'nll_loss': jax.lax.stop_gradient(nll)}


def plackett_luce(policy_logps: jax.Array, reference_logps: jax.Array, counts: jax.Array,
                  response_mask: jax.Array, *, beta: float = 0.1
                  ) -> tuple[jax.Array, Metrics]:
  """Listwise DPO over a full ranking (Rafailov et al. 2023, appendix A.3).

  ``loss = -sum_k log( exp(r_k) / sum_{j >= k} exp(r_j) )`` over the valid
  responses ``k`` in rank order (best first), ``r = beta (log pi - log ref)``;
  averaged over examples. N = 2 is :func:`sigmoid` DPO.
  """
  del counts
  policy_logps, reference_logps = _masked_all(response_mask, policy_logps, reference_logps)
  rewards = beta * (policy_logps - reference_logps)
  r = _masked(rewards, response_mask)
  n = r.shape[1]
  later = jnp.arange(n)[None, :] >= jnp.arange(n)[:, None]  # [k, j]: j >= k
  allowed = later[None] & response_mask[:, None, :]          # [E, k, j]
  # Finite fill, not -inf: fully masked rows then give finite (unused) terms.
  denominator = jax.nn.logsumexp(jnp.where(allowed, r[:, None, :], -1e9), axis=-1)
  # Term k counts if response k is real and a real response ranks below it
  # (the last term is log 1 = 0).
  has_later = jnp.sum(allowed, axis=-1) > 1
  term = jnp.where(response_mask & has_later, denominator - r, 0.0)
  example_weight = (jnp.sum(response_mask, axis=1) >= 2).astype(jnp.float32)
  loss = _mean(jnp.sum(term, axis=1), example_weight)
  return loss, _pair_metrics(loss, rewards, policy_logps, response_mask)


# --------------------------------------------------------------------------
# Reference-free losses.


def simpo(policy_logps: jax.Array, reference_logps: jax.Array | None, counts: jax.Array,
          response_mask: jax.Array, *, beta: float = 0.1, simpo_gamma: float = 0.5,
          label_smoothing: float = 0.0) -> tuple[jax.Array, Metrics]:
  """SimPO (Meng et al. 2024, "SimPO: simple preference optimization...").

  ``loss = -log sigma(beta log pi(y_w) / |y_w| - beta log pi(y_l) / |y_l| - gamma)``,
  no reference model; with label smoothing as in :func:`sigmoid` (as TRL's
  CPOTrainer). Rewards ``beta log pi(y) / |y|``. Unlike TRL's CPOTrainer
  (``cpo_alpha=1`` by default) no NLL term is added: this is the paper's loss.
  """
  del reference_logps
  policy_logps = _masked(policy_logps, response_mask)
  policy = _per_token(policy_logps, counts)
  rewards = beta * policy
  logits = rewards[:, :1] - rewards[:, 1:] - simpo_gamma
  loss = _mean(_conservative_sigmoid(logits, label_smoothing), _pair_weight(response_mask))
  return loss, _pair_metrics(loss, rewards, policy, response_mask)


def orpo(policy_logps: jax.Array, reference_logps: jax.Array | None, counts: jax.Array,
         response_mask: jax.Array, *, orpo_lambda: float = 0.1
         ) -> tuple[jax.Array, Metrics]:
  """ORPO (Hong et al. 2024, "ORPO: monolithic preference optimization...").

  ``loss = -log P(y_w) + lambda * (-log sigma(log odds(y_w) - log odds(y_l)))``
  with ``log P(y) = log pi(y) / |y|`` (length-normalised) and
  ``odds(y) = P(y) / (1 - P(y))``; no reference model. The NLL is averaged
  over examples (TRL: over all chosen tokens). Rewards ``lambda log P(y)``
  as in TRL; extra metrics ``nll_loss``, ``log_odds_ratio`` (mean
  ``log sigma(.)``) and ``log_odds_chosen`` (mean log-odds ratio).
  """
  del reference_logps
  policy_logps = _masked(policy_logps, response_mask)
  policy = _per_token(policy_logps, counts)
  log_odds = policy - _log1mexp(policy)
  ratio = log_odds[:, :1] - log_odds[:, 1:]
  weight = _pair_weight(response_mask)
  log_sigmoid_ratio = jax.nn.log_sigmoid(ratio)
  odds_loss = -_mean(log_sigmoid_ratio, weight)
  nll = _chosen_nll(policy_logps, counts, response_mask)
  loss = nll + orpo_lambda * odds_loss
  metrics = _pair_metrics(loss, orpo_lambda * policy, policy, response_mask)
  metrics.update({
      'nll_loss': jax.lax.stop_gradient(nll),
      'log_odds_ratio': jax.lax.stop_gradient(_mean(log_sigmoid_ratio, weight)),
      'log_odds_chosen': jax.lax.stop_gradient(_mean(ratio, weight)),
  })
  return loss, metrics


def reward_model(scores: jax.Array, response_mask: jax.Array, *,
                 center_rewards_coefficient: float = 0.0) -> tuple[jax.Array, Metrics]:
  """Bradley-Terry reward modelling over all ordered pairs (Ouyang et al. 2022, eq. 1).

  ``loss = mean_{i < j} -log sigma(s_i - s_j)`` over every pair of real
  responses (response i ranked above j), ``s`` the scalar scores; plus
  ``c * mean_{i < j} (s_i + s_j)^2`` (Eisenstein et al. 2023, TRL's
  ``center_rewards_coefficient``). N = 2 is TRL's RewardTrainer loss.
  ``rewards/*`` and TRL RewardTrainer's ``accuracy`` / ``margin`` are over
  the same pairs.
  """
  s = _masked(scores, response_mask)
  n = s.shape[1]
  above = jnp.arange(n)[:, None] < jnp.arange(n)[None, :]  # [i, j]: i < j
  weight = (above[None] & response_mask[:, :, None] & response_mask[:, None, :]
            ).astype(jnp.float32)
  margin = s[:, :, None] - s[:, None, :]
  loss = _mean(-jax.nn.log_sigmoid(margin), weight)
  if center_rewards_coefficient:
    loss = loss + center_rewards_coefficient * _mean(
        (s[:, :, None] + s[:, None, :]) ** 2, weight)
  s, margin = jax.lax.stop_gradient(s), jax.lax.stop_gradient(margin)
  shape = weight.shape
  accuracy = _mean((margin > 0).astype(jnp.float32), weight)
  mean_margin = _mean(margin, weight)
  return loss, {
      'loss': loss,
      'rewards/chosen': _mean(jnp.broadcast_to(s[:, :, None], shape), weight),
      'rewards/rejected': _mean(jnp.broadcast_to(s[:, None, :], shape), weight),
      'rewards/accuracies': accuracy,
      'rewards/margins': mean_margin,
      'accuracy': accuracy,
      'margin': mean_margin,
  }


# --------------------------------------------------------------------------
# Registry and entry point.


@dataclasses.dataclass(frozen=True)
class _Spec:
  fn: Callable[..., tuple[jax.Array, Metrics]]
  hparams: tuple[str, ...]  # config fields the loss reads
  reference: bool = True


_REGISTRY: dict[str, _Spec] = {
    'sigmoid': _Spec(sigmoid, ('beta', 'label_smoothing')),
    'robust': _Spec(robust, ('beta', 'label_smoothing')),
    'ipo': _Spec(ipo, ('beta',)),
    'hinge': _Spec(hinge, ('beta',)),
    'rpo': _Spec(rpo, ('beta', 'label_smoothing', 'rpo_alpha')),
    'plackett_luce': _Spec(plackett_luce, ('beta',)),
    'simpo': _Spec(simpo, ('beta', 'simpo_gamma', 'label_smoothing'), reference=False),
    'orpo': _Spec(orpo, ('orpo_lambda',), reference=False),
    'reward_model': _Spec(reward_model, ('center_rewards_coefficient',), reference=False),
}
LOSSES: tuple[str, ...] = tuple(_REGISTRY)


def _spec(loss_cfg: ml_collections.ConfigDict) -> _Spec:
  if loss_cfg.type not in _REGISTRY:
    raise ValueError(f'unknown loss.type={loss_cfg.type!r}; known: {", ".join(LOSSES)}')
  return _REGISTRY[loss_cfg.type]


def uses_reference(loss_cfg: ml_collections.ConfigDict) -> bool:
  """Whether the loss needs reference-model log-probs (False: no reference model)."""
  return _spec(loss_cfg).reference


def is_reward_model(loss_cfg: ml_collections.ConfigDict) -> bool:
  """Whether the loss trains a scalar reward model on scores, not log-probs."""
  return loss_cfg.type == 'reward_model'


def validate(loss_cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError for an unknown type or out-of-range hyper-parameters."""
  spec = _spec(loss_cfg)
  get = lambda name: loss_cfg.get(name, default_loss_config()[name])
  if 'beta' in spec.hparams and not get('beta') > 0:
    raise ValueError(f'loss.beta={get("beta")} must be positive')
  smoothing = get('label_smoothing')
  if 'label_smoothing' in spec.hparams:
    if not 0.0 <= smoothing <= 1.0:
      raise ValueError(f'loss.label_smoothing={smoothing} must be in [0, 1]')
  elif smoothing:
    # A silently ignored setting would be a misleading config.
    raise ValueError(f'loss.type={loss_cfg.type!r} does not use label_smoothing '
                     f'(got {smoothing}); it applies to sigmoid, robust, rpo, simpo')


def compute_loss(loss_cfg: ml_collections.ConfigDict, *, policy_logps: jax.Array | None,
                 reference_logps: jax.Array | None, counts: jax.Array | None,
                 response_mask: jax.Array, scores: jax.Array | None = None
                 ) -> tuple[jax.Array, Metrics]:
  """The configured loss and its metrics.

  Args:
    loss_cfg: a :func:`default_loss_config` (fields missing from it take the
      defaults).
    policy_logps: ``[E, N]`` float32 summed response log-probs (unused by
      ``reward_model``).
    reference_logps: ``[E, N]`` float32, or None when not
      :func:`uses_reference`.
    counts: ``[E, N]`` int32 tokens per response.
    response_mask: ``[E, N]`` bool; responses ranked best first.
    scores: ``[E, N]`` float32 reward-model scores (``reward_model`` only).
  Returns:
    ``(loss, metrics)``: scalar float32 loss and scalar metrics with TRL's
    names; every loss has ``loss`` and ``rewards/accuracies``.
  Raises:
    ValueError: unknown ``loss_cfg.type`` (listing the known names), bad
      hyper-parameters or missing inputs.
  """
  validate(loss_cfg)
  spec = _spec(loss_cfg)
  defaults = default_loss_config()
  hparams = {name: loss_cfg.get(name, defaults[name]) for name in spec.hparams}
  if is_reward_model(loss_cfg):
    if scores is None:
      raise ValueError('loss.type=reward_model needs scores (RewardModel.scores)')
    return spec.fn(scores.astype(jnp.float32), response_mask, **hparams)
  if policy_logps is None or counts is None:
    raise ValueError(f'loss.type={loss_cfg.type!r} needs policy_logps and counts')
  if spec.reference and reference_logps is None:
    raise ValueError(f'loss.type={loss_cfg.type!r} needs reference_logps')
  reference = reference_logps if spec.reference else None
  return spec.fn(policy_logps, reference, counts, response_mask, **hparams)


def dpo_sigmoid(policy: jax.Array, reference: jax.Array, response_mask: jax.Array,
                *, beta: float = 0.1, label_smoothing: float = 0.0
                ) -> tuple[jax.Array, Metrics]:
  """:func:`sigmoid` DPO without token counts (kept for existing callers)."""
  return sigmoid(policy, reference, None, response_mask, beta=beta,
                 label_smoothing=label_smoothing)
