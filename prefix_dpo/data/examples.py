"""One raw record -> one :class:`prefix_dpo.layout.Example`, or a skip reason.

Parse (:mod:`~prefix_dpo.data.formats`), tokenize
(:mod:`~prefix_dpo.data.tokenizers`), truncate, and check that the layout's
sequences fit in ``seq_len``. Truncation, in this order:

1. ``max_prompt_length``: ``prompt_truncation='keep_end'`` keeps the latest
   tokens (the latest turns) and the first token when it is BOS;
   ``'keep_start'`` keeps the first tokens; ``'skip'`` skips the record
   (``prompt_too_long``).
2. ``max_length`` bounds prompt + each response, as TRL's (the same tokens go
   into both layouts). A prompt with no room left is skipped
   (``prompt_too_long``). ``max_response_length`` bounds each response.
   Responses are cut at the end (``response_truncation='keep_start'``) or
   skipped (``'skip'``: ``response_too_long``).

Truncated records are used and counted; responses that truncation makes equal
are skipped (``identical_after_truncation``).
"""
from __future__ import annotations

import dataclasses
import types

import ml_collections
import numpy as np

from prefix_dpo import layout as layout_lib
from prefix_dpo.data import formats, tokenizers
from prefix_dpo.data.accounting import DataError, Skip, Summary
from prefix_dpo.data.readers import RawRecord


@dataclasses.dataclass(frozen=True)
class Prepared:
  """What became of one record: an example (with its sequence lengths) or a skip."""
  record_id: int
  where: str
  example: layout_lib.Example | None = None
  lengths: tuple[int, ...] = ()  # the layout's sequence lengths
  skip: str | None = None
  truncated_prompt: bool = False
  truncated_responses: int = 0
  retokenized: int = 0


class Preparer:
  """Callable ``RawRecord -> Prepared`` (picklable, for grain worker processes)."""

  def __init__(self, data_cfg: ml_collections.ConfigDict, fmt: str, tokenizer, *,
               layout: str, seq_len: int, num_responses: int):
    self.cfg = _namespace(data_cfg.to_dict())  # ConfigDict lookups are slow per record
    self.fmt = fmt
    self.tokenizer = tokenizer
    self.layout = layout
    self.seq_len = seq_len  # 0 = no fit check (statistics)
    self.num_responses = num_responses  # 0 = any number

  def __call__(self, record: RawRecord) -> Prepared:
    try:
      if record.error is not None:
        raise record.error
      return self._prepare(record)
    except Skip as skip:
      if self.cfg.strict:
        raise DataError(f'{record.where}: {skip} (data.strict=True: fix or drop '
                        'the record, or set data.strict=False to skip and count it)') from None
      return Prepared(record.record_id, record.where, skip=skip.reason)

  def _prepare(self, record: RawRecord) -> Prepared:
    pref = formats.parse(record.value, self.fmt, self.cfg)
    if self.num_responses and len(pref.responses) > self.num_responses:
      raise Skip('too_many_responses', f'{len(pref.responses)} > {self.num_responses}')
    tokens = tokenizers.tokenize_preference(self.tokenizer, pref)
    for k, r in enumerate(tokens.responses):
      if r.size == 0:
        raise Skip('empty_response', f'response {k} has no tokens')
    prompt, truncated_prompt = self._truncate_prompt(tokens.prompt)
    responses, truncated = self._truncate_responses(prompt, tokens.responses)
    if any(np.array_equal(responses[0], r) for r in responses[1:]):
      raise Skip('identical_after_truncation')
    example = layout_lib.Example(prompt, responses)
    lengths = tuple(layout_lib.sequence_lengths(example, self.layout))
    if self.seq_len and max(lengths) > self.seq_len:
      raise Skip('longer_than_seq_len', f'{max(lengths)} > {self.seq_len}')
    return Prepared(record.record_id, record.where, example, lengths,
                    truncated_prompt=truncated_prompt, truncated_responses=truncated,
                    retokenized=tokens.retokenized)

  def _truncate_prompt(self, prompt: np.ndarray) -> tuple[np.ndarray, bool]:
    limit = self.cfg.max_prompt_length
    if not limit or len(prompt) <= limit:
      return prompt, False
    mode = self.cfg.prompt_truncation
    if mode == 'skip':
      raise Skip('prompt_too_long', f'{len(prompt)} > max_prompt_length={limit}')
    if mode == 'keep_start':
      return prompt[:limit], True
    bos = self.tokenizer.bos_id
    if bos is not None and prompt[0] == bos and limit > 1:
      return np.concatenate([prompt[:1], prompt[len(prompt) - limit + 1:]]), True
    return prompt[len(prompt) - limit:], True

  def _truncate_responses(self, prompt: np.ndarray, responses) -> tuple[list, int]:
    limit = self.cfg.max_response_length or None
    if self.cfg.max_length:
      room = self.cfg.max_length - len(prompt)
      if room < 1:
        raise Skip('prompt_too_long', f'{len(prompt)} prompt tokens leave no room '
                   f'in max_length={self.cfg.max_length}')
      limit = room if limit is None else min(limit, room)
    if limit is None:
      return list(responses), 0
    out, truncated = [], 0
    for r in responses:
      if len(r) > limit:
        if self.cfg.response_truncation == 'skip':
          raise Skip('response_too_long', f'{len(r)} > {limit}')
        r, truncated = r[:limit], truncated + 1
      out.append(r)
    return out, truncated


def _namespace(values: dict) -> types.SimpleNamespace:
  return types.SimpleNamespace(**{k: _namespace(v) if isinstance(v, dict) else v
                                  for k, v in values.items()})


def tally(summary: Summary, prepared: Prepared) -> None:
  """Adds one prepared record to a summary."""
  if prepared.example is None:
    summary.count_skip(prepared.skip, prepared.where)
  else:
    summary.count_used(len(prepared.example.prompt),
                       [len(r) for r in prepared.example.responses],
                       truncated_prompt=prepared.truncated_prompt,
                       truncated_responses=prepared.truncated_responses,
                       retokenized=prepared.retokenized)
