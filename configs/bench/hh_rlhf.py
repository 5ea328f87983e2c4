"""Benchmark: hh_rlhf-like synthetic examples, CPU default model.

python -m prefix_dpo.benchmark --config configs/bench/hh_rlhf.py --out runs/bench/hh_rlhf
"""
from prefix_dpo.benchmark.config import base_config


def get_config():
  c = base_config()
  c.workloads = ('hh_rlhf',)
  return c
