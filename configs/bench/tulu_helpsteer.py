"""Benchmark: tulu_helpsteer-like synthetic examples, CPU default model.

python -m prefix_dpo.benchmark --config configs/bench/tulu_helpsteer.py --out runs/bench/tulu_helpsteer
"""
from prefix_dpo.benchmark.config import base_config


def get_config():
  c = base_config()
  c.workloads = ('tulu_helpsteer',)
  return c
