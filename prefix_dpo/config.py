"""The training config: every key with its default, and its validation.

``configs/*.py`` start from :func:`base_config` and override; the CLI's
``--config.a.b=value`` flags override further. The config is locked, so an
unknown key is an error, and :func:`validate` checks values before any work.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any

import ml_collections
from absl import flags

from prefix_dpo import layout, losses, model as model_lib, optim, reference


def base_config() -> ml_collections.ConfigDict:
  from prefix_dpo.data import config as data_config  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Model: ModelConfig fields; vocab_size 0 = the tokenizer's vocabulary.
  c.model = ml_collections.ConfigDict(
      {f.name: f.default for f in dataclasses.fields(model_lib.ModelConfig)})
  c.model.rope_scaling = ml_collections.FieldReference(None, field_type=dict)
  c.model.vocab_size = 0
  c.model.hf_path = ''  # a local Hugging Face model dir: weights, config and tokenizer
  c.data = data_config.default_data_config()
  c.loss = losses.default_loss_config()
  c.optimizer = optim.default_optimizer_config()
  # Rows: prefix_shared or paired; pack several sequences per row or not.
  c.layout = 'prefix_shared'
  c.pack = True
  c.seq_len = 1024
  c.num_responses = 2
  # Global (all processes) sizes of one micro-batch.
  c.batch = ml_collections.ConfigDict(dict(rows=8, max_examples=16))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.reference = ml_collections.ConfigDict(dict(mode='model'))
  c.train = ml_collections.ConfigDict(dict(
      steps=100, log_every=10, eval_every=0, eval_batches=0, checkpoint_every=0,
      keep_checkpoints=3, logprob_chunk=1024, max_target_fraction=0.0))
  c.logging = ml_collections.ConfigDict(dict(
      tensorboard=True, wandb_project='', progress_bar=True))
  # Multi-host: jax.distributed.initialize() arguments ('' / -1 = auto-detect
  # on TPU pods and SLURM; set all three for a manual cluster).
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address='', num_processes=-1, process_id=-1))
  return c


def model_config(c: ml_collections.ConfigDict, vocab_size: int) -> model_lib.ModelConfig:
  """The ModelConfig of a run: from ``model.hf_path``'s config.json when set
  (only runtime fields such as dtypes come from ``c.model``), else ``c.model``."""
  values = {k: v for k, v in c.model.to_dict().items() if k != 'hf_path'}
  if not values['vocab_size']:
    values['vocab_size'] = vocab_size
  cfg = model_lib.ModelConfig.from_dict(values)
  if c.model.hf_path:
    from prefix_dpo import hf_interop  # pylint: disable=g-import-not-at-top
    cfg = hf_interop.resolve_config(c.model.hf_path, cfg)
  return cfg


def record_model_config(c: ml_collections.ConfigDict, cfg: model_lib.ModelConfig) -> None:
  """Writes the resolved architecture into ``c.model`` so checkpoints describe it."""
  for field in dataclasses.fields(cfg):
    c.model[field.name] = getattr(cfg, field.name)


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError with one clear line for any inconsistent value."""
  def check(ok: bool, message: str):
    if not ok:
      raise ValueError(f'config: {message}')

  check(c.layout in layout.LAYOUTS, f'layout={c.layout!r}; expected one of {layout.LAYOUTS}')
  check(c.reference.mode in reference.MODES,
        f'reference.mode={c.reference.mode!r}; expected one of {reference.MODES}')
  check(c.optimizer.schedule in optim.SCHEDULES,
        f'optimizer.schedule={c.optimizer.schedule!r}; expected one of {optim.SCHEDULES}')
  losses.validate(c.loss)
  check(c.seq_len > 0 and c.batch.rows > 0 and c.batch.max_examples > 0,
        'seq_len, batch.rows and batch.max_examples must be positive')
  check(c.num_responses >= 2, 'num_responses must be >= 2 (preferences compare responses)')
  check(c.train.steps > 0, 'train.steps must be positive')
  check(c.optimizer.grad_accum_steps >= 1, 'optimizer.grad_accum_steps must be >= 1')
  if not c.pack:
    per_example = c.num_responses if c.layout == 'paired' else 1
    check(c.batch.rows == c.batch.max_examples * per_example,
          f'pack=False lays out one sequence per row: batch.rows must be '
          f'batch.max_examples * {per_example} = {c.batch.max_examples * per_example}, '
          f'got {c.batch.rows}')
  if not c.model.hf_path:
    model_config(c, vocab_size=max(c.model.vocab_size, 1))  # raises on bad model keys


def load_config_flag(value: Any) -> Any:
  """A config-file flag's value, loaded: a file that fails to load is one line, exit 2.

  ``config_flags`` loads the file lazily, on the first attribute access.
  """
  try:
    value.keys  # pylint: disable=pointless-statement
  except OSError as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    sys.exit(2)
  return value


def parse_flags(argv: list[str]) -> list[str]:
  """Parses flags; a bad config file or override is one clear line, exit status 2."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    message = str(e).replace('\\n', ' ').replace("\\'", "'")
    message = ' '.join(message.split()).strip('\'"')
    if isinstance(e, KeyError):
      message = f'unknown config key {message!r}'
    print(f'error: bad flag or config override: {message}', file=sys.stderr)
    sys.exit(2)
