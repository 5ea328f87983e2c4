"""Running the trainer in subprocesses for tests (fresh device counts, kill -9)."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small, fast variant of configs/tiny.py.
FAST = [
    '--config.model.hidden_size=32', '--config.model.num_layers=2',
    '--config.model.num_heads=4', '--config.model.num_kv_heads=2',
    '--config.model.head_dim=8', '--config.model.mlp_dim=64',
    '--config.batch.rows=4', '--config.batch.max_examples=8',
    '--config.train.log_every=1', '--config.train.eval_every=0',
    '--config.train.eval_batches=2', '--config.logging.progress_bar=False',
    '--config.optimizer.warmup_steps=0',
]


@functools.cache
def small_data() -> tuple[str, str]:
  """The first records of the bundled splits, so that passes over the data are short."""
  folder = tempfile.mkdtemp(prefix='prefix_dpo_small_data_')
  paths = []
  for split, count in (('train', 48), ('eval', 16)):
    with open(os.path.join(ROOT, 'data', 'default', f'{split}.jsonl'), encoding='utf-8') as f:
      lines = [next(f) for _ in range(count)]
    paths.append(os.path.join(folder, f'{split}.jsonl'))
    with open(paths[-1], 'w', encoding='utf-8') as f:
      f.writelines(lines)
  return paths[0], paths[1]


def train_command(workdir: str, *overrides: str, steps: int = 4) -> list[str]:
  train, eval_ = small_data()
  return [sys.executable, '-m', 'prefix_dpo.train', '--config', os.path.join(ROOT, 'configs/tiny.py'),
          '--workdir', workdir, f'--config.train.steps={steps}', *FAST,
          f'--config.data.train_files={train}', f'--config.data.eval_files={eval_}', *overrides]


def env(devices: int = 1) -> dict[str, str]:
  e = dict(os.environ)
  e['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  e['JAX_PLATFORMS'] = 'cpu'
  e['PYTHONPATH'] = ROOT + os.pathsep + e.get('PYTHONPATH', '')
  return e


def run_training(workdir: str, *overrides: str, steps: int = 4, devices: int = 1,
                 check: bool = True) -> subprocess.CompletedProcess:
  result = subprocess.run(train_command(workdir, *overrides, steps=steps), env=env(devices),
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
  if check and result.returncode:
    raise AssertionError(f'training failed ({result.returncode}):\n{result.stderr[-4000:]}')
  return result


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


TIMING_KEYS = {'step_time', 'tokens_per_sec', 'pairs_per_sec', 'model_tflops_per_sec', 'mfu'}


def deterministic(records: list[dict]) -> list[dict]:
  """Metrics without the wall-clock ones."""
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]
