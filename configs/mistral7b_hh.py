"""Mistral-7B, DPO on Anthropic HH-RLHF (implicit prompts in text transcripts).

python -m prefix_dpo.train --config configs/mistral7b_hh.py:gpu8 --workdir runs/mistral_hh \
  --config.model.hf_path=/models/Mistral-7B-v0.1 --config.data.train_files=/data/hh-rlhf/train.jsonl
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from real_run import real_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(preset: str = 'gpu8'):
  c = real_config(preset, seq_len=1024, data_format='implicit')
  c.batch.update(rows=c.batch.rows * 2, max_examples=c.batch.max_examples * 2)
  return c
