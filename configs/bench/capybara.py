"""Benchmark: capybara-like synthetic examples, CPU default model.

python -m prefix_dpo.benchmark --config configs/bench/capybara.py --out runs/bench/capybara
"""
from prefix_dpo.benchmark.config import base_config


def get_config():
  c = base_config()
  c.workloads = ('capybara',)
  return c
