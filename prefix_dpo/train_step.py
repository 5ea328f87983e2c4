"""The jitted functions of training: train step, eval step, reference pass.

Parameters travel as pure dicts of arrays and are merged into the NNX module
(``graphdef``) inside the traced functions, so everything here is a pure
function of arrays that ``jax.jit`` can shard.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from prefix_dpo import logprobs, losses

Params = Any
Batch = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """What the step functions need besides arrays."""
  graphdef: Any
  loss: ml_collections.ConfigDict
  reference_mode: str  # 'model', 'precomputed' or 'none'
  chunk_size: int = 1024
  max_targets: int | None = None


def _logps(graphdef, params: Params, batch: Batch, s: StepSettings):
  model = nnx.merge(graphdef, params)
  if losses.is_reward_model(s.loss):
    # The reward model scores each response's last token; no log-probs.
    return None, None, model.scores(batch)
  logps, counts = logprobs.model_logprobs(model, batch, chunk_size=s.chunk_size,
                                          max_targets=s.max_targets)
  return logps, counts, None


def loss_fn(params: Params, reference_params: Params | None, batch: Batch,
            s: StepSettings) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The preference loss of a batch and its metrics."""
  policy_logps, counts, scores = _logps(s.graphdef, params, batch, s)
  if s.reference_mode == 'model':
    reference_logps = jax.lax.stop_gradient(
        _logps(s.graphdef, reference_params, batch, s)[0])
  elif s.reference_mode == 'precomputed':
    reference_logps = batch['reference_logps']
  else:
    reference_logps = None
  if counts is None:
    counts = jnp.zeros(batch['response_mask'].shape, jnp.int32)
  return losses.compute_loss(s.loss, policy_logps=policy_logps,
                             reference_logps=reference_logps, counts=counts,
                             response_mask=batch['response_mask'], scores=scores)


def make_train_step(s: StepSettings, tx: optax.GradientTransformation) -> Callable:
  """``(state, batch, reference_params) -> (state, metrics)``; state is a dict."""

  def train_step(state, batch, reference_params):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(state['params'], reference_params, batch, s)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return {'params': params, 'opt_state': opt_state, 'step': state['step'] + 1}, metrics

  return train_step


def make_eval_step(s: StepSettings) -> Callable:
  """``(params, batch, reference_params) -> metrics`` (no gradients)."""

  def eval_step(params, batch, reference_params):
    return loss_fn(params, reference_params, batch, s)[1]

  return eval_step


def make_reference_step(s: StepSettings) -> Callable:
  """``(params, batch) -> [examples, responses]`` log-probs of the reference."""

  def reference_step(params, batch):
    return _logps(s.graphdef, params, batch, s)[0]

  return reference_step
