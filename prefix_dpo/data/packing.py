"""Packing: prepared examples -> fixed-shape batches, with a bounded buffer.

A grain ``IterDataset`` transform. It keeps up to ``buffer_size`` prepared
examples and makes each batch of ``rows x seq_len`` tokens from them:

1. the oldest buffered example goes first (so no example waits for ever:
   every example leaves within about ``buffer_size`` batches);
2. the buffer's examples fill groups of N rows (N = sequences per example:
   1 for ``prefix_shared``, the responses for ``paired``), sequence ``k`` of
   each in the group's row ``k``: group after group, the subset that fills it
   best (an exact subset sum, :func:`_fill_rows`);
3. then the others, longest first, into the first rows with room (first fit
   decreasing: rows past the last whole group, and leftover room).

Up to ``max_examples``; an example is placed whole (all its sequences) or
stays in the buffer. The chosen examples and their rows go to
:func:`prefix_dpo.layout.build_batch` with ``num_rows``/``max_examples``/
``num_responses`` fixed, which writes the rows. With ``pack=False`` every
sequence gets its own row and examples are taken in arrival order:
``min(max_examples, rows // sequences per example)`` examples per batch.

Grain's ``FirstFitPackIterDataset``/``BestFitPackIterDataset`` (0.2.18) pack
per row and emit all their bins once one element does not fit; they cannot
bound the examples of a whole batch, keep an example's ``paired`` sequences in
one batch, or write the layout's per-row ``logit_index``/``target_slot``. So
this transform chooses the examples and the layout module writes the rows.

State (JSON): the parent iterator's state, the buffered examples' indices in
the (shuffled, repeated) map dataset -- they are re-read from it on restore --
and running counters.
"""
from __future__ import annotations

from typing import Any, Callable

import grain
import numpy as np

from prefix_dpo import layout as layout_lib
from prefix_dpo.data.accounting import DataError
from prefix_dpo.data.examples import Prepared


class PackedBatchIterDataset(grain.IterDataset):
  """``(index, Prepared)`` elements -> batch dicts (see the module docstring)."""

  def __init__(self, parent: grain.IterDataset, lookup: Callable[[int], tuple[int, Prepared]],
               *, layout: str, seq_len: int, rows: int, max_examples: int,
               num_responses: int, pack: bool, buffer_size: int, epoch_length: int):
    super().__init__(parent)
    self.lookup = lookup
    self.geometry = dict(layout=layout, seq_len=seq_len, rows=rows, max_examples=max_examples,
                         num_responses=num_responses, pack=pack)
    self.buffer_size = buffer_size if pack else max(1, max_examples)
    self.epoch_length = epoch_length

  def __iter__(self) -> '_PackedBatchIterator':
    return _PackedBatchIterator(self._parent.__iter__(), self)

  def __str__(self) -> str:
    return f'PackedBatchIterDataset({self.geometry})'


