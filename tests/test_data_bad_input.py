"""Bad input: every skip reason counted (read = used + skipped), strict mode, truncation."""
import numpy as np
import pytest

from prefix_dpo.data import config, pipeline
from prefix_dpo.data.accounting import REASONS, DataError
from prefix_dpo.data.tokenizers import ByteTokenizer
from tests.fixtures import data_records as fx

TOK = ByteTokenizer()
GOOD = fx.CONVERSATIONAL
LONG_PROMPT = {**fx.STANDARD, 'prompt': 'x' * 300}

# (reason, line or record, data-config overrides)
CASES = [
    ('malformed_json', b'{"prompt": "a", "chosen": ', {}),
    ('undecodable_bytes', b'{"prompt": [{"role": "user", "content": "\xff\xfe"}]}', {}),
    ('undecodable_bytes', b'{"prompt": [{"role": "user", "content": "\\ud800"}], '
                          b'"chosen": [{"role": "assistant", "content": "a"}], '
                          b'"rejected": [{"role": "assistant", "content": "b"}]}', {}),
    ('not_a_record', b'["prompt", "chosen"]', {}),
    ('missing_field', {'prompt': GOOD['prompt'], 'chosen': GOOD['chosen']}, {}),
    ('missing_field', {**GOOD, 'rejected': None}, {}),
    ('not_a_string', {**GOOD, 'chosen': 5}, {}),
    ('not_a_string', {**GOOD, 'prompt': [{'role': 'user', 'content': ['a', 'list']}]}, {}),
    ('bad_messages', {**GOOD, 'prompt': []}, {}),
    ('bad_messages', {**GOOD, 'prompt': [{'role': 'narrator', 'content': 'hi'}]}, {}),
    ('empty_prompt', {**GOOD, 'prompt': [{'role': 'user', 'content': ''}]}, {}),
    ('empty_response', {**GOOD, 'chosen': [{'role': 'assistant', 'content': ''}]}, {}),
    ('identical_responses', {**GOOD, 'rejected': GOOD['chosen']}, {}),
    ('prompt_too_long', {**GOOD, 'prompt': [{'role': 'user', 'content': 'x' * 300}]},
     {'max_prompt_length': 100, 'prompt_truncation': 'skip'}),
    ('prompt_too_long', {**GOOD, 'prompt': [{'role': 'user', 'content': 'x' * 300}]},
     {'max_length': 200}),
    ('response_too_long', {**GOOD, 'chosen': [{'role': 'assistant', 'content': 'y' * 300}]},
     {'max_response_length': 100, 'response_truncation': 'skip'}),
    ('identical_after_truncation', {**GOOD, 'chosen': [{'role': 'assistant', 'content': 'same start A'}],
                                    'rejected': [{'role': 'assistant', 'content': 'same start B'}]},
     {'max_response_length': 8}),
    ('longer_than_seq_len', {**GOOD, 'prompt': [{'role': 'user', 'content': 'x' * 600}]}, {}),
]


def data_cfg(path, **overrides):
  c = config.default_data_config()
  c.update(**{'train_files': str(path), 'eval_files': '', 'format': 'conversational', **overrides})
  return c


@pytest.mark.parametrize('reason,line,overrides', CASES)
def test_each_bad_record_is_counted_and_located(tmp_path, reason, line, overrides):
  path = fx.write_jsonl(tmp_path / 'd.jsonl', [GOOD, line, GOOD])
  c = data_cfg(path, **overrides)
  summary = pipeline.load_summary(c, split='train', tokenizer=TOK, seq_len=512)
  assert (summary.read, summary.used, summary.skipped) == (3, 2, {reason: 1}), summary
  assert summary.skipped_where[reason] == [f'{path}:2']
  assert f'skipped      1 {reason}' in str(summary)
  # The batches skip it too, and strict mode makes it one error line naming the record.
  it = pipeline.make_batch_iterator(c, split='train', tokenizer=TOK, layout='prefix_shared',
                                    seq_len=512, rows=2, max_examples=4, num_responses=2,
                                    pack=True, seed=0, num_epochs=1)
  ids = np.concatenate([b['example_id'] for b in it])
  assert sorted(ids[ids >= 0].tolist()) == [0, 2]
  assert it.counters['skipped'] == 1
  c.strict = True
  with pytest.raises(DataError, match=rf'd.jsonl:2: {reason}') as e:
    pipeline.load_summary(c, split='train', tokenizer=TOK, seq_len=512)
  assert '\n' not in str(e.value)


