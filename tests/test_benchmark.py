"""The benchmark end to end on tiny workloads (seconds), so it cannot rot."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from prefix_dpo import attention, layout
from prefix_dpo.benchmark import config as config_lib, plan as plan_lib, run as run_lib
from prefix_dpo.benchmark import workloads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(*names):
  c = config_lib.base_config()
  c.workloads = names
  c.model.update(vocab_size=128, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                 head_dim=16, mlp_dim=64)
  c.length_scale = 0.1
  c.tokens_per_step = 160
  c.steps, c.warmup = 2, 1
  c.data.max_length = 256
  c.file_seq_len = 512
  return c


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('bench'))
  return run_lib.run(tiny_config('capybara'), out, log=lambda _: None), out


def test_results_structure(results):
  res, out = results
  with open(os.path.join(out, 'results.json'), encoding='utf-8') as f:
    saved = json.load(f)
  assert set(saved['workloads']) == {'capybara'}
  for w in saved['workloads'].values():
    assert set(w['modes']) == set(config_lib.MODES)
    for m in w['modes'].values():
      for key in ('pairs_per_sec', 'real_tokens_per_sec', 'padded_tokens_per_step',
                  'peak_memory_bytes', 'compile_seconds', 'step_seconds_median'):
        assert m[key] > 0, key
      assert len(m['step_seconds']) == 2
    assert set(w['speedup']) == {'unpacked', 'packed'}
  assert saved['workloads']['capybara']['speedup']['unpacked']['paper'] == 1.42
  assert res['summary'] == saved['summary']
  assert os.path.getsize(os.path.join(out, 'chart.png')) > 1000
  assert '| capybara | unpacked |' in open(os.path.join(out, 'table.md'), encoding='utf-8').read()


def test_ideal_speedup_and_logprobs(results):
  res, _ = results
  for w in res['workloads'].values():
    for s in w['speedup'].values():
      assert s['ideal'] > 1
      assert s['achieved'] > 0
    assert w['logprob_max_diff'] <= 1e-5
    assert w['logprob_max_abs_diff'] <= 1e-3


def _random_rows(seed, *, layout_name, pack, seq_len):
  rng = np.random.default_rng(seed)
  examples = [layout.Example(prompt=rng.integers(1, 50, rng.integers(1, 40)).tolist(),
                             responses=[rng.integers(1, 50, rng.integers(1, 30)).tolist()
                                        for _ in range(rng.integers(2, 4))])
              for _ in range(6)]
  return layout.build_batch(examples, layout=layout_name, seq_len=seq_len, pack=pack)


@pytest.mark.parametrize('layout_name,pack,seq_len,budget', [
    ('prefix_shared', True, 200, 'exact'),   # packed, 2-3 responses, seq % block != 0
    ('paired', False, 96, 'exact'),
    ('prefix_shared', False, 128, 'causal'),  # default budget: every lower tile
])
def test_blocked_attention_equals_dense(layout_name, pack, seq_len, budget):
  import jax
  import jax.numpy as jnp
  batch = _random_rows(0, layout_name=layout_name, pack=pack, seq_len=seq_len)
  seg, br = jnp.asarray(batch['segment_ids']), jnp.asarray(batch['branch_ids'])
  rows, seq = seg.shape
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  q = jax.random.normal(keys[0], (rows, seq, 4, 8))
  k, v = (jax.random.normal(key, (rows, seq, 2, 8)) for key in keys[1:])
  tiles = attention.count_tiles(batch['segment_ids'], batch['branch_ids'], 32)
  max_tiles = {'exact': tiles, 'causal': None, 'short': tiles - 1}[budget]

  def loss(fn):
    return lambda q, k, v: (fn(q, k, v) * jnp.cos(q)).sum()

  dense = jax.jit(lambda q, k, v: attention.xla_attention(q, k, v, seg, br, sm_scale=0.3))
  blocked = jax.jit(lambda q, k, v: attention.blocked_attention(
      q, k, v, seg, br, sm_scale=0.3, block=32, max_tiles=max_tiles))
  np.testing.assert_allclose(blocked(q, k, v), dense(q, k, v), atol=2e-6)
  grads = [jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(q, k, v) for f in (dense, blocked)]
  for want, got in zip(*grads):
    np.testing.assert_allclose(got, want, atol=2e-5)
  # Padding queries give zeros, as in the dense reference.
  assert not np.asarray(blocked(q, k, v))[np.asarray(seg) == 0].any()


def test_blocked_attention_over_budget_is_nan():
  import jax.numpy as jnp
  batch = _random_rows(0, layout_name='prefix_shared', pack=True, seq_len=200)
  seg, br = jnp.asarray(batch['segment_ids']), jnp.asarray(batch['branch_ids'])
  tiles = attention.count_tiles(batch['segment_ids'], batch['branch_ids'], 32)
  q = jnp.ones(seg.shape + (2, 8))
  for budget, nan in ((tiles, False), (tiles - 1, True)):
    out = attention.blocked_attention(q, q, q, seg, br, sm_scale=1.0, block=32,
                                      max_tiles=budget)
    assert bool(jnp.isnan(out).all()) == nan


def test_tile_budget_reaches_the_model():
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from prefix_dpo import logprobs, model
  batch = _random_rows(2, layout_name='prefix_shared', pack=True, seq_len=160)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  logps = {}
  for impl in ('xla', 'xla_blocked'):
    cfg = model.ModelConfig(attention_impl=impl)
    decoder = model.Decoder(cfg, rngs=nnx.Rngs(0))
    with attention.tile_budget(attention.count_tiles(batch['segment_ids'], batch['branch_ids'])):
      logps[impl] = jax.jit(lambda m, b: logprobs.model_logprobs(m, b)[0])(decoder, batch)
  np.testing.assert_allclose(logps['xla_blocked'], logps['xla'], atol=1e-4)


def test_file_workload_reads_the_bundled_data_through_the_pipeline():
  c = tiny_config('file')
  examples, vocab = run_lib.workload_examples(c, 'file', 5, c.model.vocab_size)
  assert len(examples) == 5 and vocab > 256
  for e in examples:
    assert len(e.responses) == 2 and len(e.prompt) + max(map(len, e.responses)) <= 256


def test_synthetic_lengths_match_the_paper():
  for name in workloads.NAMES:
    stats = workloads.length_stats(workloads.synthetic_examples(name, 400, length_scale=0.5))
    row = workloads.PAPER[name]
    assert stats['median_len'] == pytest.approx(row.median_len * 0.5, rel=0.02)
    assert stats['prefix_ratio'] == pytest.approx(row.prefix_ratio, rel=0.05)


def test_plans_share_examples_and_fix_shapes():
  c = tiny_config('capybara')
  cfg = config_lib.model_config(c)
  examples = workloads.synthetic_examples('capybara', 12, length_scale=0.1, vocab_size=128)
  plans = plan_lib.make_plans([examples[:6], examples[6:]], config_lib.MODES, cfg)
  for plan in plans.values():
    assert {b['input_ids'].shape for b in plan.batches} == {(plan.rows, plan.seq_len)}
    assert plan.max_targets >= max((b['target_slot'] >= 0).sum() for b in plan.batches)
    assert plan.max_tiles >= max(attention.count_tiles(b['segment_ids'], b['branch_ids'])
                                 for b in plan.batches)
  # The same examples in every mode: the same response lengths per slot.
  lengths = {m: [np.bincount(b['target_slot'][b['target_slot'] >= 0], minlength=12)
                 for b in p.batches] for m, p in plans.items()}
  for m in config_lib.MODES:
    np.testing.assert_array_equal(lengths[m], lengths['paired'])
  assert plans['prefix_shared_packed'].rows < plans['prefix_shared'].rows
  assert plan_lib.count_rows([5, 4, 3, 3], 8) == 2


def test_cli_prints_a_json_summary_last(tmp_path):
  out = tmp_path / 'out'
  tiny = ['--config.model.vocab_size=128', '--config.model.hidden_size=32',
          '--config.model.num_layers=1', '--config.model.num_heads=2',
          '--config.model.num_kv_heads=1', '--config.model.head_dim=16',
          '--config.model.mlp_dim=64', '--config.length_scale=0.1',
          '--config.tokens_per_step=160', '--config.steps=2', '--config.chart=False',
          '--config.check_logprobs=False', '--config.modes=paired',
          '--config.modes=prefix_shared']
  result = subprocess.run([sys.executable, '-m', 'prefix_dpo.benchmark', '--config',
                           os.path.join(ROOT, 'configs/bench/hh_rlhf.py'), '--out', str(out),
                           *tiny], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary['workloads']['hh_rlhf']['unpacked']['ideal'] > 1
  assert json.loads((out / 'results.json').read_text())['summary'] == summary


@pytest.mark.parametrize('args, message', [
    (['--config', 'configs/bench/hh_rlhf.py', '--config.nope=1'],
     'error: bad flag or config override: nope'),
    (['--config', 'configs/bench/missing.py'], "No such file or directory: 'configs/bench/missing.py'"),
])
def test_cli_bad_config_is_one_line(tmp_path, args, message):
  result = subprocess.run([sys.executable, '-m', 'prefix_dpo.benchmark', *args,
                           '--out', str(tmp_path / 'out')], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 2
  assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
  assert not (tmp_path / 'out').exists()
