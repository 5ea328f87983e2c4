"""A scalar reward model: a :class:`prefix_dpo.model.Decoder` and a value head.

A response's score is the value head applied to the final hidden state of its
last token. With prefix sharing all N responses of an example sit in one row
behind the shared prompt, and the mask rule makes each response's last hidden
state equal to that of its standalone ``[prompt | response]`` row; the batch's
``response_row`` / ``response_end`` say where each one is, in either layout.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from prefix_dpo import model as model_lib


class RewardModel(nnx.Module):
  """``Decoder`` backbone plus a linear value head ``[hidden] -> 1`` (no bias).

  The Bradley-Terry loss only sees score differences, so a bias would get no
  gradient (as in Hugging Face's ``*ForSequenceClassification`` heads, which
  have none). The backbone keeps its unembedding, unused here, so that
  checkpoints stay interchangeable with the language model's.
  """

  def __init__(self, cfg: model_lib.ModelConfig, *, rngs: nnx.Rngs,
               backbone: model_lib.Decoder | None = None):
    """Builds a fresh backbone from ``cfg``, or wraps ``backbone`` (e.g. one
    loaded from a Hugging Face checkpoint); the head is always new."""
    self.backbone = model_lib.Decoder(cfg, rngs=rngs) if backbone is None else backbone
    d = self.backbone.cfg.hidden_size
    dtype = model_lib.DTYPES[self.backbone.cfg.param_dtype]
    # Same scale as the model's projections: scores start O(1) on unit-RMS states.
    value = d ** -0.5 * jax.random.truncated_normal(rngs.params(), -2, 2, (d,))
    self.value_head = nnx.Param(value.astype(dtype), out_sharding=('embed',),
                                eager_sharding=False)

  @classmethod
  def from_decoder(cls, decoder: model_lib.Decoder, *, rngs: nnx.Rngs) -> 'RewardModel':
    """Wraps an existing (e.g. pretrained) decoder with a new value head."""
    return cls(decoder.cfg, rngs=rngs, backbone=decoder)

  @property
  def cfg(self) -> model_lib.ModelConfig:
    return self.backbone.cfg

  def score_hidden(self, hidden: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Scores from final hidden states ``[rows, seq, hidden]``: ``[E, N]`` float32.

    Empty slots (``response_mask`` False) score 0.
    """
    mask = batch['response_mask']
    last = hidden[batch['response_row'], batch['response_end']]  # [E*N, hidden]
    scores = jnp.einsum('td,d->t', last.astype(jnp.float32),
                        self.value_head[...].astype(jnp.float32))
    return jnp.where(mask, scores.reshape(mask.shape), 0.0)

  def scores(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Runs the backbone on a laid-out batch (:mod:`prefix_dpo.layout`).

    Args:
      batch: ``input_ids``, ``positions``, ``segment_ids``, ``branch_ids``
        ``[rows, seq]``; ``response_row``, ``response_end`` ``[E * N]``;
        ``response_mask`` ``[E, N]``.
    Returns:
      ``[E, N]`` float32 scores, ``scores[e, k]`` of response k of example e.
    """
    hidden = self.backbone(batch['input_ids'], batch['positions'],
                           batch['segment_ids'], batch['branch_ids'])
    return self.score_hidden(hidden, batch)

  __call__ = scores
