"""Readers and formats: every file type and record format, on fixture files."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefix_dpo.data import config, formats, pipeline, readers
from prefix_dpo.data.accounting import DataError, Skip
from prefix_dpo.data.tokenizers import ByteTokenizer
from tests.fixtures import data_records as fx


def data_cfg(path, **overrides):
  c = config.default_data_config()
  c.train_files, c.eval_files = str(path), ''
  c.update(overrides)
  return c


def parse_one(tmp_path, record, **overrides):
  path = fx.write_jsonl(tmp_path / 'one.jsonl', [record])
  c = data_cfg(path, **overrides)
  split = pipeline.open_split(c, 'train')
  return split.format, formats.parse(split.records[0].value, split.format, c)


def test_standard(tmp_path):
  fmt, pref = parse_one(tmp_path, fx.STANDARD)
  assert fmt == 'standard'
  assert pref == formats.Preference('The sky is', (' blue.', ' green.'))


def test_conversational(tmp_path):
  fmt, pref = parse_one(tmp_path, fx.CONVERSATIONAL)
  assert fmt == 'conversational'
  assert pref.prompt == tuple(fx.CONVERSATIONAL['prompt'])
  assert pref.responses == (tuple(fx.CONVERSATIONAL['chosen']), tuple(fx.CONVERSATIONAL['rejected']))


def test_hh_rlhf_transcript(tmp_path):
  fmt, pref = parse_one(tmp_path, fx.HH)
  assert fmt == 'implicit'
  # The shared prefix runs into the responses' common first space: cut back to the marker.
  assert pref.prompt == fx.HH_PREFIX
  assert pref.responses == (' After steeping is usual, so you can judge the strength first.',
                            ' After. Tea is bad for you anyway.')


def test_hh_rlhf_as_messages(tmp_path):
  _, pref = parse_one(tmp_path, fx.HH, hh_as_messages=True)
  assert [m['role'] for m in pref.prompt] == ['user', 'assistant', 'user']
  assert pref.prompt[2]['content'] == 'Should I add milk before or after?'
  assert pref.responses[1] == ({'role': 'assistant', 'content': 'After. Tea is bad for you anyway.'},)


def test_implicit_messages(tmp_path):
  fmt, pref = parse_one(tmp_path, fx.IMPLICIT_MESSAGES)
  assert fmt == 'implicit'
  assert pref.prompt == (fx.IMPLICIT_MESSAGES['chosen'][0],)
  assert pref.responses[0] == (fx.IMPLICIT_MESSAGES['chosen'][1],)


def test_capybara_multi_turn(tmp_path):
  fmt, pref = parse_one(tmp_path, fx.CAPYBARA, format='capybara')
  assert fmt == 'ultrafeedback'  # the same rule: last assistant message = response
  assert pref.prompt == tuple(fx.CAPYBARA['chosen'][:3])
  assert pref.responses == ((fx.CAPYBARA['chosen'][3],), (fx.CAPYBARA['rejected'][3],))
  assert parse_one(tmp_path, fx.CAPYBARA)[1] == pref  # auto


def test_ultrafeedback_binarized(tmp_path):
  fmt, pref = parse_one(tmp_path, fx.ULTRAFEEDBACK)
  assert fmt == 'ultrafeedback'
  assert pref.prompt == ({'role': 'user', 'content': 'Write a haiku about autumn.'},)
  assert pref.responses[1] == ({'role': 'assistant', 'content': 'Autumn is a season.'},)


@pytest.mark.parametrize('record', [fx.RANKED_SCORES, fx.RANKED_RANKING])
def test_ranked_best_first(tmp_path, record):
  fmt, pref = parse_one(tmp_path, record)
  assert fmt == 'ranked'
  assert pref.responses == ('1 2 3', '1 2', 'one')


def test_ranked_tie_for_best_is_skipped(tmp_path):
  c = data_cfg(tmp_path)
  with pytest.raises(Skip, match='bad_scores'):
    formats.parse({**fx.RANKED_SCORES, 'scores': [1, 1, 0]}, 'ranked', c)


def test_renamed_fields(tmp_path):
  record = {'question': 'Q?', 'good': 'yes', 'bad': 'no'}
  _, pref = parse_one(tmp_path, record, format='standard',
                      fields=dict(prompt='question', chosen='good', rejected='bad',
                                  responses='responses', scores='scores', ranking='ranking',
                                  role='role', content='content'))
  assert pref == formats.Preference('Q?', ('yes', 'no'))


def _records(path, **overrides):
  split = pipeline.open_split(data_cfg(path, **overrides), 'train')
  return [r.value for r in split.records]


def test_json_parquet_and_save_to_disk_read_the_same(tmp_path):
  records = fx.conversations(5)
  fx.write_jsonl(tmp_path / 'a.jsonl', records)
  (tmp_path / 'a.json').write_text(json.dumps(records))
  table = pa.Table.from_pylist(records)
  pq.write_table(table, tmp_path / 'a.parquet')
  # The layout datasets.save_to_disk writes: Arrow stream files + state.json.
  disk = tmp_path / 'saved' / 'train'
  disk.mkdir(parents=True)
  with pa.OSFile(str(disk / 'data-00000-of-00001.arrow'), 'wb') as sink:
    with pa.ipc.new_stream(sink, table.schema) as writer:
      writer.write_table(table)
  (disk / 'state.json').write_text(json.dumps({'_data_files': [{'filename': 'data-00000-of-00001.arrow'}]}))
  (tmp_path / 'saved' / 'dataset_dict.json').write_text(json.dumps({'splits': ['train']}))
  for name in ('a.jsonl', 'a.json', 'a.parquet', 'saved'):
    assert _records(tmp_path / name) == records, name


def test_globs_and_record_ids_span_files(tmp_path):
  fx.write_jsonl(tmp_path / 'p1.jsonl', fx.conversations(3, seed=1))
  fx.write_jsonl(tmp_path / 'p2.jsonl', fx.conversations(2, seed=2))
  split = pipeline.open_split(data_cfg(f'{tmp_path}/p*.jsonl'), 'train')
  assert [r.record_id for r in split.records] == [0, 1, 2, 3, 4]
  assert split.records[3].where.endswith('p2.jsonl:1')


def test_bundled_paths():
  assert readers.resolve_paths('bundled:train', 'train_files') == [str(readers.BUNDLED_DIR / 'train.jsonl')]


def test_missing_file_is_one_clear_line(tmp_path):
  with pytest.raises(DataError, match=r"data.train_files: no such file or directory: '.*nope.jsonl'"):
    pipeline.open_split(data_cfg(tmp_path / 'nope.jsonl'), 'train')


def test_unknown_format_and_file_format(tmp_path):
  path = fx.write_jsonl(tmp_path / 'a.jsonl', [fx.STANDARD])
  with pytest.raises(DataError, match="unknown data.format='dpo'"):
    formats.resolve_format('dpo', [], config.default_data_config().fields)
  with pytest.raises(DataError, match='config: data.format'):
    pipeline.open_split(data_cfg(path, format='dpo'), 'train')
  (tmp_path / 'a.csv').write_text('x')
  with pytest.raises(DataError, match=r"a.csv: cannot tell the file format from '.csv'"):
    pipeline.open_split(data_cfg(tmp_path / 'a.csv'), 'train')


def test_field_mismatch_names_file_and_fields(tmp_path):
  path = fx.write_jsonl(tmp_path / 'qa.jsonl', [{'question': 'q', 'answer_a': 'a', 'answer_b': 'b'}])
  with pytest.raises(DataError) as e:
    pipeline.open_split(data_cfg(path), 'train')
  message = str(e.value)
  assert 'qa.jsonl' in message and "['answer_a', 'answer_b', 'question']" in message
  assert '\n' not in message
  with pytest.raises(DataError, match=r"qa.jsonl: format 'standard' needs fields \['prompt', 'chosen', 'rejected'\]; found fields \['answer_a'"):
    pipeline.open_split(data_cfg(path, format='standard'), 'train')


def test_held_out_fraction_partitions_train(tmp_path):
  path = fx.write_jsonl(tmp_path / 'a.jsonl', fx.conversations(50))
  c = data_cfg(path, eval_fraction=0.2)
  train = {r.record_id for r in pipeline.open_split(c, 'train').records}
  held = {r.record_id for r in pipeline.open_split(c, 'eval').records}
  assert len(held) == 10 and not train & held and train | held == set(range(50))
  with pytest.raises(DataError, match='no eval data'):
    pipeline.open_split(data_cfg(path), 'eval')


def test_every_format_tokenizes_through_the_pipeline(tmp_path):
  tok = ByteTokenizer()
  for name, record, fmt in [('std', fx.STANDARD, 'auto'), ('conv', fx.CONVERSATIONAL, 'auto'),
                            ('hh', fx.HH, 'auto'), ('capy', fx.CAPYBARA, 'capybara'),
                            ('uf', fx.ULTRAFEEDBACK, 'ultrafeedback'),
                            ('rank', fx.RANKED_SCORES, 'ranked')]:
    path = fx.write_jsonl(tmp_path / f'{name}.jsonl', [record] * 3)
    summary = pipeline.load_summary(data_cfg(path, format=fmt), split='train', tokenizer=tok)
    assert summary.used == 3, (name, summary)
    it = pipeline.make_batch_iterator(
        data_cfg(path, format=fmt), split='train', tokenizer=tok, layout='prefix_shared',
        seq_len=512, rows=2, max_examples=4, num_responses=3, pack=True, seed=0, num_epochs=1)
    ids = np.concatenate([b['example_id'] for b in it])
    assert sorted(ids[ids >= 0]) == [0, 1, 2], name
