"""The batch pipeline: packing, shapes, determinism, epochs, sharding, resumable state."""
import json

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from prefix_dpo import layout as layout_lib
from prefix_dpo.data import config, packing, pipeline
from prefix_dpo.data.examples import Preparer
from prefix_dpo.data.tokenizers import ByteTokenizer
from tests.fixtures import data_records as fx

TOK = ByteTokenizer()


@pytest.fixture(scope='module')
def data_file(tmp_path_factory):
  return fx.write_jsonl(tmp_path_factory.mktemp('data') / 'conv.jsonl',
                        fx.conversations(60, prompt_words=25))


def data_cfg(path, **overrides):
  c = config.default_data_config()
  c.update(train_files=str(path), eval_files=str(path), pack_buffer=16, **overrides)
  return c


def batches(c, split='train', n=None, **kw):
  args = dict(split=split, tokenizer=TOK, layout='prefix_shared', seq_len=256, rows=3,
              max_examples=8, num_responses=2, pack=True, seed=0, num_epochs=1)
  args.update(kw)
  it = pipeline.make_batch_iterator(c, **args)
  out = [b for _, b in zip(range(n), it)] if n is not None else list(it)
  return it, out


def expected_examples(c, layout='prefix_shared', seq_len=256):
  split = pipeline.open_split(c, 'train')
  prep = Preparer(c, split.format, TOK, layout=layout, seq_len=seq_len, num_responses=2)
  return {p.record_id: p.example for p in map(prep, split.records) if p.example is not None}


def check_batch(batch, examples, layout, rows, seq_len, max_examples, n=2):
  """Every example is whole, alone in its segments, with its own positions."""
  assert batch['input_ids'].shape == (rows, seq_len)
  assert batch['response_mask'].shape == (max_examples, n)
  assert batch['example_id'].shape == (max_examples,) and batch['example_id'].dtype == np.int64
  owner = {}  # (row, segment) -> slot
  for slot, record_id in enumerate(batch['example_id']):
    if record_id < 0:
      assert not batch['response_mask'][slot].any()
      continue
    example = examples[int(record_id)]
    for k, response in enumerate(example.responses):
      s = slot * n + k
      row = batch['response_row'][s]
      (where,) = np.nonzero(batch['target_slot'][row] == s)
      assert batch['input_ids'][row, where].tolist() == list(response)
      segment = batch['segment_ids'][row, where[0]]
      assert owner.setdefault((int(row), int(segment)), slot) == slot  # never mixed
      in_segment = batch['segment_ids'][row] == segment
      prompt_at = np.nonzero(in_segment & (batch['branch_ids'][row] == 0))[0]
      assert batch['input_ids'][row, prompt_at].tolist() == list(example.prompt)
      p = len(example.prompt)
      assert batch['positions'][row, prompt_at].tolist() == list(range(p))
      assert batch['positions'][row, where].tolist() == list(range(p, p + len(response)))
      assert np.all(np.diff(np.nonzero(in_segment)[0]) == 1)  # contiguous: never split
      if layout == 'prefix_shared':
        assert in_segment.sum() == p + sum(len(r) for r in example.responses)


@pytest.mark.parametrize('layout', ['prefix_shared', 'paired'])
@pytest.mark.parametrize('pack', [True, False])
def test_every_example_once_whole_and_unmixed(data_file, layout, pack):
  c = data_cfg(data_file)
  examples = expected_examples(c, layout)
  rows = 3 if pack else 4
  _, out = batches(c, layout=layout, pack=pack, rows=rows)
  for b in out:
    check_batch(b, examples, layout, rows, 256, 8)
    if not pack:
      per_example = 1 if layout == 'prefix_shared' else 2
      assert (b['example_id'] >= 0).sum() <= rows // per_example
  ids = np.concatenate([b['example_id'] for b in out])
  assert sorted(ids[ids >= 0].tolist()) == sorted(examples)


@given(st.lists(st.lists(st.integers(2, 100), min_size=1, max_size=3), min_size=1,
                max_size=30), st.integers(1, 5), st.integers(1, 12))
