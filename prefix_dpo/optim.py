"""The optimiser: AdamW with warmup + decay, clipping and gradient accumulation."""
from __future__ import annotations

import ml_collections
import optax

SCHEDULES = ('cosine', 'linear', 'constant')


def default_optimizer_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      learning_rate=5e-7, warmup_steps=0, schedule='cosine', end_lr_factor=0.0,
      weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0,
      grad_accum_steps=1))


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to ``learning_rate``, then cosine/linear decay or constant."""
  peak, warmup = cfg.learning_rate, cfg.warmup_steps
  decay_steps = max(total_steps - warmup, 1)
  end = peak * cfg.end_lr_factor
  if cfg.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr_factor)
  elif cfg.schedule == 'linear':
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif cfg.schedule == 'constant':
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f'optimizer.schedule={cfg.schedule!r}; expected one of {SCHEDULES}')
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """AdamW; ``total_steps`` counts optimiser updates (after accumulation)."""
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
      optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                  eps=cfg.eps, weight_decay=cfg.weight_decay))
  if cfg.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
  return tx