def test_counts_always_add_up_on_a_mixed_file(tmp_path):
  lines = [GOOD] + [line for _, line, overrides in CASES if not overrides] + [GOOD] * 3
  path = fx.write_jsonl(tmp_path / 'mixed.jsonl', lines + [b'', b'   '])  # blank lines are not records
  summary = pipeline.load_summary(data_cfg(path), split='train', tokenizer=TOK, seq_len=512)
  assert summary.read == len(lines) == summary.used + sum(summary.skipped.values())
  assert summary.used == 4
  assert set(summary.skipped) <= set(REASONS)
  d = summary.to_dict()
  assert d['read'] == d['used'] + d['skipped']


def test_too_many_and_too_few_responses_and_bad_scores(tmp_path):
  records = [fx.RANKED_SCORES, {**fx.RANKED_SCORES, 'responses': ['a'], 'scores': [1]},
             {**fx.RANKED_SCORES, 'scores': [1, 2]}, {'prompt': 'p', 'responses': ['a', 'b']}]
  path = fx.write_jsonl(tmp_path / 'r.jsonl', records)
  c = data_cfg(path, format='ranked')
  summary = pipeline.load_summary(c, split='train', tokenizer=TOK, num_responses=2)
  assert summary.skipped == {'too_many_responses': 1, 'too_few_responses': 1, 'bad_scores': 2}


def test_implicit_prompt_problems(tmp_path):
  records = [fx.HH, {'chosen': 'no marker here', 'rejected': 'no marker there'},
             {**fx.CAPYBARA, 'rejected': [{'role': 'user', 'content': 'other'},
                                          {'role': 'assistant', 'content': 'x'}]}]
  path = fx.write_jsonl(tmp_path / 'i.jsonl', records[:2])
  summary = pipeline.load_summary(data_cfg(path, format='implicit'), split='train', tokenizer=TOK)
  assert summary.skipped == {'no_shared_prompt': 1}
  path = fx.write_jsonl(tmp_path / 'c.jsonl', [fx.CAPYBARA, records[2]])
  summary = pipeline.load_summary(data_cfg(path, format='capybara'), split='train', tokenizer=TOK)
  assert summary.skipped == {'prompt_mismatch': 1}


def test_truncation_keeps_prompt_end_and_cuts_responses(tmp_path):
  record = {'prompt': 'abcdefghij', 'chosen': 'KLMNOPQ', 'rejected': 'klmnopq'}
  path = fx.write_jsonl(tmp_path / 't.jsonl', [record])

  def tokens(**overrides):
    c = data_cfg(path, format='standard', **overrides)
    summary = pipeline.load_summary(c, split='train', tokenizer=TOK)
    it = pipeline.make_batch_iterator(c, split='train', tokenizer=TOK, layout='prefix_shared',
                                      seq_len=64, rows=1, max_examples=1, num_responses=2,
                                      pack=True, seed=0, num_epochs=1)
    b = next(it)
    row = b['input_ids'][0]
    prompt = TOK.decode(row[(b['segment_ids'][0] == 1) & (b['branch_ids'][0] == 0)])
    chosen = TOK.decode(row[b['branch_ids'][0] == 1])
    return prompt, chosen, summary

  prompt, chosen, summary = tokens(max_prompt_length=5)
  assert prompt == '<|bos|>ghij' and chosen == 'KLMNOPQ<|eos|>'  # BOS + the latest tokens
  assert (summary.truncated_prompts, summary.truncated_responses) == (1, 0)
  prompt, _, _ = tokens(max_prompt_length=5, prompt_truncation='keep_start')
  assert prompt == '<|bos|>abcd'
  prompt, chosen, summary = tokens(max_length=14)  # 11 prompt tokens leave 3 per response
  assert prompt == '<|bos|>abcdefghij' and chosen == 'KLM'
  assert summary.truncated_responses == 2
  _, chosen, _ = tokens(max_response_length=4)
  assert chosen == 'KLMN'


def test_endless_iteration_over_only_bad_records_stops_with_an_error(tmp_path):
  path = fx.write_jsonl(tmp_path / 'bad.jsonl', [GOOD, {**GOOD, 'chosen': 5}])
  c = data_cfg(path)
  c.format = 'conversational'
  it = pipeline.make_batch_iterator(c, split='train', tokenizer=TOK, layout='prefix_shared',
                                    seq_len=16, rows=1, max_examples=1, num_responses=2,
                                    pack=True, seed=0, num_epochs=None)
  with pytest.raises(DataError, match='a whole epoch of records was skipped'):
    next(it)
