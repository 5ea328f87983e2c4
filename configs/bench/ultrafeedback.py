"""Benchmark: ultrafeedback-like synthetic examples, CPU default model.

python -m prefix_dpo.benchmark --config configs/bench/ultrafeedback.py --out runs/bench/ultrafeedback
"""
from prefix_dpo.benchmark.config import base_config


def get_config():
  c = base_config()
  c.workloads = ('ultrafeedback',)
  return c