class _PackedBatchIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, ds: PackedBatchIterDataset):
    super().__init__(parent)
    self._ds = ds
    g = ds.geometry
    self._layout, self._seq_len, self._rows = g['layout'], g['seq_len'], g['rows']
    self._max_examples, self._num_responses, self._pack = (
        g['max_examples'], g['num_responses'], g['pack'])
    self._buffer: list[tuple[int, Prepared]] = []
    self._exhausted = False
    self._counters = dict(batches=0, examples=0, tokens=0, skipped=0)
    self._skips_in_a_row = 0

  # -- state ---------------------------------------------------------------
  def get_state(self) -> dict[str, Any]:
    return {'parent': self._parent.get_state(),
            'buffer': [index for index, _ in self._buffer],
            'exhausted': self._exhausted, 'counters': dict(self._counters)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._buffer = [self._ds.lookup(int(i)) for i in state['buffer']]
    self._exhausted = bool(state['exhausted'])
    self._counters = {k: int(v) for k, v in state['counters'].items()}
    self._skips_in_a_row = 0

  @property
  def counters(self) -> dict[str, int]:
    """Batches, examples and real tokens emitted, records skipped (seen so far)."""
    return dict(self._counters)

  # -- batches -------------------------------------------------------------
  def _fill(self) -> None:
    while not self._exhausted and len(self._buffer) < self._ds.buffer_size:
      try:
        index, prepared = next(self._parent)
      except StopIteration:
        self._exhausted = True
        break
      if prepared.example is None:
        self._counters['skipped'] += 1
        self._skips_in_a_row += 1
        if self._skips_in_a_row > self._ds.epoch_length:
          raise DataError('data: a whole epoch of records was skipped, none is usable; '
                          'see the data summary (python -m prefix_dpo.stats)')
        continue
      self._skips_in_a_row = 0
      self._buffer.append((int(index), prepared))

  def _choose(self) -> tuple[list[int], list[int]]:
    """Buffer positions of the next batch's examples, and the row of each of
    their sequences (in :func:`prefix_dpo.layout.build_batch`'s order)."""
    lengths = [p.lengths for _, p in self._buffer]
    free: list[int] = []  # room left in each opened row
    chosen: list[int] = []
    placement: list[int] = []
    if self._pack:
      chosen, placement, free = _fill_row_groups(lengths, self._seq_len, self._rows,
                                                 self._max_examples)
    # Then every example left, oldest (unpacked) or longest (packed) first,
    # in the first rows with room; one that does not fit stays in the buffer.
    taken = set(chosen)
    rest = [i for i in range(len(lengths)) if i not in taken]
    if self._pack:  # the oldest first still, when no group took it
      rest.sort(key=lambda i: (i != 0, -max(lengths[i])))
    shortest = min(min(ls) for ls in lengths)
    for i in rest:
      if len(chosen) == self._max_examples or (
          len(free) == self._rows and (not self._pack or max(free) < shortest)):
        break  # nothing else can go in
      rows = layout_lib.first_fit(lengths[i], free, seq_len=self._seq_len,
                                  num_rows=self._rows, pack=self._pack)
      if rows is not None:
        chosen.append(i)
        placement += rows
    return chosen, placement

  def __next__(self) -> dict[str, np.ndarray]:
    self._fill()
    if not self._buffer:
      raise StopIteration
    chosen, placement = self._choose()
    picked = [self._buffer[i] for i in chosen]
    keep = set(chosen)
    self._buffer = [b for i, b in enumerate(self._buffer) if i not in keep]
    batch = layout_lib.build_batch(
        [p.example for _, p in picked], layout=self._layout, seq_len=self._seq_len,
        num_rows=self._rows, max_examples=self._max_examples,
        num_responses=self._num_responses, pack=self._pack, placement=placement)
    example_id = np.full((self._max_examples,), -1, np.int64)
    example_id[:len(picked)] = [p.record_id for _, p in picked]
    batch['example_id'] = example_id
    self._counters['batches'] += 1
    self._counters['examples'] += len(picked)
    self._counters['tokens'] += layout_lib.count_tokens(batch)
    return batch


def _fill_row_groups(lengths: list[tuple[int, ...]], seq_len: int, rows: int,
                     max_examples: int) -> tuple[list[int], list[int], list[int]]:
  """Fills groups of ``g`` rows, ``g`` = the most sequences of an example.

  Sequence ``k`` of every example of a group goes to the group's row ``k``,
  so an example takes ``max(its lengths)`` tokens of each row of its group,
  and :func:`_fill_rows` fills a group's rows together (``prefix_shared``:
  ``g = 1``, rows one by one). A ``paired`` example's sequences differ only
  in their responses, so this wastes only their small length differences.
  Rows past the last whole group are left for the caller.

  Returns the chosen buffer positions, the row of each of their sequences and
  the room left in each row of the groups.
  """
  group = max(len(ls) for ls in lengths)
  size = [max(ls) for ls in lengths]
  chosen, placement = [], []
  free = [seq_len] * (rows // group * group)
  for g, members in enumerate(_fill_rows(size, seq_len, rows // group, max_examples)):
    for i in members:
      chosen.append(i)
      for k, length in enumerate(lengths[i]):
        placement.append(g * group + k)
        free[g * group + k] -= length
  return chosen, placement, free


def _fill_rows(lengths: list[int], seq_len: int, rows: int,
               max_examples: int) -> list[list[int]]:
  """Row by row, the subset of the buffer that fills the row best (exact).

  A cardinality-capped subset sum on bitsets (bit ``s`` of ``reach[k]``: some
  ``k`` examples sum to ``s`` tokens), about ``len(lengths) * cap`` big-int
  operations per row. The oldest example (position 0) is always in row 0; ties
  go to older examples. Each row holds at most ``ceil(examples left / rows
  left)`` examples, so ``max_examples`` spreads over the rows. Returns the
  buffer positions of each row's examples.
  """
  remaining = list(range(len(lengths)))
  filled: list[list[int]] = []
  budget = max_examples
  for r in range(rows):
    if budget <= 0 or not remaining:
      break
    cap = -(-budget // (rows - r))
    forced = remaining[:1] if r == 0 else []
    room = seq_len - sum(lengths[i] for i in forced)
    cap -= len(forced)
    candidates = [i for i in remaining[len(forced):] if lengths[i] <= room]
    window = (1 << (room + 1)) - 1
    reach = [1] + [0] * cap
    history = []
    for i in candidates:
      history.append(tuple(reach))
      for k in range(cap, 0, -1):
        reach[k] |= (reach[k - 1] << lengths[i]) & window
    best_sum, best_k = max(((bits.bit_length() - 1, -k) for k, bits in enumerate(reach) if bits))
    total, k = best_sum, -best_k
    picked = []
    for j in range(len(candidates) - 1, -1, -1):  # newest first: keep older ones when possible
      if k == 0:
        break
      if not (history[j][k] >> total) & 1:
        picked.append(candidates[j])
        total -= lengths[candidates[j]]
        k -= 1
    row = forced + picked[::-1]
    filled.append(row)
    budget -= len(row)
    taken = set(row)
    remaining = [i for i in remaining if i not in taken]
  return filled
