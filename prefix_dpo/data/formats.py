"""Formats: a raw record -> a :class:`Preference` (prompt and ranked responses).

Formats (``data.format``; field names come from ``data.fields``):

* ``standard`` (TRL): ``prompt``, ``chosen``, ``rejected`` strings.
* ``conversational`` (TRL): the same keys holding message lists
  (``[{role, content}, ...]``); ``chosen``/``rejected`` are the completion
  messages only.
* ``implicit``: only ``chosen`` and ``rejected``, full transcripts sharing a
  prefix. Text (Anthropic HH-RLHF, ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``):
  the prompt is the shared prefix cut back to just after the last
  ``data.assistant_marker``; with ``data.hh_as_messages`` the transcript is
  turned into messages first (so a chat template applies). Message lists: the
  prompt is the messages the two share.
* ``ultrafeedback`` / ``capybara``: full conversations in ``chosen`` and
  ``rejected`` (``prompt``, if present, is not needed): the last assistant
  message is the response and the rest is the prompt, which must be the same
  in both.
* ``ranked``: ``prompt`` plus ``responses`` (N >= 2) with ``scores`` (higher
  is better) or ``ranking`` (rank of each response, lower is better);
  responses are reordered best first. A tie for best is skipped.
* ``auto``: picked from the first records' fields and types.

A prompt is a string or a tuple of messages; a response is a string or the
tuple of messages that follows the prompt. When one side is text and the other
messages, the text becomes a user (prompt) or assistant (response) message.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import ml_collections

from prefix_dpo.data.accounting import DataError, Skip

FORMATS = ('auto', 'standard', 'conversational', 'implicit', 'ultrafeedback',
           'capybara', 'ranked')

Message = dict  # {'role': str, 'content': str}
Text = str | tuple  # a string or a tuple of messages


@dataclasses.dataclass(frozen=True)
class Preference:
  """A prompt and its responses, best first (``responses[0]`` is chosen)."""
  prompt: Text
  responses: tuple[Text, ...]


def required_fields(fmt: str, fields: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Fields a record of ``fmt`` must have (scores/ranking: one of them)."""
  return {
      'standard': (fields.prompt, fields.chosen, fields.rejected),
      'conversational': (fields.prompt, fields.chosen, fields.rejected),
      'implicit': (fields.chosen, fields.rejected),
      'ultrafeedback': (fields.chosen, fields.rejected),
      'capybara': (fields.chosen, fields.rejected),
      'ranked': (fields.prompt, fields.responses),
  }[fmt]


def detect(record: dict, fields: ml_collections.ConfigDict) -> str | None:
  """The format a record looks like, or None."""
  has = lambda name: record.get(name) is not None
  if has(fields.responses) and has(fields.prompt):
    return 'ranked'
  if not (has(fields.chosen) and has(fields.rejected)):
    return None
  chosen, prompt = record[fields.chosen], record.get(fields.prompt)
  if prompt is None:
    return 'implicit'
  if isinstance(prompt, list):
    return 'conversational'
  if isinstance(chosen, list):
    return 'ultrafeedback'
  return 'standard'


def resolve_format(fmt: str, samples: Sequence[tuple[str, Any]],
                   fields: ml_collections.ConfigDict) -> str:
  """Checks ``fmt`` against the first records of each file; picks it for ``auto``.

  Raises:
    DataError (one line naming the file and the fields found) for an unknown
    format, records of no known format, or a file whose first records all
    lack a field the format needs.
  """
  if fmt not in FORMATS:
    raise DataError(f'unknown data.format={fmt!r}; expected one of {FORMATS}')
  by_file: dict[str, list[dict]] = {}
  for path, record in samples:
    by_file.setdefault(path, []).append(record)
  for path, records in by_file.items():
    found = sorted({k for r in records for k in r})
    if fmt == 'auto':
      kinds = [detect(r, fields) for r in records]
      known = [k for k in kinds if k is not None]
      if not known:
        raise DataError(
            f'{path}: records match no known format (fields found: {found}); '
            f'expected prompt/chosen/rejected, chosen/rejected, or prompt/responses '
            f'(rename with data.fields.*, or set data.format)')
      fmt = max(set(known), key=known.count)
    need = required_fields(fmt, fields)
    if not any(all(r.get(n) is not None for n in need) for r in records):
      extra = ' and scores or ranking' if fmt == 'ranked' else ''
      raise DataError(f'{path}: format {fmt!r} needs fields {list(need)}{extra}; '
                      f'found fields {found} (set data.fields.* to rename)')
  return 'ultrafeedback' if fmt == 'capybara' else fmt


