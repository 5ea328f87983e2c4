"""Llama-3.1-8B-Instruct, DPO on Capybara-DPO (multi-turn, prompts ~1.6x responses).

python -m prefix_dpo.train --config configs/llama3_8b_capybara.py:gpu8 --workdir runs/llama3_capybara \
  --config.model.hf_path=/models/Llama-3.1-8B-Instruct --config.data.train_files=/data/capybara/*.parquet
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from real_run import real_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(preset: str = 'gpu8'):
  return real_config(preset, seq_len=4096, data_format='capybara')
