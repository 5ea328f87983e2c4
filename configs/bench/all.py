"""Benchmark: all six of the paper's data sets (synthetic), CPU default model.

python -m prefix_dpo.benchmark --config configs/bench/all.py --out runs/bench/all
"""
from prefix_dpo.benchmark.config import base_config
from prefix_dpo.benchmark.workloads import NAMES


def get_config():
  c = base_config()
  c.workloads = NAMES
  return c
