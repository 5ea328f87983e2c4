"""End-to-end trainer tests (subprocesses: device counts, processes, kill -9)."""
import os
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from prefix_dpo import checkpoint
from tests.train_helpers import (deterministic, env, read_metrics, run_training,
                                 small_data, train_command, ROOT)


def params_of(workdir):
  model, _ = checkpoint.load_policy(workdir)
  from flax import nnx
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


def assert_close_trees(a, b, **tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, **tol)


def test_sharded_meshes_train_like_one_device(tmp_path):
  batch = ('--config.batch.rows=8', '--config.batch.max_examples=8')
  base = str(tmp_path / 'one')
  run_training(base, *batch, steps=3)
  expected = read_metrics(base)
  for mesh in (('2', '2', '2'), ('8', '1', '1'), ('1', '4', '2')):
    workdir = str(tmp_path / ('mesh' + ''.join(mesh)))
    run_training(workdir, *batch, f'--config.mesh.data={mesh[0]}', f'--config.mesh.fsdp={mesh[1]}',
                 f'--config.mesh.tensor={mesh[2]}', steps=3, devices=8)
    got = read_metrics(workdir)
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
      for key in ('loss', 'eval/loss'):
        if key in e:
          assert g[key] == pytest.approx(e[key], abs=2e-5)
    # Adam divides by sqrt(v): reduction-order noise in a near-zero gradient
    # entry can move that parameter by up to a step (the lr, 2e-3), but only
    # in a few entries; a sharding bug moves whole tensors.
    for x, y in zip(jax.tree.leaves(params_of(workdir)), jax.tree.leaves(params_of(base))):
      off = np.abs(x - y)
      assert off.max() < 2e-3 and np.mean(off > 1e-5) < 1e-3, (off.max(), np.mean(off > 1e-5))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
  # In file order and one example per row, process i reads records i::2 and
  # the two processes' batches together hold exactly the examples of the
  # single process's batch (in other rows: the loss is the same).
  # 13 eval records: process 0 has one batch more than process 1, which must
  # then feed an empty batch to the collective eval step.
  eval_file = str(tmp_path / 'eval13.jsonl')
  with open(small_data()[1], encoding='utf-8') as f, open(eval_file, 'w', encoding='utf-8') as g:
    g.writelines(f.readlines()[:13])
  in_order = ('--config.data.shuffle=False', '--config.pack=False',
              '--config.batch.max_examples=4', f'--config.data.eval_files={eval_file}',
              '--config.train.eval_batches=0')
  single = str(tmp_path / 'single')
  run_training(single, *in_order, steps=2)
  port = _free_port()
  procs = []
  for i in range(2):
    workdir = str(tmp_path / 'multi')
    cmd = train_command(workdir, *in_order, steps=2) + [
        '--config.distributed.enabled=True',
        f'--config.distributed.coordinator_address=127.0.0.1:{port}',
        '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}']
    procs.append(subprocess.Popen(cmd, env=env(1), cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  expected, got = read_metrics(single), read_metrics(str(tmp_path / 'multi'))
  assert len(got) == len(expected) and 'eval/loss' in expected[-1]
  for e, g in zip(expected, got):
    for key in ('loss', 'eval/loss'):
      if key in e:
        assert g[key] == pytest.approx(e[key], abs=2e-5)


def test_resume_after_kill_matches_uninterrupted(tmp_path):
  straight = str(tmp_path / 'straight')
  args = ('--config.train.checkpoint_every=3',)
  run_training(straight, *args, steps=12)
  killed = str(tmp_path / 'killed')
  proc = subprocess.Popen(train_command(killed, *args, steps=12), env=env(1), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = os.path.join(killed, 'checkpoints', '3')
  deadline = time.time() + 300
  while not os.path.isdir(ckpt) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not os.path.isdir(os.path.join(killed, 'checkpoints', '12'))
  run_training(killed, *args, steps=12)
  assert deterministic(read_metrics(killed)) == deterministic(read_metrics(straight))
  assert_close_trees(params_of(killed), params_of(straight), rtol=0, atol=0)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / 'term')
  proc = subprocess.Popen(train_command(workdir, steps=10_000), env=env(1), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  metrics = os.path.join(workdir, 'metrics.jsonl')
  while (not os.path.exists(metrics) or os.path.getsize(metrics) == 0) and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  assert 'saved checkpoint' in err
  steps = [int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit()]
  assert steps and max(steps) < 10_000


def test_precomputed_reference_equals_reference_model(tmp_path):
  model_dir, pre_dir = str(tmp_path / 'model'), str(tmp_path / 'pre')
  run_training(model_dir, '--config.reference.mode=model', steps=3)
  run_training(pre_dir, '--config.reference.mode=precomputed', steps=3)
  for split in ('train', 'eval'):
    assert os.path.exists(os.path.join(pre_dir, 'reference_logps', f'{split}_process_0.npz'))
  a, b = read_metrics(model_dir), read_metrics(pre_dir)
  assert len(a) == len(b) == 4  # 3 steps + the final evaluation
  for x, y in zip(a, b):
    for key in ('loss', 'eval/loss', 'rewards/margins'):
      if key in x:
        assert y[key] == pytest.approx(x[key], abs=1e-5), key


@pytest.mark.parametrize('override, message', [
    ('--config.optimizer.learnin_rate=1', 'learnin_rate'),
    ('--config.layout=shared', "layout='shared'"),
    ('--config.seq_len=abc', 'seq_len'),
    ('--config.data.train_files=/nonexistent/x.jsonl', '/nonexistent/x.jsonl'),
])
def test_bad_config_fails_fast_and_writes_nothing(tmp_path, override, message):
  workdir = str(tmp_path / 'bad')
  result = run_training(workdir, override, check=False)
  assert result.returncode != 0
  assert message in result.stderr
  assert not os.path.exists(workdir)
