"""What prefix sharing will save on a data set, read through the training pipeline.

  python -m prefix_dpo.stats                         # the bundled data set
  python -m prefix_dpo.stats --config configs/tiny.py
  python -m prefix_dpo.stats --data prefs.jsonl --format standard --seq-len 2048

Prints the data summary (records read / used / skipped by reason, with a few
record locations), then, as the last line, one JSON object: the counts,
median and p95 prompt and response lengths, tokens for ``paired`` vs
``prefix_shared``, the ideal token-count speedup of prefix sharing
(``paired_tokens / prefix_shared_tokens``), and the packing efficiency (real
tokens / batch capacity, over one pass including the last, partly filled,
batches) of each layout at the given batch geometry.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from typing import Sequence

import ml_collections

from prefix_dpo.data import config as data_config
from prefix_dpo.data import pipeline
from prefix_dpo.data.accounting import DataError


def _load_config(path: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location('_stats_config', path)
  if spec is None or spec.loader is None:
    raise DataError(f'--config {path}: not a Python config file')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def packing_stats(data_cfg: ml_collections.ConfigDict, *, split: str, tokenizer, layout: str,
                  seq_len: int, rows: int, max_examples: int, num_responses: int,
                  pack: bool = True) -> dict:
  """One pass of ``split`` through the batch iterator: efficiency and speed."""
  it = pipeline.make_batch_iterator(
      data_cfg, split=split, tokenizer=tokenizer, layout=layout, seq_len=seq_len, rows=rows,
      max_examples=max_examples, num_responses=num_responses, pack=pack, seed=0,
      num_epochs=1)
  start = time.perf_counter()
  batches = sum(1 for _ in it)
  seconds = time.perf_counter() - start
  counters = it.counters
  it.close()
  capacity = max(batches, 1) * rows * seq_len
  return {
      'batches': batches,
      'tokens': counters['tokens'],
      'packing_efficiency': round(counters['tokens'] / capacity, 4),
      'examples_per_batch': round(counters['examples'] / max(batches, 1), 2),
      'examples_per_s': round(counters['examples'] / seconds, 1),
      'tokens_per_s': round(counters['tokens'] / seconds, 1),
  }


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', help='a training config file (uses its data, seq_len, batch)')
  parser.add_argument('--data', help='data files (comma-separated, globs); default: the config')
  parser.add_argument('--format', help='data.format (default auto)')
  parser.add_argument('--file-format', help='data.file_format (default auto)')
  parser.add_argument('--tokenizer', help="'byte' or a local Hugging Face tokenizer directory")
  parser.add_argument('--split', default='train', choices=pipeline.SPLITS)
  parser.add_argument('--seq-len', type=int)
  parser.add_argument('--rows', type=int)
  parser.add_argument('--max-examples', type=int)
  parser.add_argument('--num-responses', type=int)
  parser.add_argument('--max-length', type=int)
  parser.add_argument('--max-prompt-length', type=int)
  parser.add_argument('--strict', action='store_true')
  args = parser.parse_args(argv)

  if args.config:
    c = _load_config(args.config)
    data_cfg = c.data
    seq_len, rows, max_examples, num_responses = (
        c.seq_len, c.batch.rows, c.batch.max_examples, c.num_responses)
  else:
    data_cfg = data_config.default_data_config()
    seq_len, rows, max_examples, num_responses = 1024, 4, 16, 2
  seq_len = args.seq_len or seq_len
  rows = args.rows or rows
  max_examples = args.max_examples or max_examples
  num_responses = args.num_responses or num_responses
  if args.data:
    data_cfg.train_files, data_cfg.eval_files, data_cfg.eval_fraction = args.data, '', 0.0
  for flag, key in (('format', 'format'), ('file_format', 'file_format'),
                    ('tokenizer', 'tokenizer'), ('max_length', 'max_length'),
                    ('max_prompt_length', 'max_prompt_length')):
    if getattr(args, flag) is not None:
      data_cfg[key] = getattr(args, flag)
  if args.strict:
    data_cfg.strict = True

  try:
    tokenizer = pipeline.make_tokenizer(data_cfg)
    # The summary checks against the prefix_shared sequence, the longer one.
    summary = pipeline.load_summary(data_cfg, split=args.split, tokenizer=tokenizer,
                                    layout='prefix_shared', seq_len=seq_len,
                                    num_responses=num_responses)
    print(summary, flush=True)
    result = summary.to_dict()
    result.pop('skipped_examples')
    paired, shared = summary.paired_tokens, summary.prefix_shared_tokens
    result['ideal_speedup'] = round(paired / shared, 4) if shared else None
    result['geometry'] = dict(seq_len=seq_len, rows=rows, max_examples=max_examples,
                              num_responses=num_responses)
    if summary.used:
      for layout in ('prefix_shared', 'paired'):
        result[layout] = packing_stats(
            data_cfg, split=args.split, tokenizer=tokenizer, layout=layout, seq_len=seq_len,
            rows=rows, max_examples=max_examples, num_responses=num_responses)
  except DataError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(json.dumps(result))
  return 0


if __name__ == '__main__':
  sys.exit(main())
