"""Export a trained policy as a Hugging Face model directory.

``python -m prefix_dpo.export --workdir DIR --out HF_DIR`` reads the latest
checkpoint of a training workdir (:func:`prefix_dpo.checkpoint.load_policy`)
and writes ``config.json``, safetensors and tokenizer files
(:func:`prefix_dpo.hf_export.export_hf`) that ``transformers`` loads and vLLM
serves. The source Hugging Face directory (token ids, generation config,
tokenizer) defaults to the run's ``model.hf_path``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from prefix_dpo import hf_export


def _get(config: Any, dotted: str) -> Any:
  """``config.a.b`` or None, for configs saved before a key existed."""
  for part in dotted.split('.'):
    try:
      config = config[part]
    except (KeyError, TypeError, AttributeError):
      return None
  return config


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m prefix_dpo.export', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdir', required=True, help='training workdir with checkpoints/')
  p.add_argument('--out', required=True, help='output Hugging Face directory')
  p.add_argument('--step', type=int, default=None, help='checkpoint step (default: latest)')
  p.add_argument('--hf_source', default=None,
                 help='Hugging Face dir the run started from (default: model.hf_path)')
  p.add_argument('--tokenizer', default=None,
                 help='dir whose tokenizer files are copied (default: the source, '
                      'else data.tokenizer when it is a directory)')
  p.add_argument('--dtype', default='bfloat16', choices=hf_export.EXPORT_DTYPES)
  p.add_argument('--architecture', default=None,
                 help='e.g. MistralForCausalLM (default: the source\'s, else inferred)')
  p.add_argument('--max_shard_gb', type=float, default=5.0,
                 help='split the weights into files of at most this size')
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  from prefix_dpo import checkpoint  # pylint: disable=g-import-not-at-top
  model, config = checkpoint.load_policy(args.workdir, args.step)
  source = args.hf_source or _get(config, 'model.hf_path') or None
  tokenizer = args.tokenizer or source
  if tokenizer is None:
    data_tokenizer = _get(config, 'data.tokenizer')
    tokenizer = data_tokenizer if data_tokenizer and os.path.isdir(data_tokenizer) else None
  out = hf_export.export_hf(model, args.out, tokenizer_dir=tokenizer, source_dir=source,
                            dtype=args.dtype, architecture=args.architecture,
                            max_shard_bytes=int(args.max_shard_gb * 2**30))
  print(json.dumps({'out': out, 'files': sorted(os.listdir(out)), 'source': source,
                    'tokenizer': tokenizer, 'dtype': args.dtype}))
  return 0


if __name__ == '__main__':
  sys.exit(main())