@example([[2], [2], [2, 2], [2], [2, 2, 2]], 3, 4)  # ragged: fewer sequences than the group
def test_row_groups_take_the_oldest_and_never_overflow(lengths, rows, max_examples):
  seq_len, group = 100, max(len(ls) for ls in lengths)
  chosen, placement, free = packing._fill_row_groups(
      [tuple(ls) for ls in lengths], seq_len, rows, max_examples)
  assert len(set(chosen)) == len(chosen) <= max_examples
  assert (chosen[:1] == [0]) == (rows >= group)
  assert len(free) == rows // group * group and min(free, default=0) >= 0
  # Sequence k of each example in row k of its group; build_batch writes it.
  examples = [layout_lib.Example([1], [[2] * (n - 1) for n in lengths[i]]) for i in chosen]
  batch = layout_lib.build_batch(examples, layout='paired', seq_len=seq_len, num_rows=rows,
                                 max_examples=max_examples, num_responses=group,
                                 placement=placement)
  rows_of = iter(placement)
  for e, i in enumerate(chosen):
    for k in range(len(lengths[i])):
      row = next(rows_of)
      assert row % group == k and batch['response_row'][e * group + k] == row
  assert layout_lib.count_tokens(batch) == sum(seq_len - f for f in free)


def test_deterministic_and_shuffled_per_epoch(data_file):
  c = data_cfg(data_file)
  ids = lambda out: [i for b in out for i in b['example_id'] if i >= 0]
  _, a = batches(c, num_epochs=2)
  _, b = batches(c, num_epochs=2)
  _, other_seed = batches(c, num_epochs=2, seed=1)
  assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
  assert ids(a) != ids(other_seed)
  counts = np.bincount(ids(a))
  assert set(counts.tolist()) == {2}  # two epochs: every example twice
  first, second = ids(a)[:60], ids(a)[60:]
  assert first != second  # reshuffled


def test_eval_is_one_pass_in_file_order(data_file):
  c = data_cfg(data_file)
  _, out = batches(c, split='eval', num_epochs=1)
  ids = [i for b in out for i in b['example_id'] if i >= 0]
  assert sorted(ids) == list(range(60))
  assert (out[-1]['example_id'] >= 0).sum() >= 1


@pytest.mark.parametrize('split', ['train', 'eval'])
def test_shards_cover_every_record_once(data_file, split):
  c = data_cfg(data_file)
  seen = []
  for shard in range(3):
    _, out = batches(c, split=split, shard_index=shard, shard_count=3)
    shard_ids = [int(i) for b in out for i in b['example_id'] if i >= 0]
    assert all(i % 3 == shard for i in shard_ids)
    seen += shard_ids
  assert sorted(seen) == list(range(60))


@pytest.mark.parametrize('skip', [0, 1, 5, 17])
def test_state_round_trip_restores_the_same_batches(data_file, skip):
  c = data_cfg(data_file)
  kw = dict(num_epochs=None, rows=2, max_examples=6)
  it, _ = batches(c, n=skip, **kw)
  state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
  want = [next(it) for _ in range(8)]  # crosses epoch boundaries (60 records)
  restored, _ = batches(c, n=0, **kw)
  restored.set_state(state)
  got = [next(restored) for _ in range(8)]
  for w, g in zip(want, got):
    assert w.keys() == g.keys()
    for k in w:
      np.testing.assert_array_equal(w[k], g[k])


def test_state_from_another_pipeline_is_refused(data_file):
  c = data_cfg(data_file)
  it, _ = batches(c, n=1)
  other, _ = batches(c, n=0, seq_len=512)
  with pytest.raises(ValueError, match='different pipeline'):
    other.set_state(it.get_state())


def test_worker_processes_give_the_same_batches_and_state(data_file):
  c = data_cfg(data_file)
  _, want = batches(c, num_epochs=1)
  c.num_workers = 1
  it, got = batches(c, n=3)
  state = json.loads(json.dumps(it.get_state()))
  got += list(it)
  it.close()
  restored, _ = batches(c, n=0)
  restored.set_state(state)
  rest = list(restored)
  restored.close()
  assert len(want) == len(got) == len(rest) + 3
  for w, g, r in zip(want, got, [None] * 3 + rest):
    np.testing.assert_array_equal(w['input_ids'], g['input_ids'])
    np.testing.assert_array_equal(w['example_id'], g['example_id'])
    if r is not None:
      np.testing.assert_array_equal(w['example_id'], r['example_id'])


@pytest.mark.parametrize('layout, least', [('prefix_shared', 0.95), ('paired', 0.99)])
def test_bundled_data_packs_densely(layout, least):
  c = config.default_data_config()
  it, out = batches(c, split='eval', layout=layout, seq_len=1024, rows=4, max_examples=16)
  efficiency = it.counters['tokens'] / (len(out) * 4 * 1024)
  assert efficiency > least, efficiency  # one pass of 300 examples, tail included


def test_geometry_errors(data_file):
  c = data_cfg(data_file)
  with pytest.raises(ValueError, match='rows >= num_responses'):
    batches(c, layout='paired', pack=False, rows=1)
  with pytest.raises(ValueError, match='shard_index'):
    batches(c, shard_index=3, shard_count=3)
