"""Benchmark: metamath-like synthetic examples, CPU default model.

python -m prefix_dpo.benchmark --config configs/bench/metamath.py --out runs/bench/metamath
"""
from prefix_dpo.benchmark.config import base_config


def get_config():
  c = base_config()
  c.workloads = ('metamath',)
  return c
