"""Benchmark: tldr-like synthetic examples, CPU default model.

python -m prefix_dpo.benchmark --config configs/bench/tldr.py --out runs/bench/tldr
"""
from prefix_dpo.benchmark.config import base_config


def get_config():
  c = base_config()
  c.workloads = ('tldr',)
  return c