def parse(record: Any, fmt: str, cfg: Any) -> Preference:
  """One raw record -> a Preference; raises :class:`Skip` for a bad record.

  ``cfg``: ``config.data`` or any object with its attributes (``fields``,
  ``hh_as_messages``, ``assistant_marker``).
  """
  if not isinstance(record, dict):
    raise Skip('not_a_record', type(record).__name__)
  fields = cfg.fields
  get = lambda name: _field(record, name)
  if fmt == 'standard':
    pref = Preference(_text(get(fields.prompt), 'prompt'),
                      (_text(get(fields.chosen), 'chosen'),
                       _text(get(fields.rejected), 'rejected')))
  elif fmt == 'conversational':
    pref = Preference(_messages(get(fields.prompt), fields, 'prompt'),
                      (_messages(get(fields.chosen), fields, 'chosen'),
                       _messages(get(fields.rejected), fields, 'rejected')))
  elif fmt == 'implicit':
    pref = _implicit(get(fields.chosen), get(fields.rejected), cfg)
  elif fmt in ('ultrafeedback', 'capybara'):
    pref = _full_conversations(record, cfg)
  elif fmt == 'ranked':
    pref = _ranked(record, cfg)
  else:
    raise DataError(f'unknown data.format={fmt!r}; expected one of {FORMATS}')
  return _check(_harmonise(pref))


def _field(record: dict, name: str) -> Any:
  value = record.get(name)
  if value is None:
    raise Skip('missing_field', name)
  return value


def _text(value: Any, what: str) -> str:
  if not isinstance(value, str):
    raise Skip('not_a_string', f'{what} is {type(value).__name__}')
  return value


def _messages(value: Any, fields: Any, what: str) -> tuple:
  """A list of ``{role, content}`` dicts -> a tuple of plain messages."""
  if isinstance(value, dict):
    value = [value]
  if not isinstance(value, list):
    raise Skip('not_a_string', f'{what} is {type(value).__name__}, not a message list')
  if not value:
    raise Skip('bad_messages', f'{what} is an empty message list')
  out = []
  for i, message in enumerate(value):
    if not isinstance(message, dict):
      raise Skip('bad_messages', f'{what}[{i}] is {type(message).__name__}')
    role, content = message.get(fields.role), message.get(fields.content)
    if role is None or content is None:
      raise Skip('missing_field', f'{what}[{i}] needs {fields.role!r} and {fields.content!r}')
    if not isinstance(role, str) or not isinstance(content, str):
      raise Skip('not_a_string', f'{what}[{i}] role/content is not a string')
    out.append({'role': role, 'content': content})
  return tuple(out)


def _text_or_messages(value: Any, fields, what: str) -> Text:
  return value if isinstance(value, str) else _messages(value, fields, what)


def _implicit(chosen: Any, rejected: Any, cfg) -> Preference:
  if isinstance(chosen, str) and isinstance(rejected, str):
    if cfg.hh_as_messages:
      return _implicit_messages(hh_to_messages(chosen), hh_to_messages(rejected))
    return _implicit_text(chosen, rejected, cfg.assistant_marker)
  if isinstance(chosen, str) or isinstance(rejected, str):
    raise Skip('not_a_string', 'chosen and rejected mix text and messages')
  return _implicit_messages(_messages(chosen, cfg.fields, 'chosen'),
                            _messages(rejected, cfg.fields, 'rejected'))


def _implicit_messages(chosen: tuple, rejected: tuple) -> Preference:
  shared = 0
  while (shared < min(len(chosen), len(rejected))
         and chosen[shared] == rejected[shared]):
    shared += 1
  if chosen == rejected:
    raise Skip('identical_responses')
  if shared == 0:
    raise Skip('no_shared_prompt', 'the first messages differ')
  return Preference(chosen[:shared], (chosen[shared:], rejected[shared:]))


