"""The benchmark config: every key with its default (``configs/bench/*.py`` override)."""
from __future__ import annotations

import dataclasses

import ml_collections

from prefix_dpo import losses, model as model_lib, optim

MODES = ('paired', 'paired_packed', 'prefix_shared', 'prefix_shared_packed')


def mode_layout(mode: str) -> tuple[str, bool]:
  """``'prefix_shared_packed'`` -> ``('prefix_shared', True)``."""
  if mode not in MODES:
    raise ValueError(f'unknown mode {mode!r}; expected one of {MODES}')
  return mode.removesuffix('_packed'), mode.endswith('_packed')


def cpu_model() -> dict:
  """The CPU default: a 2-layer, 1.6M-parameter (+ embeddings) Llama.

  Width and head size keep attention a realistic share of the FLOPs at the
  scaled lengths; small enough for all six workloads in ~15 minutes on 2 cores.
  """
  return dict(vocab_size=2048, hidden_size=256, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=64, mlp_dim=768, attention_impl='xla_blocked')


def base_config() -> ml_collections.ConfigDict:
  from prefix_dpo.data import config as data_config  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict()
  # Workloads: names of workloads.PAPER, 'all' (those six), or 'file'
  # (data.train_files through the data pipeline). Tuples, so that flags can
  # override them: --config.workloads=all, or --config.modes=paired
  # --config.modes=prefix_shared (repeated).
  c.workloads = ('capybara',)
  c.modes = MODES
  # Every synthetic length times this (1/4 on CPU: ratios are unchanged).
  c.length_scale = 0.25
  # Pairs per step: pairs_per_step, or (0) as many as make about
  # tokens_per_step prefix-shared tokens at the workload's median length.
  c.pairs_per_step = 0
  c.tokens_per_step = 2048
  c.steps = 7    # timed rounds; every round runs every mode once, interleaved
  c.warmup = 1   # untimed rounds after compilation
  c.seed = 0
  c.model = ml_collections.ConfigDict(
      {f.name: f.default for f in dataclasses.fields(model_lib.ModelConfig)})
  c.model.rope_scaling = ml_collections.FieldReference(None, field_type=dict)
  c.model.update(cpu_model())
  # Static shapes: unpacked rows are as long as the longest sequence, rounded
  # up to seq_multiple; packed rows take the length that minimises the cost
  # model (padded tokens, plus S**2 attention for the dense impl).
  c.seq_multiple = 16
  c.max_pack_factor = 4  # packed seq_len candidates: up to this x the longest
  # Score only response tokens (static compaction in logprobs.py).
  c.max_targets = True
  c.logprob_chunk = 512
  # xla_blocked: budget exactly the non-empty tiles of the batches.
  c.exact_tile_budget = True
  c.loss = losses.default_loss_config()
  c.reference_mode = 'model'  # the reference forward runs inside the step
  c.optimizer = optim.default_optimizer_config()
  c.check_logprobs = True
  c.chart = True
  # One extra profiled step per mode: seconds per op category in results.json.
  c.profile = False
  # 'file' workload: the data pipeline's config and the longest example kept.
  c.data = data_config.default_data_config()
  c.data.max_length = 1024
  c.file_seq_len = 2048
  return c


def model_config(c: ml_collections.ConfigDict, vocab_size: int | None = None
                 ) -> model_lib.ModelConfig:
  values = c.model.to_dict()
  if vocab_size:
    values['vocab_size'] = vocab_size
  return model_lib.ModelConfig.from_dict(values)
