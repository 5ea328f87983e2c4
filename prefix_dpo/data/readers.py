"""Readers: local files -> a random-access sequence of raw records.

Supported inputs (``data.file_format``, ``auto`` picks by name):

* ``jsonl`` -- one JSON object per line; blank lines are ignored. A line that
  is not valid JSON or not UTF-8 is a record that will be skipped (counted),
  not an error: one bad line should not stop a long run.
* ``json`` -- one JSON list of objects.
* ``parquet`` -- read with pyarrow.
* ``hf_disk`` -- a directory written by Hugging Face ``datasets.save_to_disk``
  (with ``dataset_dict.json``, the split ``data.hf_split`` is read). Read with
  ``datasets.load_from_disk`` when ``datasets`` is installed, else straight
  from its Arrow files with pyarrow (same records).

Paths are comma-separated, may be globs, and ``bundled:NAME`` names a split of
the bundled default data set (``data/default/NAME.jsonl`` in the repository).
JSONL lines are kept as bytes and parsed on access, so a worker process parses
only its own records.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from pathlib import Path
from typing import Any, Sequence

from prefix_dpo.data.accounting import DataError, Skip

FILE_FORMATS = ('auto', 'jsonl', 'json', 'parquet', 'hf_disk')
BUNDLED_DIR = Path(__file__).resolve().parents[2] / 'data' / 'default'
_SUFFIXES = {'.jsonl': 'jsonl', '.ndjson': 'jsonl', '.json': 'json', '.parquet': 'parquet'}


@dataclasses.dataclass(frozen=True)
class RawRecord:
  """One record as read: ``value`` (a dict, normally) or the ``Skip`` it raises.

  ``record_id`` is its index over all files of the split (stable across runs,
  epochs and processes); ``where`` is ``file:number`` for messages.
  """
  record_id: int
  where: str
  value: Any = None
  error: Skip | None = None


def resolve_paths(spec: str, what: str) -> list[str]:
  """Comma-separated paths/globs/``bundled:NAME`` -> sorted existing paths."""
  paths: list[str] = []
  for part in (p.strip() for p in spec.split(',')):
    if not part:
      continue
    if part.startswith('bundled:'):
      part = str(BUNDLED_DIR / f"{part[len('bundled:'):]}.jsonl")
    matches = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
    if not matches or not all(os.path.exists(m) for m in matches):
      raise DataError(f'data.{what}: no such file or directory: {part!r}')
    paths.extend(matches)
  if not paths:
    raise DataError(f'data.{what} is empty: give a file, a glob or bundled:NAME')
  return paths


def file_format_of(path: str, file_format: str) -> str:
  """The reader for ``path``: ``file_format`` itself, or guessed from the name."""
  if file_format not in FILE_FORMATS:
    raise DataError(f'{path}: unknown data.file_format={file_format!r}; '
                    f'expected one of {FILE_FORMATS}')
  if file_format != 'auto':
    return file_format
  if os.path.isdir(path):
    return 'hf_disk'
  suffix = Path(path).suffix.lower()
  if suffix not in _SUFFIXES:
    raise DataError(f'{path}: cannot tell the file format from {suffix!r}; set '
                    f'data.file_format to one of {FILE_FORMATS[1:]}')
  return _SUFFIXES[suffix]


class RecordSource(Sequence[RawRecord]):
  """All records of a list of files, in file order (a grain data source)."""

  def __init__(self, paths: Sequence[str], *, file_format: str = 'auto',
               hf_split: str = 'train'):
    self.paths = list(paths)
    # Per file: (path, kind, items); kind 'lines' items are (line number, bytes).
    self._files: list[tuple[str, str, list]] = []
    self._offsets = [0]
    for path in self.paths:
      kind = file_format_of(path, file_format)
      if kind == 'jsonl':
        items = _jsonl_lines(path)
      elif kind == 'json':
        items = _json_records(path)
      elif kind == 'parquet':
        items = _parquet_records(path)
      else:
        items = _hf_disk_records(path, hf_split)
      self._files.append((path, kind, items))
      self._offsets.append(self._offsets[-1] + len(items))

  def __len__(self) -> int:
    return self._offsets[-1]

  def __getitem__(self, index: int) -> RawRecord:  # type: ignore[override]
    if not 0 <= index < len(self):
      raise IndexError(index)
    f = _bisect(self._offsets, index)
    path, kind, items = self._files[f]
    local = index - self._offsets[f]
    if kind == 'jsonl':
      number, line = items[local]
      where = f'{path}:{number}'
      try:
        return RawRecord(index, where, _parse_line(line))
      except Skip as skip:
        return RawRecord(index, where, error=skip)
    return RawRecord(index, f'{path}:{local + 1}', items[local])

  def first_values(self, count: int = 20) -> list[tuple[str, Any]]:
    """Up to ``count`` parseable values of each file, for format checks."""
    out = []
    for f, (path, _, items) in enumerate(self._files):
      seen = 0
      for index in range(self._offsets[f], self._offsets[f + 1]):
        record = self[index]
        if record.error is None and isinstance(record.value, dict):
          out.append((path, record.value))
          seen += 1
          if seen >= count:
            break
    return out

  def __repr__(self) -> str:
    return f'RecordSource({len(self)} records in {self.paths})'


def _bisect(offsets: list[int], index: int) -> int:
  lo, hi = 0, len(offsets) - 1
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if offsets[mid] <= index:
      lo = mid
    else:
      hi = mid
  return lo


def _parse_line(line: bytes) -> Any:
  try:
    text = line.decode('utf-8')
  except UnicodeDecodeError as e:
    raise Skip('undecodable_bytes', str(e)) from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise Skip('malformed_json', str(e)) from None


def _jsonl_lines(path: str) -> list[tuple[int, bytes]]:
  with open(path, 'rb') as f:
    return [(n, line) for n, line in enumerate(f, start=1) if line.strip()]


def _json_records(path: str) -> list[Any]:
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    value = json.loads(raw.decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f'{path}: not a valid JSON file ({e}); use .jsonl for one '
                    'record per line') from None
  if not isinstance(value, list):
    found = sorted(value) if isinstance(value, dict) else type(value).__name__
    raise DataError(f'{path}: expected a JSON list of records; found {found}')
  return value


def _parquet_records(path: str) -> list[Any]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    return pq.read_table(path).to_pylist()
  except Exception as e:  # pyarrow raises several types for a bad file
    raise DataError(f'{path}: not a readable Parquet file ({e})') from None


def _hf_disk_records(path: str, split: str) -> list[Any]:
  root = Path(path)
  if (root / 'dataset_dict.json').exists():
    splits = json.loads((root / 'dataset_dict.json').read_text())['splits']
    if split not in splits:
      raise DataError(f'{path}: no split {split!r} (data.hf_split); found {splits}')
    root = root / split
  if not (root / 'state.json').exists():
    raise DataError(f'{path}: not a datasets.save_to_disk directory (no state.json); '
                    f'found {sorted(p.name for p in Path(path).iterdir())}')
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    datasets = None
  if datasets is not None:
    return datasets.load_from_disk(str(root)).to_list()
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  state = json.loads((root / 'state.json').read_text())
  records: list[Any] = []
  for data_file in state['_data_files']:
    with pa.memory_map(str(root / data_file['filename'])) as source:
      records.extend(pa.ipc.open_stream(source).read_all().to_pylist())
  return records
