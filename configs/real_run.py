"""Shared settings of the real-model configs (not a config itself).

Hardware presets, chosen with ``configs/<name>.py:<preset>``:
  gpu8  -- one node of 8 x H100/H200 (80-141 GB): FSDP over the 8 GPUs.
  v5p64 -- a TPU v5p-64 slice (32 chips, 4 hosts): FSDP 16 x data 2.
  cpu   -- a smoke test of the wiring on a host (tiny batch, few steps).
"""
from prefix_dpo.config import base_config

PRESETS = {
    # mesh, global rows per micro-batch, example slots, gradient accumulation
    'gpu8': dict(mesh=dict(data=1, fsdp=8, tensor=1), rows=16, max_examples=64, accum=4),
    'v5p64': dict(mesh=dict(data=2, fsdp=16, tensor=1), rows=64, max_examples=256, accum=1),
    'cpu': dict(mesh=dict(data=-1, fsdp=1, tensor=1), rows=1, max_examples=4, accum=1),
}


def real_config(preset: str, *, seq_len: int, data_format: str):
  if preset not in PRESETS:
    raise ValueError(f'unknown preset {preset!r}; expected one of {sorted(PRESETS)}')
  p = PRESETS[preset]
  c = base_config()
  # Required override: a local Hugging Face directory (weights + tokenizer).
  c.model.hf_path = ''
  c.model.update(dtype='bfloat16', param_dtype='float32', remat=True, vocab_multiple=128,
                 attention_impl='xla' if preset == 'cpu' else 'pallas')
  c.data.update(train_files='', eval_files='', eval_fraction=0.01, format=data_format,
                max_length=seq_len, max_prompt_length=seq_len // 2, num_workers=4)
  c.seq_len = seq_len
  c.mesh.update(p['mesh'])
  c.batch.update(rows=p['rows'], max_examples=p['max_examples'])
  c.optimizer.update(learning_rate=5e-7, warmup_steps=50, schedule='cosine',
                     weight_decay=0.0, grad_clip=1.0, grad_accum_steps=p['accum'])
  c.loss.update(type='sigmoid', beta=0.1)
  c.reference.mode = 'model'
  c.train.update(steps=1000, log_every=10, eval_every=200, eval_batches=50,
                 checkpoint_every=200, keep_checkpoints=2, logprob_chunk=2048)
  c.distributed.enabled = preset == 'v5p64'
  if preset == 'cpu':
    c.train.update(steps=2, eval_every=0, eval_batches=1, checkpoint_every=0)
  return c
