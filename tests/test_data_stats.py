"""python -m prefix_dpo.stats on the bundled data and on a fixture of each format; the bundled data."""
import importlib.util
import json
from pathlib import Path

import pytest

from prefix_dpo import stats
from prefix_dpo.data import readers
from tests.fixtures import data_records as fx

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, argv):
  assert stats.main(argv) == 0
  out = capsys.readouterr().out.strip().splitlines()
  return json.loads(out[-1]), out


@pytest.mark.parametrize('name,record,fmt', [
    ('standard', fx.STANDARD, 'auto'), ('conversational', fx.CONVERSATIONAL, 'auto'),
    ('hh', fx.HH, 'auto'), ('implicit_messages', fx.IMPLICIT_MESSAGES, 'auto'),
    ('capybara', fx.CAPYBARA, 'capybara'), ('ultrafeedback', fx.ULTRAFEEDBACK, 'auto'),
    ('ranked', fx.RANKED_RANKING, 'auto')])
def test_stats_on_each_format(tmp_path, capsys, name, record, fmt):
  path = fx.write_jsonl(tmp_path / f'{name}.jsonl', [record] * 4 + [b'not json'])
  result, lines = run(capsys, ['--data', str(path), '--format', fmt, '--seq-len', '512',
                               '--num-responses', '3'])
  assert result['read'] == 5 and result['used'] == 4
  assert result['skipped_by_reason'] == {'malformed_json': 1}
  assert result['prefix_shared_tokens'] < result['paired_tokens']
  assert result['ideal_speedup'] > 1
  assert 0 < result['prefix_shared']['packing_efficiency'] <= 1
  assert lines[0].startswith('data[train]: 5 read = 4 used + 1 skipped')


def test_stats_on_the_bundled_data(capsys):
  result, _ = run(capsys, ['--split', 'eval'])
  assert result['read'] == result['used'] == 300
  assert result['prompt_tokens_median'] > 4 * result['response_tokens_median']
  assert result['ideal_speedup'] > 1.5
  assert result['prefix_shared']['packing_efficiency'] > 0.9


def test_stats_error_is_one_line(tmp_path, capsys):
  assert stats.main(['--data', str(tmp_path / 'missing.jsonl')]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: data.train_files: no such file') and '\n' not in err


def dataset_script():
  spec = importlib.util.spec_from_file_location('make_default_dataset',
                                                ROOT / 'scripts' / 'make_default_dataset.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_bundled_data_is_what_the_script_makes(tmp_path):
  dataset_script().main(['--out', str(tmp_path)])
  for split in ('train', 'eval'):
    assert (tmp_path / f'{split}.jsonl').read_bytes() == (readers.BUNDLED_DIR / f'{split}.jsonl').read_bytes()
  size = sum(p.stat().st_size for p in readers.BUNDLED_DIR.iterdir())
  assert size < 4_000_000


def test_the_ranked_variant_ranks_by_right_digits(tmp_path, capsys):
  dataset_script().main(['--out', str(tmp_path), '--responses', '3', '--train', '40',
                         '--eval', '4'])
  records = [json.loads(line) for line in open(tmp_path / 'train.jsonl')]
  for r in records:
    value = lambda k: ''.join(c for c in r['responses'][k][0]['content'] if c.isdigit())
    true = value(0)
    assert true in r['prompt'][1]['content']
    for k, score in enumerate(r['scores']):
      assert sum(a == b for a, b in zip(value(k), true)) == score
    assert r['scores'][0] > r['scores'][1] > r['scores'][2] == 0
  capsys.readouterr()
  result, _ = run(capsys, ['--data', str(tmp_path / 'train.jsonl'), '--num-responses', '3'])
  assert result['format'] == 'ranked' and result['used'] == 40
