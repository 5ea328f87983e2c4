"""Bad-input accounting: why records were skipped, and the data summary.

Every record read ends up used or skipped for exactly one reason, so the
counts always add up: ``read == used + sum(skipped.values())``. A record that
cannot be used raises :class:`Skip` deep inside parsing or tokenising; the
caller turns it into a count (or, with ``data.strict``, into a
:class:`DataError`). Problems with a whole input -- a missing file, an unknown
format, field names that do not match -- are :class:`DataError` at once, with
one line naming the file and the fields it has.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

# Skip reasons, in the order the summary lists them.
REASONS = {
    'malformed_json': 'the line or file is not valid JSON',
    'undecodable_bytes': 'bytes that are not UTF-8 (or lone surrogates)',
    'not_a_record': 'the JSON value is not an object',
    'missing_field': 'a field the format needs is absent or null',
    'not_a_string': 'a text field (or message content/role) has the wrong type',
    'bad_messages': 'a message list is empty or has an unknown role',
    'empty_prompt': 'the prompt is empty',
    'empty_response': 'a response is empty',
    'identical_responses': 'the chosen response equals a rejected one',
    'no_shared_prompt': 'implicit prompt: the transcripts share no prompt',
    'prompt_mismatch': 'the responses continue different conversations',
    'bad_scores': 'scores/ranking missing, of the wrong length, or tied best',
    'too_few_responses': 'fewer than 2 responses',
    'too_many_responses': 'more responses than num_responses',
    'template_mismatch': 'the chat template does not render the prompt as a prefix',
    'prompt_too_long': 'the prompt leaves no room for a response (max_length / max_prompt_length)',
    'response_too_long': 'a response exceeds the limit and response_truncation=skip',
    'identical_after_truncation': 'responses are equal once truncated',
    'longer_than_seq_len': "the layout's sequence does not fit in seq_len",
}


class DataError(ValueError):
  """An input problem that stops the run: one line, naming file and fields."""


class Skip(Exception):
  """Raised for a record that cannot be used; ``reason`` is a key of REASONS."""

  def __init__(self, reason: str, detail: str = ''):
    assert reason in REASONS, reason
    super().__init__(f'{reason}: {detail}' if detail else reason)
    self.reason = reason
    self.detail = detail

  def __reduce__(self):  # pickles for grain worker processes
    return Skip, (self.reason, self.detail)


@dataclasses.dataclass
class Summary:
  """What reading one split gave: counts, lengths and truncation.

  ``skipped_where`` keeps a few ``file:record`` locations per reason (records
  are numbered from 1: the line of a JSONL file, the row of the others).
  Lengths are token counts of the used examples, after truncation.
  """
  split: str
  files: list[str]
  format: str
  read: int = 0
  used: int = 0
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)
  skipped_where: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  truncated_prompts: int = 0
  truncated_responses: int = 0
  boundary_retokenized: int = 0
  prompt_lengths: list[int] = dataclasses.field(default_factory=list)
  response_lengths: list[int] = dataclasses.field(default_factory=list)
  paired_tokens: int = 0
  prefix_shared_tokens: int = 0
  max_listed: int = 5

  def count_skip(self, reason: str, where: str) -> None:
    self.read += 1
    self.skipped[reason] = self.skipped.get(reason, 0) + 1
    listed = self.skipped_where.setdefault(reason, [])
    if len(listed) < self.max_listed:
      listed.append(where)

  def count_used(self, prompt_len: int, response_lens: list[int], *,
                 truncated_prompt: bool, truncated_responses: int,
                 retokenized: int) -> None:
    self.read += 1
    self.used += 1
    self.truncated_prompts += int(truncated_prompt)
    self.truncated_responses += truncated_responses
    self.boundary_retokenized += retokenized
    self.prompt_lengths.append(prompt_len)
    self.response_lengths.extend(response_lens)
    self.paired_tokens += len(response_lens) * prompt_len + sum(response_lens)
    self.prefix_shared_tokens += prompt_len + sum(response_lens)

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def check(self) -> None:
    """The invariant every summary keeps."""
    assert self.read == self.used + self.num_skipped, self.to_dict()

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready numbers (lengths as median / p95, not lists)."""
    def pct(values: list[int], q: float) -> float:
      return float(np.percentile(values, q)) if values else 0.0
    return {
        'split': self.split, 'files': self.files, 'format': self.format,
        'read': self.read, 'used': self.used, 'skipped': self.num_skipped,
        'skipped_by_reason': {r: self.skipped[r] for r in REASONS if r in self.skipped},
        'skipped_examples': {r: self.skipped_where[r] for r in REASONS
                             if r in self.skipped_where},
        'truncated_prompts': self.truncated_prompts,
        'truncated_responses': self.truncated_responses,
        'boundary_retokenized': self.boundary_retokenized,
        'prompt_tokens_median': pct(self.prompt_lengths, 50),
        'prompt_tokens_p95': pct(self.prompt_lengths, 95),
        'response_tokens_median': pct(self.response_lengths, 50),
        'response_tokens_p95': pct(self.response_lengths, 95),
        'paired_tokens': self.paired_tokens,
        'prefix_shared_tokens': self.prefix_shared_tokens,
    }

  def format_lines(self) -> list[str]:
    """Human-readable lines for a log."""
    d = self.to_dict()
    lines = [f"data[{self.split}]: {d['read']} read = {d['used']} used + "
             f"{d['skipped']} skipped; format {self.format}; files {', '.join(self.files)}"]
    for reason, count in d['skipped_by_reason'].items():
      where = ', '.join(d['skipped_examples'].get(reason, []))
      lines.append(f'  skipped {count:>6} {reason} ({REASONS[reason]}), e.g. {where}')
    lines.append(
        f"  tokens: prompt median {d['prompt_tokens_median']:.0f} p95 "
        f"{d['prompt_tokens_p95']:.0f}; response median {d['response_tokens_median']:.0f} "
        f"p95 {d['response_tokens_p95']:.0f}; truncated prompts {self.truncated_prompts}, "
        f'responses {self.truncated_responses}; boundary re-tokenised {self.boundary_retokenized}')
    return lines

  def __str__(self) -> str:
    return '\n'.join(self.format_lines())

  def to_json(self) -> str:
    return json.dumps(self.to_dict())
