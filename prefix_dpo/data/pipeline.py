"""The data pipeline: files -> packed, sharded, resumable batches (grain).

::

  RecordSource (all records of the split's files, record ids 0..n-1)
    -> [shard_index::shard_count]          each process its own records
    -> shuffle(seed) per epoch (train)     grain reseeds every epoch
    -> repeat(num_epochs)                  None = for ever
    -> Preparer: parse, tokenize, truncate, fit   (in workers with num_workers)
    -> PackedBatchIterDataset              bounded-buffer packing + layout.build_batch

Every batch is a dict of numpy arrays with static shapes: the keys of
``layout.build_batch(..., num_rows=rows, max_examples=max_examples,
num_responses=num_responses, pack=pack)`` plus ``example_id``
``[max_examples]`` int64 (the record id, stable across epochs and processes;
-1 for an empty slot). The pipeline is deterministic for a seed, and its
state (``get_state``/``set_state``, JSON) restores exactly the batches that
would have followed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import grain
from absl import flags
import ml_collections
import numpy as np

from prefix_dpo import layout as layout_lib
from prefix_dpo.data import config as config_lib
from prefix_dpo.data import formats, packing, readers, tokenizers
from prefix_dpo.data.accounting import DataError, Summary
from prefix_dpo.data.examples import Prepared, Preparer, tally

make_tokenizer = tokenizers.make_tokenizer
SPLITS = ('train', 'eval')
_HOLDOUT_SEED = 20240917  # fixed: the held-out records do not move with the run's seed
STATE_VERSION = 1


class _Subset(Sequence[readers.RawRecord]):
  """Some records of a source, by position (record ids unchanged)."""

  def __init__(self, source: Sequence[readers.RawRecord], positions: np.ndarray):
    self.source, self.positions = source, positions

  def __len__(self) -> int:
    return len(self.positions)

  def __getitem__(self, i: int) -> readers.RawRecord:  # type: ignore[override]
    return self.source[int(self.positions[i])]


@dataclasses.dataclass
class Split:
  """One split's records, their format and files."""
  name: str
  records: Sequence[readers.RawRecord]
  format: str
  files: list[str]


def open_split(data_cfg: ml_collections.ConfigDict, split: str) -> Split:
  """Reads the split's files and resolves the format (``DataError`` on a bad input)."""
  config_lib.validate(data_cfg)
  if split not in SPLITS:
    raise ValueError(f'split={split!r}; expected one of {SPLITS}')
  held_out = split == 'eval' and not data_cfg.eval_files
  if held_out and not data_cfg.eval_fraction:
    raise DataError('no eval data: set data.eval_files, or data.eval_fraction to hold '
                    'out part of data.train_files')
  what = 'train_files' if split == 'train' or held_out else 'eval_files'
  paths = readers.resolve_paths(data_cfg[what], what)
  source = readers.RecordSource(paths, file_format=data_cfg.file_format,
                                hf_split=data_cfg.hf_split)
  samples = source.first_values()
  if data_cfg.format == 'auto' and not samples:
    raise DataError(f'{paths[0]}: no readable record to tell the format from; set data.format')
  fmt = formats.resolve_format(data_cfg.format, samples, data_cfg.fields)
  records: Sequence[readers.RawRecord] = source
  if not data_cfg.eval_files and data_cfg.eval_fraction:
    order = np.random.default_rng(_HOLDOUT_SEED).permutation(len(source))
    is_eval = np.zeros(len(source), bool)
    is_eval[order[:int(round(data_cfg.eval_fraction * len(source)))]] = True
    records = _Subset(source, np.flatnonzero(is_eval if split == 'eval' else ~is_eval))
  return Split(split, records, fmt, paths)


class _PrepareWithIndex:
  """grain map_with_index: ``(index, record) -> (index, Prepared)``."""

  def __init__(self, preparer: Preparer):
    self.preparer = preparer

  def __call__(self, index: int, record: readers.RawRecord) -> tuple[int, Prepared]:
    return index, self.preparer(record)


