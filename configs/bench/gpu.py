"""Benchmark on one GPU: full-length Capybara- and UltraFeedback-like examples,
a ~0.9B-parameter Llama (bfloat16 compute, float32 master weights, per-layer
rematerialisation as the paper's gradient checkpointing) and the Pallas
block-sparse attention kernel. A few minutes on one H100/H200, most of it
compiling; --config.check_logprobs=False skips the log-prob check's compiles.

scripts/gpu_benchmark.sh [OUT_DIR]   (or:)
python -m prefix_dpo.benchmark --config configs/bench/gpu.py --out runs/bench/gpu
"""
from prefix_dpo.benchmark.config import base_config


def get_config():
  c = base_config()
  c.workloads = ('capybara', 'ultrafeedback')
  c.length_scale = 1.0  # the paper's lengths
  c.tokens_per_step = 8192
  c.model.update(vocab_size=32000, hidden_size=2048, num_layers=12, num_heads=16,
                 num_kv_heads=8, head_dim=128, mlp_dim=8192, rope_theta=500_000.0,
                 dtype='bfloat16', param_dtype='float32', attention_impl='pallas',
                 remat=True)
  c.seq_multiple = 128  # whole kernel blocks
  c.logprob_chunk = 2048
  c.steps, c.warmup = 3, 1
  return c
