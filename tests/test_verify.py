import json

from prefix_dpo import verify


def test_verify_cli_passes_and_prints_one_json_line(capsys):
  assert verify.main(['--examples', '6']) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report['ok'] and report['tokens_shared'] < report['tokens_paired']
  for key in ('max_abs_logp_diff', 'loss_abs_diff', 'max_rel_grad_diff'):
    assert key in report
