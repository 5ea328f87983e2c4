"""Benchmark: real examples read from a data file through the data pipeline.

Defaults to the bundled data set (byte tokenizer); point it elsewhere with
--config.data.train_files=PATH (and --config.data.tokenizer=HF_DIR).

python -m prefix_dpo.benchmark --config configs/bench/file.py --out runs/bench/file
"""
from prefix_dpo.benchmark.config import base_config


def get_config():
  c = base_config()
  c.workloads = ('file',)
  return c
