"""One benchmark run: every workload of the config, every mode, then the report."""
from __future__ import annotations

import os
import platform
import resource
import sys
import time
from typing import Any

import jax
import ml_collections

from prefix_dpo import losses
from prefix_dpo.benchmark import config as config_lib, plan as plan_lib, report, timing
from prefix_dpo.benchmark import workloads


def pairs_per_step(c: ml_collections.ConfigDict, name: str) -> int:
  if c.pairs_per_step:
    return c.pairs_per_step
  if name == 'file':  # the median of a first sample of the file
    sample, _ = workloads.file_examples(c.data, 64, seq_len=c.file_seq_len, seed=c.seed)
    median = workloads.length_stats(sample)['median_len']
  else:
    median = workloads.PAPER[name].median_len * c.length_scale
  return max(2, round(c.tokens_per_step / median))


def workload_examples(c: ml_collections.ConfigDict, name: str, count: int,
                      vocab_size: int) -> tuple[list, int]:
  """``(examples, vocab_size)`` of a workload."""
  if name == 'file':
    return workloads.file_examples(c.data, count, seq_len=c.file_seq_len, seed=c.seed)
  if name not in workloads.PAPER:
    raise ValueError(f'unknown workload {name!r}; expected one of '
                     f'{workloads.NAMES + ("file",)}')
  return workloads.synthetic_examples(name, count, length_scale=c.length_scale,
                                      vocab_size=vocab_size, seed=c.seed), vocab_size


def run_workload(c: ml_collections.ConfigDict, name: str, log) -> dict[str, Any]:
  pairs = pairs_per_step(c, name)
  count = pairs * c.steps
  examples, vocab = workload_examples(c, name, count, c.model.vocab_size)
  cfg = config_lib.model_config(c, vocab)
  steps = [examples[i * pairs:(i + 1) * pairs] for i in range(c.steps)]
  plans = plan_lib.make_plans(steps, c.modes, cfg, seq_multiple=c.seq_multiple,
                              max_pack_factor=c.max_pack_factor, max_targets=c.max_targets,
                              exact_tile_budget=c.exact_tile_budget, chunk=c.logprob_chunk)
  graphdef, params = timing.init_params(cfg, c.seed)
  with_reference = losses.uses_reference(c.loss) and c.reference_mode == 'model'
  reference = params if with_reference else None
  tx = timing.make_optimizer(c, c.warmup + c.steps)
  runs = timing.compile_modes(plans, graphdef, params, tx, reference, c)
  log(f'{name}: {pairs} pairs/step; compiled ' + ', '.join(
      f'{m} {r.plan.rows}x{r.plan.seq_len} ({r.compile_seconds:.1f}s)' for m, r in runs.items()))
  diffs = {}
  if c.check_logprobs:
    lengths = timing.response_lengths(next(iter(plans.values())).batches[0])
    diffs = timing.max_difference(timing.response_logprobs(runs, params), lengths)
  timing.time_interleaved(runs, reference, rounds=c.steps, warmup=c.warmup)
  modes = {m: report.mode_result(r, cfg, with_reference=with_reference) for m, r in runs.items()}
  if c.profile:
    for m, seconds in timing.profile_modes(runs, reference).items():
      modes[m]['profile_seconds'] = seconds
  for m, d in diffs.items():
    modes[m]['logprob_diff_vs_paired'] = d
  result = {
      'paper': vars(workloads.PAPER[name]) if name in workloads.PAPER else None,
      'examples': workloads.length_stats(examples),
      'pairs_per_step': pairs,
      'modes': modes,
      'speedup': report.speedups(modes, workloads.PAPER.get(name)),
      # Max over modes, per scored token (see timing.max_difference).
      'logprob_max_diff': max((d['per_token'] for d in diffs.values()), default=float('nan')),
      'logprob_max_abs_diff': max((d['abs'] for d in diffs.values()), default=float('nan')),
  }
  log(f'{name}: ' + ', '.join(f'{k} {v["achieved"]:.2f}x of ideal {v["ideal"]:.2f}x'
                              for k, v in result['speedup'].items()))
  return result


def run(c: ml_collections.ConfigDict, out_dir: str, log=None) -> dict[str, Any]:
  """Runs every workload of ``c``; writes the report to ``out_dir``; returns results."""
  log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
  start = time.perf_counter()
  results: dict[str, Any] = {
      'machine': {**timing.device_info(), 'cpu_count': os.cpu_count(),
                  'platform': platform.platform(), 'processor': platform.machine()},
      'config': c.to_dict(),
      'peak_memory_source': (
          "XLA's buffer assignment of each mode's compiled step: arguments + outputs"
          ' - donated aliases + temporaries (machine.process_max_rss_bytes is the'
          " process's RSS high-water mark over all modes)"),
      'workloads': {},
  }
  results['machine']['load_average_start'] = os.getloadavg()
  names = [n for w in c.workloads for n in (workloads.NAMES if w == 'all' else (w,))]
  for name in names:
    results['workloads'][name] = run_workload(c, name, log)
  results['seconds'] = time.perf_counter() - start
  # Other processes' load: the noise this run's wall times carry.
  results['machine']['load_average_end'] = os.getloadavg()
  results['out'] = out_dir
  # Process-wide high-water marks (all modes together): context only.
  results['machine']['process_max_rss_bytes'] = resource.getrusage(
      resource.RUSAGE_SELF).ru_maxrss * 1024
  results['machine'].update({k: v for k, v in timing.device_info().items()
                             if k == 'device_peak_bytes_in_use'})
  results['summary'] = report.summary(results)
  report.write(results, out_dir, with_chart=c.chart)
  return results
