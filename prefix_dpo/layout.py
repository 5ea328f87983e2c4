"""Row layouts: how preference examples become fixed-shape token rows.

Two layouts of the same examples:

* ``paired`` -- the baseline of standard trainers: one sequence per
  (prompt, response), so the prompt is laid out (and computed) N times.
* ``prefix_shared`` -- one sequence per example, ``[prompt | r1 | r2 | ...]``.
  Response positions restart at the end of the prompt, so every response sees
  the RoPE positions of its standalone row, and the mask rule
  (:mod:`prefix_dpo.masks`) hides the other responses. The first token of
  every response is scored from the logits of the last prompt token: no token
  is duplicated.

Sequences are placed whole into rows of ``seq_len`` (first fit in order, or
where a packer says) and rows are padded with segment 0. All functions here are pure numpy.

Log-prob bookkeeping is aligned with the tokens: for every response token at
row index ``j``, ``logit_index[j]`` is the row index whose logits predict it
and ``target_slot[j]`` the response slot it counts towards (``-1`` for
non-response tokens). Slot ``e * num_responses + k`` holds response ``k`` of
example ``e``.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

LAYOUTS = ('paired', 'prefix_shared')

# Keys of a batch built here; every value is a numpy array.
ROW_KEYS = ('input_ids', 'positions', 'segment_ids', 'branch_ids',
            'logit_index', 'target_slot')


@dataclasses.dataclass(frozen=True)
class Example:
  """A prompt and its N >= 1 responses, as token ids.

  For DPO, ``responses[0]`` is the chosen and ``responses[1]`` the rejected
  response; ranked data lists responses best first.
  """
  prompt: Sequence[int]
  responses: Sequence[Sequence[int]]


@dataclasses.dataclass(frozen=True)
class _Sequence:
  """One contiguous run of tokens in a row: a prompt and some responses."""
  example: int
  prompt: np.ndarray
  responses: tuple[tuple[int, np.ndarray], ...]  # (response index, tokens)

  @property
  def length(self) -> int:
    return len(self.prompt) + sum(len(r) for _, r in self.responses)


def _as_tokens(tokens: Sequence[int], what: str) -> np.ndarray:
  array = np.asarray(tokens)
  if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
    raise ValueError(f'{what}: expected a 1-D sequence of int token ids, '
                     f'got shape {array.shape} dtype {array.dtype}')
  return array.astype(np.int32)


def validate(example: Example, index: int) -> tuple[np.ndarray, list[np.ndarray]]:
  """Checks an example and returns its prompt and responses as int32 arrays."""
  prompt = _as_tokens(example.prompt, f'example {index}: prompt')
  if prompt.size == 0:
    raise ValueError(f'example {index}: empty prompt (the first response token '
                     'is predicted from the last prompt token; add a BOS token)')
  if len(example.responses) == 0:
    raise ValueError(f'example {index}: has no responses')
  responses = []
  for k, response in enumerate(example.responses):
    tokens = _as_tokens(response, f'example {index}: response {k}')
    if tokens.size == 0:
      raise ValueError(f'example {index}: response {k} is empty')
    responses.append(tokens)
  return prompt, responses


def sequences(example: Example, index: int, layout: str) -> list[_Sequence]:
  """The sequences that ``layout`` makes of one example."""
  prompt, responses = validate(example, index)
  if layout == 'paired':
    return [_Sequence(index, prompt, ((k, r),)) for k, r in enumerate(responses)]
  if layout == 'prefix_shared':
    return [_Sequence(index, prompt, tuple(enumerate(responses)))]
  raise ValueError(f'unknown layout {layout!r}; expected one of {LAYOUTS}')


def sequence_lengths(example: Example, layout: str, index: int = 0) -> list[int]:
  """Token counts of the sequences ``layout`` makes of ``example``."""
  return [s.length for s in sequences(example, index, layout)]


def build_batch(examples: Sequence[Example], *, layout: str, seq_len: int,
                num_rows: int | None = None, max_examples: int | None = None,
                num_responses: int | None = None, pack: bool = True,
                placement: Sequence[int] | None = None) -> dict[str, np.ndarray]:
  """Lays out ``examples`` into rows of ``seq_len`` tokens.

  Args:
    examples: the examples, in slot order.
    layout: ``'paired'`` or ``'prefix_shared'``.
    seq_len: tokens per row.
    num_rows: fixed number of rows (for static shapes); ``None`` = as many as
      first-fit placement needs.
    max_examples: fixed number of example slots (static shapes with packing);
      ``None`` = ``len(examples)``. Unused slots are masked out.
    num_responses: responses per example slot; ``None`` = the largest N.
    pack: place several sequences per row; ``False`` = one sequence per
      row, as unpacked trainers do.
    placement: the row of every sequence, in sequence order (examples in
      order; a ``paired`` example's sequences in response order), as a packer
      chose it; ``None`` = :func:`first_fit` in that order. Within a row,
      sequences are written in sequence order.
  Returns:
    ``input_ids``, ``positions``, ``segment_ids``, ``branch_ids``,
    ``logit_index``, ``target_slot``: ``[rows, seq_len]`` int32;
    ``response_mask``: ``[examples, num_responses]`` bool;
    ``response_row``, ``response_end``: ``[examples * num_responses]`` int32,
    row and row index of each response's last token (0 for empty slots).
  Raises:
    ValueError naming the example, for empty prompts or responses, sequences
    longer than ``seq_len``, too many responses, examples or rows.
  """
  if seq_len <= 0:
    raise ValueError(f'seq_len must be positive, got {seq_len}')
  num_examples = len(examples) if max_examples is None else max_examples
  if len(examples) > num_examples:
    raise ValueError(f'{len(examples)} examples exceed max_examples={num_examples}')
  seqs = [s for i, ex in enumerate(examples) for s in sequences(ex, i, layout)]
  most = max((len(ex.responses) for ex in examples), default=1)
  n = most if num_responses is None else num_responses
  for i, ex in enumerate(examples):
    if len(ex.responses) > n:
      raise ValueError(f'example {i}: has {len(ex.responses)} responses, '
                       f'more than num_responses={n}')

  for seq in seqs:
    if seq.length > seq_len:
      raise ValueError(f'example {seq.example}: sequence of {seq.length} tokens '
                       f'does not fit in seq_len={seq_len}')
  if placement is None:
    rows_of = _first_fit_all(seqs, seq_len, num_rows, pack)
  else:
    rows_of = _check_placement(seqs, placement, seq_len, num_rows, pack)
  rows = max(rows_of, default=-1) + 1 if num_rows is None else num_rows
  batch = {key: np.zeros((rows, seq_len), np.int32) for key in ROW_KEYS}
  batch['target_slot'][:] = -1
  batch['response_mask'] = np.zeros((num_examples, n), bool)
  batch['response_row'] = np.zeros((num_examples * n,), np.int32)
  batch['response_end'] = np.zeros((num_examples * n,), np.int32)
  fill = np.zeros((rows,), np.int64)
  next_segment = np.ones((rows,), np.int32)
  for seq, row in zip(seqs, rows_of):
    start = int(fill[row])
    _write(batch, seq, row, start, int(next_segment[row]), n)
    fill[row] += seq.length
    next_segment[row] += 1
  return batch


def first_fit(lengths: Sequence[int], free: list[int], *, seq_len: int,
              num_rows: int | None, pack: bool = True) -> list[int] | None:
  """Rows for sequences of ``lengths`` placed together: each in the first row with room.

  ``free`` is the room left in each opened row; a sequence that fits in none
  opens a new row (``pack=False``: always). Updates ``free`` in place and
  returns the rows, or returns None and leaves ``free`` as it was when the
  sequences need more than ``num_rows`` rows.
  """
  trial = list(free)
  rows = []
  for length in lengths:
    row = next((r for r, room in enumerate(trial) if room >= length), None) if pack else None
    if row is None:
      if num_rows is not None and len(trial) >= num_rows:
        return None
      trial.append(seq_len)
      row = len(trial) - 1
    trial[row] -= length
    rows.append(row)
  free[:] = trial
  return rows


def _first_fit_all(seqs: list[_Sequence], seq_len: int, num_rows: int | None,
                   pack: bool) -> list[int]:
  """Row of every sequence by :func:`first_fit`, in order."""
  free: list[int] = []
  placement = []
  for seq in seqs:
    rows = first_fit([seq.length], free, seq_len=seq_len, num_rows=num_rows, pack=pack)
    if rows is None:
      raise ValueError(f'example {seq.example}: does not fit in {num_rows} '
                       f'rows of {seq_len} tokens')
    placement += rows
  return placement


def _check_placement(seqs: list[_Sequence], placement: Sequence[int], seq_len: int,
                     num_rows: int | None, pack: bool) -> list[int]:
  """``placement`` as a list, after checking that every row holds its sequences."""
  rows_of = [int(r) for r in placement]
  if len(rows_of) != len(seqs):
    raise ValueError(f'placement has {len(rows_of)} rows for {len(seqs)} sequences')
  used: dict[int, int] = {}
  for seq, row in zip(seqs, rows_of):
    if row < 0 or (num_rows is not None and row >= num_rows):
      raise ValueError(f'example {seq.example}: placed in row {row}, outside '
                       f'{num_rows} rows')
    used[row] = used.get(row, 0) + (seq.length if pack else seq_len)
    if used[row] > seq_len:
      raise ValueError(f'example {seq.example}: row {row} overflows seq_len={seq_len}'
                       + ('' if pack else ' (pack=False: one sequence per row)'))
  return rows_of


def _write(batch: dict[str, np.ndarray], seq: _Sequence, row: int, start: int,
           segment: int, n: int) -> None:
  """Writes one sequence into ``batch`` at ``row[start:]``."""
  p = len(seq.prompt)
  end = start + p
  batch['input_ids'][row, start:end] = seq.prompt
  batch['positions'][row, start:end] = np.arange(p)
  batch['segment_ids'][row, start:end] = segment
  last_prompt = end - 1
  for k, tokens in seq.responses:
    length = len(tokens)
    span = slice(end, end + length)
    slot = seq.example * n + k
    batch['input_ids'][row, span] = tokens
    batch['positions'][row, span] = np.arange(p, p + length)
    batch['segment_ids'][row, span] = segment
    batch['branch_ids'][row, span] = k + 1
    batch['target_slot'][row, span] = slot
    batch['logit_index'][row, span] = np.arange(end - 1, end + length - 1)
    batch['logit_index'][row, end] = last_prompt
    batch['response_mask'][seq.example, k] = True
    batch['response_row'][slot] = row
    batch['response_end'][slot] = end + length - 1
    end += length


def count_tokens(batch: dict[str, np.ndarray]) -> int:
  """Real (non-padding) tokens in a batch."""
  return int((batch['segment_ids'] > 0).sum())


def offset_slots(batch: dict[str, np.ndarray], *, row_offset: int,
                 example_offset: int) -> dict[str, np.ndarray]:
  """Renumbers a process's local batch into the global batch's rows and slots.

  Each process lays out its own rows; once they are concatenated across
  processes, row and slot indices must point into the global arrays.
  """
  n = batch['response_mask'].shape[1]
  out = dict(batch)
  out['target_slot'] = np.where(batch['target_slot'] >= 0,
                                batch['target_slot'] + example_offset * n, -1).astype(np.int32)
  out['response_row'] = (batch['response_row'] + row_offset).astype(np.int32)
  return out
