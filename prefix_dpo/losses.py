"""Preference losses over per-response log-probs.

Inputs are ``[examples, responses]`` grids: response 0 is the chosen (best)
response; responses 1.. are rejected. With N > 2 responses the pairwise losses
average over the pairs (0, k) -- best versus each rejected -- which reduces to
the standard loss for N = 2. ``response_mask`` marks real responses (batches
padded to a static number of examples have empty rows).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _pairs(policy: jax.Array, reference: jax.Array, response_mask: jax.Array):
  """Chosen-vs-rejected pairs: ``(chosen, rejected, weight)`` each ``[E, N-1]``."""
  chosen_logratio = (policy[:, :1] - reference[:, :1])
  rejected_logratio = policy[:, 1:] - reference[:, 1:]
  weight = (response_mask[:, :1] & response_mask[:, 1:]).astype(jnp.float32)
  return chosen_logratio, rejected_logratio, weight


def _mean(values: jax.Array, weight: jax.Array) -> jax.Array:
  return jnp.sum(values * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def dpo_sigmoid(policy: jax.Array, reference: jax.Array, response_mask: jax.Array,
                *, beta: float = 0.1, label_smoothing: float = 0.0
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Sigmoid DPO (Rafailov et al. 2023), conservative with label smoothing.

  ``loss = -(1 - eps) log sigma(beta * h) - eps log sigma(-beta * h)`` with
  ``h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))``
  (Mitchell 2023, "A note on DPO with noisy preferences", for ``eps``).

  Args:
    policy, reference: ``[E, N]`` float32 summed response log-probs.
    response_mask: ``[E, N]`` bool.
  Returns:
    ``(loss, metrics)`` with TRL's metric names.
  """
  chosen, rejected, weight = _pairs(policy, reference, response_mask)
  logits = beta * (chosen - rejected)
  per_pair = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits)
              - label_smoothing * jax.nn.log_sigmoid(-logits))
  loss = _mean(per_pair, weight)
  chosen_reward = jnp.broadcast_to(beta * chosen, rejected.shape)
  rejected_reward = beta * rejected
  metrics = {
      'loss': loss,
      'rewards/chosen': _mean(chosen_reward, weight),
      'rewards/rejected': _mean(rejected_reward, weight),
      'rewards/accuracies': _mean((chosen_reward > rejected_reward).astype(jnp.float32), weight),
      'rewards/margins': _mean(chosen_reward - rejected_reward, weight),
      'logps/chosen': _mean(jnp.broadcast_to(policy[:, :1], rejected.shape), weight),
      'logps/rejected': _mean(policy[:, 1:], weight),
  }
  return loss, metrics
