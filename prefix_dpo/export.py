"""Export a trained policy as a Hugging Face model directory.

``python -m prefix_dpo.export --workdir DIR --out HF_DIR`` reads the latest
checkpoint of a training workdir (:func:`prefix_dpo.checkpoint.load_policy`)
and writes ``config.json``, safetensors and tokenizer files
(:func:`prefix_dpo.hf_export.export_hf`) that ``transformers`` loads and vLLM
serves. The source Hugging Face directory (token ids, generation config,
tokenizer) defaults to the run's ``model.hf_path``.

A reward-model run (``loss.type=reward_model``) exports as the architecture's
``*ForSequenceClassification`` with one label; its ``pad_token_id`` is the one
the run's tokenizer padded with (or ``--pad_token_id``), never the EOS id that
ends every response (see :mod:`prefix_dpo.hf_export`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from prefix_dpo import hf_export
from prefix_dpo import reward_model
from prefix_dpo.data import tokenizers


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
                 help='e.g. MistralForCausalLM (default: the source\'s, else inferred); '
                      'a reward model exports as its *ForSequenceClassification')
  p.add_argument('--pad_token_id', type=int, default=None,
                 help='reward models: the padding id of config.json (default: the run '
                      'tokenizer\'s)')
  p.add_argument('--max_shard_gb', type=float, default=5.0,
                 help='split the weights into files of at most this size')
  return p.parse_args(argv)


def reward_model_pad_token_id(config: Any, tokenizer_dir: str | None,
                              override: int | None) -> int:
  """``override``, else the id the run's tokenizer padded with; never its EOS id.

  Text responses end with EOS, and Hugging Face's classifier scores the
  rightmost token that is not padding: with pad = EOS it would score the
  token before each response's EOS, not the one the value head was trained on.
  """
  tokenizer = (tokenizers.HFTokenizer(tokenizer_dir) if tokenizer_dir
               else tokenizers.make_tokenizer(config.data))
  pad = tokenizer.pad_id if override is None else override
  if pad == tokenizer.eos_id:
    raise ValueError(f'pad_token_id {pad} is the EOS id that ends every response (the '
                     'tokenizer has no pad token); pass --pad_token_id with an id no '
                     'response ends with')
  return pad


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    return export(args)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1


def export(args: argparse.Namespace) -> int:
  from prefix_dpo import checkpoint  # pylint: disable=g-import-not-at-top
  model, config = checkpoint.load_policy(args.workdir, args.step)
  source = args.hf_source or _get(config, 'model.hf_path') or None
  tokenizer = args.tokenizer or source
  if tokenizer is None:
    data_tokenizer = _get(config, 'data.tokenizer')
    tokenizer = data_tokenizer if data_tokenizer and os.path.isdir(data_tokenizer) else None
  pad_token_id = None
  if isinstance(model, reward_model.RewardModel):
    pad_token_id = reward_model_pad_token_id(config, tokenizer, args.pad_token_id)
  out = hf_export.export_hf(model, args.out, tokenizer_dir=tokenizer, source_dir=source,
                            dtype=args.dtype, architecture=args.architecture,
                            max_shard_bytes=int(args.max_shard_gb * 2**30),
                            pad_token_id=pad_token_id)
  print(json.dumps({'out': out, 'files': sorted(os.listdir(out)), 'source': source,
                    'tokenizer': tokenizer, 'dtype': args.dtype}))
  return 0


if __name__ == '__main__':
  sys.exit(main())