class BatchIterator(Iterator[dict[str, np.ndarray]]):
  """Batches of one split; ``get_state``/``set_state`` for checkpoints.

  ``counters`` gives batches, examples and real tokens emitted so far and
  records skipped; ``capacity_tokens`` is ``rows * seq_len`` per batch.
  """

  def __init__(self, dataset: packing.PackedBatchIterDataset, fingerprint: dict[str, Any],
               split: Split):
    self.split = split
    self.fingerprint = fingerprint
    self.capacity_tokens = fingerprint['rows'] * fingerprint['seq_len']
    self._packed = dataset
    self._it = iter(dataset)

  def __iter__(self) -> 'BatchIterator':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable state: restores exactly the batches that follow."""
    return {'version': STATE_VERSION, 'fingerprint': self.fingerprint,
            'grain': _plain(self._it.get_state())}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get('version') != STATE_VERSION:
      raise ValueError(f'data state version {state.get("version")}; expected {STATE_VERSION}')
    theirs = state['fingerprint']
    diff = {k: (theirs.get(k), v) for k, v in self.fingerprint.items() if theirs.get(k) != v}
    if diff:
      raise ValueError(f'data state was saved by a different pipeline: (saved, now) {diff}')
    self._it.set_state(state['grain'])

  @property
  def counters(self) -> dict[str, int]:
    return self._it.counters

  def close(self) -> None:
    close = getattr(self._it, 'close', None)
    if close is not None:
      close()


def _plain(value: Any) -> Any:
  """numpy scalars -> Python numbers, tuples -> lists (JSON)."""
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return value


def make_batch_iterator(data_cfg: ml_collections.ConfigDict, *, split: str, tokenizer,
                        layout: str, seq_len: int, rows: int, max_examples: int,
                        num_responses: int, pack: bool, seed: int,
                        num_epochs: int | None, shard_index: int = 0,
                        shard_count: int = 1) -> BatchIterator:
  """Batches of ``split`` for one process.

  Args:
    data_cfg: ``config.data`` (:func:`prefix_dpo.data.config.default_data_config`).
    split: ``'train'`` (shuffled per epoch when ``data.shuffle``) or ``'eval'``
      (file order).
    tokenizer: from :func:`make_tokenizer`.
    layout, seq_len, num_responses, pack: as :func:`prefix_dpo.layout.build_batch`.
    rows: rows per batch, this process's share (``[rows, seq_len]`` arrays).
    max_examples: example slots per batch, this process's share. With packing a
      batch holds as many whole examples as fit in ``rows * seq_len`` tokens,
      up to ``max_examples``; with ``pack=False`` it holds
      ``min(max_examples, rows // s)`` examples, ``s`` = sequences per example
      (1 for ``prefix_shared``, the example's N responses for ``paired``).
    seed: shuffling seed (per epoch: grain uses ``seed + epoch``).
    num_epochs: passes over the data; ``None`` = for ever. With 1, iteration
      ends after one pass (the last batch partly filled).
    shard_index, shard_count: this process's share of the records (pass
      ``jax.process_index()``, ``jax.process_count()``): records
      ``shard_index::shard_count``, before shuffling.
  Returns:
    A :class:`BatchIterator` of dicts: ``input_ids``, ``positions``,
    ``segment_ids``, ``branch_ids``, ``logit_index``, ``target_slot``
    ``[rows, seq_len]`` int32; ``response_mask`` ``[max_examples,
    num_responses]`` bool; ``response_row``, ``response_end``
    ``[max_examples * num_responses]`` int32; ``example_id``
    ``[max_examples]`` int64.
  Raises:
    DataError: one line, for a missing file, unknown format, field mismatch,
      an empty shard, or (``data.strict``) the first bad record.
  """
  if layout not in layout_lib.LAYOUTS:
    raise ValueError(f'layout={layout!r}; expected one of {layout_lib.LAYOUTS}')
  if min(seq_len, rows, max_examples, num_responses) < 1:
    raise ValueError(f'seq_len={seq_len}, rows={rows}, max_examples={max_examples}, '
                     f'num_responses={num_responses} must all be >= 1')
  if layout == 'paired' and not pack and rows < num_responses:
    raise ValueError(f'paired without packing needs rows >= num_responses '
                     f'({rows} < {num_responses}): one row per response')
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index={shard_index} not in [0, shard_count={shard_count})')
  data = open_split(data_cfg, split)
  records = grain.MapDataset.source(data.records)[shard_index::shard_count]
  if len(records) == 0:
    raise DataError(f'data[{split}]: shard {shard_index} of {shard_count} has no records '
                    f'({len(data.records)} in {", ".join(data.files)})')
  ds = records
  if split == 'train' and data_cfg.shuffle:
    ds = ds.shuffle(seed=seed % 2**32)
  ds = ds.repeat(num_epochs)
  preparer = Preparer(data_cfg, data.format, tokenizer, layout=layout, seq_len=seq_len,
                      num_responses=num_responses)
  ds = ds.map_with_index(_PrepareWithIndex(preparer))
  # Records are in memory: reading threads would only contend for the GIL.
  stream = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if data_cfg.num_workers:
    # grain's worker processes read absl flags; outside an absl.app (tests,
    # notebooks, prefix_dpo.stats) they would be unparsed: use the defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_cfg.num_workers, per_worker_buffer_size=data_cfg.worker_buffer_size))
  packed = packing.PackedBatchIterDataset(
      stream, ds.__getitem__, layout=layout, seq_len=seq_len, rows=rows,
      max_examples=max_examples, num_responses=num_responses, pack=pack,
      buffer_size=data_cfg.pack_buffer, epoch_length=len(records))
  fingerprint = dict(split=split, files=data.files, records=len(data.records),
                     format=data.format, layout=layout, seq_len=seq_len, rows=rows,
                     max_examples=max_examples, num_responses=num_responses, pack=pack,
                     seed=seed, num_epochs=num_epochs, shard_index=shard_index,
                     shard_count=shard_count, shuffle=bool(data_cfg.shuffle),
                     pack_buffer=data_cfg.pack_buffer, tokenizer=repr(tokenizer))
  return BatchIterator(packed, fingerprint, data)


def load_summary(data_cfg: ml_collections.ConfigDict, *, split: str, tokenizer,
                 layout: str = 'prefix_shared', seq_len: int = 0,
                 num_responses: int = 0) -> Summary:
  """Reads every record of ``split`` once through the batch pipeline's steps.

  ``seq_len`` (0 = none) and ``num_responses`` (0 = any) apply the same
  checks as the batches do. Raises ``DataError`` as :func:`make_batch_iterator`.
  """
  data = open_split(data_cfg, split)
  preparer = Preparer(data_cfg, data.format, tokenizer, layout=layout, seq_len=seq_len,
                      num_responses=num_responses)
  summary = Summary(split=split, files=data.files, format=data.format,
                    max_listed=data_cfg.max_listed)
  for record in data.records:
    tally(summary, preparer(record))
  summary.check()
  return summary
