"""Results: per-mode numbers, speedups against the FLOP bound, table and chart."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from prefix_dpo import metrics, model as model_lib
from prefix_dpo.benchmark import timing

# (baseline, prefix sharing, paper speedup field): the two comparisons.
COMPARISONS = {
    'unpacked': ('paired', 'prefix_shared', 'speedup'),
    'packed': ('paired_packed', 'prefix_shared_packed', 'speedup_packed'),
}


def mode_result(run: timing.ModeRun, cfg: model_lib.ModelConfig, *,
                with_reference: bool) -> dict[str, Any]:
  """Throughput, padding, FLOPs, memory and compile time of one mode."""
  plan = run.plan
  stats = plan.stats()
  seconds = timing.median(run.times)
  pairs = float(np.mean([s['pairs'] for s in stats]))
  tokens = float(np.mean([s['tokens'] for s in stats]))
  flops = float(np.mean([metrics.train_flops(cfg, s, with_reference=with_reference)
                         for s in stats]))
  return {
      'seq_len': plan.seq_len, 'rows': plan.rows, 'max_targets': plan.max_targets,
      'max_tiles': plan.max_tiles,
      'step_seconds_median': seconds,
      'step_seconds': [round(t, 5) for t in run.times],
      'step_cpu_seconds_median': timing.median(run.cpu_times),
      'pairs_per_step': pairs,
      'pairs_per_sec': pairs / seconds,
      'real_tokens_per_step': tokens,
      'real_tokens_per_sec': tokens / seconds,
      'padded_tokens_per_step': plan.rows * plan.seq_len,
      'padding_fraction': 1.0 - tokens / (plan.rows * plan.seq_len),
      'model_flops_per_step': flops,
      'model_gflops_per_sec': flops / seconds / 1e9,
      'peak_memory_bytes': run.memory['peak_bytes'],
      'temp_memory_bytes': run.memory['temp_bytes'],
      'compile_seconds': run.compile_seconds,
  }


def speedups(modes: Mapping[str, dict], paper_row) -> dict[str, dict]:
  """Achieved (pairs/s ratio) and ideal (FLOP ratio) speedup of prefix sharing."""
  out = {}
  for name, (base, shared, paper_field) in COMPARISONS.items():
    if base not in modes or shared not in modes:
      continue
    achieved = modes[shared]['pairs_per_sec'] / modes[base]['pairs_per_sec']
    ideal = modes[base]['model_flops_per_step'] / modes[shared]['model_flops_per_step']
    # Per-round ratios show how much machine noise moved the medians.
    rounds = [b / s for b, s in zip(modes[base]['step_seconds'], modes[shared]['step_seconds'])]
    cpu = modes[base]['step_cpu_seconds_median'] / modes[shared]['step_cpu_seconds_median']
    out[name] = {
        'achieved': achieved, 'ideal': ideal, 'achieved_over_ideal': achieved / ideal,
        # The same ratio in process CPU seconds: a cross-check on a busy machine.
        'achieved_cpu_time': cpu,
        'paper': getattr(paper_row, paper_field) if paper_row else None,
        'per_round': [round(r, 4) for r in rounds],
        'memory_ratio': modes[shared]['peak_memory_bytes'] / modes[base]['peak_memory_bytes'],
    }
  return out


def markdown(results: Mapping[str, Any]) -> str:
  """Two tables: speedups per workload, then every mode's numbers."""
  lines = ['| workload | comparison | ideal (FLOPs) | achieved | achieved / ideal | paper '
           '(vs FA3) | peak mem shared / paired | max log-prob diff per token |',
           '|---|---|---|---|---|---|---|---|']
  for name, w in results['workloads'].items():
    for comp, s in w['speedup'].items():
      paper = f'{s["paper"]:.2f}x' if s['paper'] else '-'
      lines.append(f'| {name} | {comp} | {s["ideal"]:.2f}x | {s["achieved"]:.2f}x | '
                   f'{s["achieved_over_ideal"]:.2f} | {paper} | {s["memory_ratio"]:.2f} | '
                   f'{w["logprob_max_diff"]:.1e} |')
  lines += ['', '| workload | mode | rows x seq_len | pairs/s | real tokens/s | padded tokens '
            '| padding | peak mem (MB) | compile (s) |', '|---|---|---|---|---|---|---|---|---|']
  for name, w in results['workloads'].items():
    for mode, m in w['modes'].items():
      lines.append(f'| {name} | {mode} | {m["rows"]} x {m["seq_len"]} | '
                   f'{m["pairs_per_sec"]:.2f} | {m["real_tokens_per_sec"]:.0f} | '
                   f'{m["padded_tokens_per_step"]} | {100 * m["padding_fraction"]:.0f}% | '
                   f'{m["peak_memory_bytes"] / 2**20:.0f} | {m["compile_seconds"]:.1f} |')
  return '\n'.join(lines) + '\n'


def chart(results: Mapping[str, Any], path: str) -> None:
  """Bars per workload: achieved, ideal and the paper's speedup, both comparisons."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = list(results['workloads'])
  fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(names) + 4), 4.6), sharey=True)
  x = np.arange(len(names))
  bars = (('achieved', 'achieved (this run)'), ('ideal', 'ideal (FLOP ratio)'),
          ('paper', 'paper (8xH100, vs FA3)'))
  for ax, comp in zip(axes, COMPARISONS):
    for i, (key, label) in enumerate(bars):
      values = [results['workloads'][n]['speedup'].get(comp, {}).get(key) or 0.0
                for n in names]
      drawn = ax.bar(x + (i - 1) * 0.27, values, 0.27, label=label)
      ax.bar_label(drawn, fmt='%.2f', fontsize=6, padding=1)
    ax.axhline(1.0, color='gray', lw=0.8)
    ax.set_xticks(x, names, rotation=30, ha='right')
    ax.set_title(f'prefix sharing vs paired, {comp}', fontsize=10)
  axes[0].set_ylabel('speedup (pairs/s)')
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='lower center', ncol=3, fontsize=8, frameon=False)
  fig.suptitle(f'{results["machine"]["device_kind"]}, attention '
               f'{results["config"]["model"]["attention_impl"]}', fontsize=9)
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def summary(results: Mapping[str, Any]) -> dict[str, Any]:
  """The one-line JSON: speedups per workload and the worst cases."""
  per = {}
  ratios, diffs = [], []
  for name, w in results['workloads'].items():
    per[name] = {comp: {k: round(s[k], 3) for k in ('achieved', 'ideal', 'achieved_over_ideal')}
                 for comp, s in w['speedup'].items()}
    ratios += [s['achieved_over_ideal'] for s in w['speedup'].values()]
    diffs.append(w['logprob_max_diff'])
  return {'workloads': per,
          'min_achieved_over_ideal': round(min(ratios), 3) if ratios else None,
          'max_logprob_diff_per_token': max(diffs) if diffs else None,
          'seconds': round(results['seconds'], 1), 'out': results['out']}


def write(results: dict[str, Any], out_dir: str, *, with_chart: bool = True) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=1, default=float)
  with open(os.path.join(out_dir, 'table.md'), 'w', encoding='utf-8') as f:
    f.write(markdown(results))
  if with_chart:
    chart(results, os.path.join(out_dir, 'chart.png'))

