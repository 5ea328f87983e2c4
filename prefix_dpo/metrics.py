"""Training metrics: throughput and FLOP accounting, and the writers.

Writers (process 0 only): ``metrics.jsonl`` (one JSON object per logged step),
TensorBoard events (tensorboardX), and Weights & Biases when installed and
enabled.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from prefix_dpo import model as model_lib

# Dense bf16 peak FLOP/s per device, for the MFU estimate.
PEAK_FLOPS = {
    'H100': 989e12, 'H200': 989e12, 'H800': 989e12, 'A100': 312e12, 'L4': 121e12,
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
    'TPU v6 lite': 918e12, 'TPU v6e': 918e12,
}


def peak_flops_per_device(device: Any = None) -> float | None:
  """Peak FLOP/s of ``device`` (default: the first) if known, else None (e.g. CPU)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return None


def batch_stats(batch: Mapping[str, np.ndarray]) -> dict[str, int]:
  """Host-side counts of a laid-out batch.

  ``attention_pairs`` counts the (query, key) pairs the mask allows: every
  token sees exactly its standalone sequence's prefix, i.e. ``position + 1``
  keys, in either layout.
  """
  real = batch['segment_ids'] > 0
  mask = batch['response_mask']
  return {
      'tokens': int(real.sum()),
      'padded_tokens': int(real.size),
      'pairs': int((mask[:, :1] & mask[:, 1:]).sum()),
      'examples': int(mask[:, 0].sum()),
      'target_tokens': int((batch['target_slot'] >= 0).sum()),
      'attention_pairs': int((batch['positions'][real].astype(np.int64) + 1).sum()),
  }


def train_flops(cfg: model_lib.ModelConfig, stats: Mapping[str, int], *,
                with_reference: bool) -> float:
  """Model FLOPs of one training step (forward + backward ~ 3x forward).

  Matmul FLOPs are 2 per parameter per token (embedding lookup excluded;
  the unembedding counted on scored tokens only), attention 4 * heads *
  head_dim per allowed (query, key) pair and layer. The reference model adds
  one forward pass.
  """
  d, layers = cfg.hidden_size, cfg.num_layers
  per_token = 2 * (cfg.num_params() - cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2))
  forward = (per_token * stats['tokens']
             + 2 * d * cfg.vocab_size * stats['target_tokens']
             + 4 * cfg.num_heads * cfg.head_dim * layers * stats['attention_pairs'])
  return forward * (4 if with_reference else 3)


class MetricsWriter:
  """Writes scalar metrics to metrics.jsonl, TensorBoard and optionally W&B."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, wandb_project: str = '',
               config: Mapping[str, Any] | None = None, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tb = self.wandb = None
    if not self.enabled:
      return
    _truncate_after(self.path, resume_step)
    self.file = open(self.path, 'a', encoding='utf-8')
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    if wandb_project:
      try:
        import wandb  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ImportError('logging.wandb_project is set but wandb is not installed '
                          '(pip install wandb)') from e
      self.wandb = wandb.init(project=wandb_project, config=dict(config or {}),
                              dir=workdir, resume='allow')

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {'step': step, **{k: float(v) for k, v in metrics.items()}}
    self.file.write(json.dumps(record) + '\n')
    self.file.flush()
    if self.tb is not None:
      for key, value in metrics.items():
        self.tb.add_scalar(key, float(value), step)
      self.tb.flush()
    if self.wandb is not None:
      self.wandb.log(dict(metrics), step=step)

  def close(self) -> None:
    if not self.enabled:
      return
    self.file.close()
    if self.tb is not None:
      self.tb.close()
    if self.wandb is not None:
      self.wandb.finish()


def _truncate_after(path: str, step: int) -> None:
  """Drops records past ``step``: a resumed run rewrites them."""
  if not os.path.exists(path):
    return
  with open(path, encoding='utf-8') as f:
    kept = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
  with open(path, 'w', encoding='utf-8') as f:
    f.writelines(kept)