def _implicit_text(chosen: str, rejected: str, marker: str) -> Preference:
  if chosen == rejected:
    raise Skip('identical_responses')
  shared = 0
  limit = min(len(chosen), len(rejected))
  while shared < limit and chosen[shared] == rejected[shared]:
    shared += 1
  # Cut back to the end of the last assistant marker inside the shared part:
  # responses often share their first words, which belong to the responses.
  cut = chosen.rfind(marker, 0, shared) if marker else -1
  if cut < 0:
    raise Skip('no_shared_prompt', f'no {marker!r} in the shared prefix')
  end = cut + len(marker)
  return Preference(chosen[:end], (chosen[end:], rejected[end:]))


_HH_TURN = re.compile(r'\n\n(Human|Assistant):')


def hh_to_messages(transcript: str) -> tuple:
  """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``({user: a}, {assistant: b})``."""
  parts = _HH_TURN.split(transcript)
  if len(parts) < 3 or parts[0].strip():
    raise Skip('bad_messages', 'not a "\\n\\nHuman: ... \\n\\nAssistant: ..." transcript')
  roles = {'Human': 'user', 'Assistant': 'assistant'}
  return tuple({'role': roles[speaker], 'content': text.strip()}
               for speaker, text in zip(parts[1::2], parts[2::2]))


def _full_conversations(record: dict, cfg) -> Preference:
  fields = cfg.fields
  chosen = _messages(_field(record, fields.chosen), fields, 'chosen')
  rejected = _messages(_field(record, fields.rejected), fields, 'rejected')
  if chosen[-1]['role'] != 'assistant' or rejected[-1]['role'] != 'assistant':
    raise Skip('bad_messages', 'the last message is not an assistant message')
  prompt = chosen[:-1]
  if prompt != rejected[:-1]:
    raise Skip('prompt_mismatch', 'chosen and rejected differ before their last message')
  if not prompt:
    # Completion-only lists (some UltraFeedback copies): the prompt field is the user turn.
    prompt = ({'role': 'user', 'content': _text(_field(record, fields.prompt), 'prompt')},)
  return Preference(prompt, (chosen[-1:], rejected[-1:]))


def _ranked(record: dict, cfg) -> Preference:
  fields = cfg.fields
  prompt = _text_or_messages(_field(record, fields.prompt), fields, 'prompt')
  raw = _field(record, fields.responses)
  if not isinstance(raw, list):
    raise Skip('not_a_string', f'{fields.responses} is {type(raw).__name__}, not a list')
  if len(raw) < 2:
    raise Skip('too_few_responses', f'{len(raw)} responses')
  responses = [_text_or_messages(r, fields, f'responses[{i}]') for i, r in enumerate(raw)]
  scores, ranking = record.get(fields.scores), record.get(fields.ranking)
  if scores is not None:
    keys = _numbers(scores, len(responses), fields.scores)
    keys = [-s for s in keys]  # higher score first
  elif ranking is not None:
    keys = _numbers(ranking, len(responses), fields.ranking)
  else:
    raise Skip('bad_scores', f'needs {fields.scores!r} or {fields.ranking!r}')
  order = sorted(range(len(responses)), key=lambda i: keys[i])  # stable
  if keys[order[0]] == keys[order[1]]:
    raise Skip('bad_scores', 'the best response is tied')
  return Preference(prompt, tuple(responses[i] for i in order))


def _numbers(values: Any, count: int, name: str) -> list[float]:
  if (not isinstance(values, list) or len(values) != count
      or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
    raise Skip('bad_scores', f'{name} must be {count} numbers')
  return [float(v) for v in values]


def _harmonise(pref: Preference) -> Preference:
  """Text next to messages becomes a message (user prompt, assistant response)."""
  any_messages = (not isinstance(pref.prompt, str)
                  or any(not isinstance(r, str) for r in pref.responses))
  if not any_messages:
    return pref
  prompt = pref.prompt
  if isinstance(prompt, str):
    prompt = ({'role': 'user', 'content': prompt},)
  responses = tuple(({'role': 'assistant', 'content': r},) if isinstance(r, str) else r
                    for r in pref.responses)
  return Preference(prompt, responses)


def _is_empty(text: Text) -> bool:
  if isinstance(text, str):
    return not text
  return not text or all(not m['content'] for m in text)


def _check(pref: Preference) -> Preference:
  if _is_empty(pref.prompt):
    raise Skip('empty_prompt')
  for k, response in enumerate(pref.responses):
    if _is_empty(response):
      raise Skip('empty_response', f'response {k}')
  if pref.responses[0] in pref.responses[1:]:
    raise Skip('identical_responses')
  return pref
