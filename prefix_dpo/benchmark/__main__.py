"""``python -m prefix_dpo.benchmark --config configs/bench/NAME.py --out DIR``."""
from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from prefix_dpo import config as config_lib
from prefix_dpo.benchmark import run as run_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Benchmark config file.',
                                          lock_config=True)
_OUT = flags.DEFINE_string('out', None, 'Directory for results.json, table.md, chart.png.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None or not _OUT.value:
    raise app.UsageError('--config and --out are required')
  results = run_lib.run(config_lib.load_config_flag(_CONFIG.value), _OUT.value)
  print(json.dumps(results['summary']))  # the last line: the summary


if __name__ == '__main__':
  app.run(main, flags_parser=config_lib.parse_flags)
