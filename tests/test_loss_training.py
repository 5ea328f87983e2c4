"""Every loss trains through the trainer: a short run on bundled data lowers it.

Each run is ``train_and_evaluate`` in-process on the first records of the
bundled train split (the same few examples every step, so the loss curve is
a clean signal), with a one-layer variant of ``configs/tiny.py``. Compiling
dominates: about 10 s of CPU per loss.
"""
import importlib.util
import json
import os

import numpy as np
import pytest

from prefix_dpo import losses, train
from prefix_dpo.data import readers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12


def tiny_config():
  spec = importlib.util.spec_from_file_location('tiny', os.path.join(ROOT, 'configs/tiny.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture(scope='module')
def few_records(tmp_path_factory):
  path = tmp_path_factory.mktemp('data') / 'few.jsonl'
  with open(readers.BUNDLED_DIR / 'train.jsonl', encoding='utf-8') as f:
    path.write_text(''.join(next(f) for _ in range(4)), encoding='utf-8')
  return str(path)


@pytest.mark.parametrize('loss_type', losses.LOSSES)
def test_a_short_run_lowers_the_loss(loss_type, few_records, tmp_path):
  c = tiny_config()
  c.model.update(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                 mlp_dim=64)
  c.data.update(train_files=few_records, eval_files=few_records, max_length=96,
                max_prompt_length=64, shuffle=False)
  c.seq_len, c.batch.rows, c.batch.max_examples = 192, 4, 4
  c.optimizer.update(warmup_steps=0, schedule='constant')
  c.train.update(steps=STEPS, log_every=1, eval_every=0, checkpoint_every=0, eval_batches=1)
  c.logging.update(progress_bar=False, tensorboard=False)
  c.loss.type = loss_type
  if loss_type == 'simpo':
    c.loss.beta = 2.0  # SimPO's own range (2-2.5); at DPO's 0.1 it barely moves in 12 steps
  final = train.train_and_evaluate(c, str(tmp_path))

  with open(tmp_path / 'metrics.jsonl', encoding='utf-8') as f:
    records = [json.loads(line) for line in f if line.strip()]
  curve = [r['loss'] for r in records if 'loss' in r]
  assert len(curve) == STEPS and np.all(np.isfinite(curve))
  first, last = np.mean(curve[:3]), np.mean(curve[-3:])
  assert last < first - 0.02 * abs(first), (loss_type, curve)
  assert 0.0 <= final['eval/rewards/accuracies'] <= 1.0
