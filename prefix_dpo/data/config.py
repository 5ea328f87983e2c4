"""Every data key with its default (the training config embeds it as ``config.data``).

Lengths are in tokens; 0 means no limit. The batch geometry (``seq_len``,
rows, examples per batch, layout, packing) belongs to the training config and
is passed to :func:`prefix_dpo.data.pipeline.make_batch_iterator`.
"""
from __future__ import annotations

import ml_collections

from prefix_dpo.data import accounting, formats, readers

PROMPT_TRUNCATION = ('keep_end', 'keep_start', 'skip')
RESPONSE_TRUNCATION = ('keep_start', 'skip')


def default_data_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Files: comma-separated paths or globs; bundled:NAME = the bundled data set.
  c.train_files = 'bundled:train'
  c.eval_files = 'bundled:eval'
  # With eval_files='', hold out this fraction of the train records as eval.
  c.eval_fraction = 0.0
  c.file_format = 'auto'  # auto | jsonl | json | parquet | hf_disk
  c.hf_split = 'train'    # split of a save_to_disk DatasetDict directory
  c.format = 'auto'       # see prefix_dpo.data.formats.FORMATS
  c.fields = ml_collections.ConfigDict(dict(
      prompt='prompt', chosen='chosen', rejected='rejected', responses='responses',
      scores='scores', ranking='ranking', role='role', content='content'))
  c.assistant_marker = '\n\nAssistant:'  # implicit text prompts (HH-RLHF)
  c.hh_as_messages = False  # implicit text: turn HH transcripts into messages
  # 'byte' or a local Hugging Face tokenizer directory.
  c.tokenizer = 'byte'
  c.chat_template = ''  # overrides the tokenizer's: a jinja string or a file
  # Truncation; max_length bounds prompt + each response (as TRL's).
  c.max_length = 0
  c.max_prompt_length = 0
  c.max_response_length = 0
  c.prompt_truncation = 'keep_end'      # keep the latest turns
  c.response_truncation = 'keep_start'  # cut responses at the end
  # Any skipped record is an error.
  c.strict = False
  c.shuffle = True  # train split only; eval keeps file order
  # Packing: examples held to choose from (bounded memory; larger = fuller rows).
  c.pack_buffer = 256
  # Worker processes for parsing and tokenising (grain mp_prefetch); 0 = none.
  c.num_workers = 0
  c.worker_buffer_size = 64
  c.max_listed = 5  # record locations listed per skip reason
  return c


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ``DataError`` (one line) for a value no run could use."""
  def check(name: str, ok: bool, expected: str) -> None:
    if not ok:
      raise accounting.DataError(f'config: data.{name}={c[name]!r}; expected {expected}')
  check('format', c.format in formats.FORMATS, f'one of {formats.FORMATS}')
  check('file_format', c.file_format in readers.FILE_FORMATS, f'one of {readers.FILE_FORMATS}')
  check('prompt_truncation', c.prompt_truncation in PROMPT_TRUNCATION,
        f'one of {PROMPT_TRUNCATION}')
  check('response_truncation', c.response_truncation in RESPONSE_TRUNCATION,
        f'one of {RESPONSE_TRUNCATION}')
  for name in ('max_length', 'max_prompt_length', 'max_response_length', 'num_workers'):
    check(name, c[name] >= 0, '>= 0')
  check('eval_fraction', 0.0 <= c.eval_fraction < 1.0, 'in [0, 1)')
  check('pack_buffer', c.pack_buffer >= 1, '>= 1')
