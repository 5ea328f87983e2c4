"""Qwen2.5-7B-Instruct, DPO on UltraFeedback-binarized (short prompts, long responses).

python -m prefix_dpo.train --config configs/qwen2_5_7b_ultrafeedback.py:gpu8 --workdir runs/qwen_uf \
  --config.model.hf_path=/models/Qwen2.5-7B-Instruct \
  --config.data.train_files=/data/ultrafeedback_binarized/train_prefs-*.parquet
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from real_run import real_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(preset: str = 'gpu8'):
  return real_config(preset, seq_len=2048, data_format='ultrafeedback')
