"""Where a step's time goes: XLA ops of one profiled step, grouped by source.

Runs one step of a compiled mode under ``jax.profiler`` (a Perfetto trace),
maps every executed XLA op back to the Python frames that built it (the stack
frame tables of the compiled HLO text) and sums durations per category:
``mlp``, ``qkvo_proj``, ``attention`` (attention.py and masks.py),
``logits`` (the chunked unembedding and logsumexp), ``logprob_gather``,
``norm``, ``rope``, ``optimizer``, ``other``. Best effort: the trace and HLO
formats are XLA internals, so any failure returns ``None`` rather than
stopping the benchmark.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
from typing import Any, Callable, Container

import jax

_FUNCTION_CATEGORIES = (  # first match wins, innermost frames first
    ('token_logprobs', 'logits'),
    ('response_logprobs', 'logprob_gather'),
    ('MLP.__call__', 'mlp'),
    ('apply_rope', 'rope'),
    ('RMSNorm.__call__', 'norm'),
)


def _tables(hlo: str):
  """File locations and stack frames of an HLO module's text."""
  def section(name: str) -> list[str]:
    start = hlo.index(f'\n{name}\n') + len(name) + 2
    lines = []
    for line in hlo[start:].split('\n'):
      if not re.match(r'\d+ ', line):
        break
      lines.append(line)
    return lines

  files = {int(l.split()[0]): l.split('"')[1] for l in section('FileNames')}
  funcs = {int(l.split()[0]): l.split('"')[1] for l in section('FunctionNames')}
  locations = {}
  for line in section('FileLocations'):
    m = re.search(r'^(\d+) \{file_name_id=(\d+) function_name_id=(\d+)', line)
    locations[int(m.group(1))] = (files[int(m.group(2))], funcs[int(m.group(3))])
  frames = {}
  for line in section('StackFrames'):
    m = re.match(r'(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)', line)
    frames[int(m.group(1))] = (int(m.group(2)), int(m.group(3)))
  return locations, frames


def _category(frame: int, locations, frames) -> str:
  chain, seen = [], set()
  while frame in frames and frame not in seen:
    seen.add(frame)
    location, frame = frames[frame]
    chain.append(locations[location])
  paths = [p for p, _ in chain]
  names = [f for _, f in chain]
  if any(p.endswith(('prefix_dpo/attention.py', 'prefix_dpo/masks.py')) or 'kernels_pallas' in p
         for p in paths):
    return 'attention'
  for function, category in _FUNCTION_CATEGORIES:
    if any(n.startswith(function) for n in names):
      return category
  if 'Attention.__call__' in names:
    return 'qkvo_proj'
  if any('optax' in p for p in paths):
    return 'optimizer'
  return 'other'


def _op_categories(hlo: str) -> dict[str, str]:
  """Instruction name -> category (fusions by the frames of their bodies)."""
  locations, frames = _tables(hlo)
  bodies = dict(re.findall(r'\n%([\w.\-]+) [^\n]*\{(.*?)\n\}', hlo, re.S))
  out = {}
  for m in re.finditer(r'\n\s+(?:ROOT )?%([\w.\-]+) = ([^\n]*)', hlo):
    name, rest = m.group(1), m.group(2)
    called = re.search(r'calls=%([\w.\-]+)', rest)
    text = (bodies.get(called.group(1), '') if called else '') + rest
    votes = collections.Counter(_category(int(f), locations, frames)
                                for f in re.findall(r'stack_frame_id=(\d+)', text))
    if votes:
      out[name] = votes.most_common(1)[0][0]
  return out


def _leaves(events: list[dict], names: Container[str]) -> list[dict]:
  """Events of XLA ops (``names``) that contain no other op of their thread.

  Control flow (``cond``, ``while``) is traced as an event around the ops it
  runs: only the innermost ops are counted, so no time counts twice.
  """
  by_thread = collections.defaultdict(list)
  for e in events:
    if e.get('ph') == 'X' and 'dur' in e and e.get('name') in names:
      by_thread[(e.get('pid'), e.get('tid'))].append(e)
  leaves = []
  for thread in by_thread.values():
    thread.sort(key=lambda e: (e['ts'], -e['dur']))
    for e, nxt in zip(thread, thread[1:] + [None]):
      if nxt is None or nxt['ts'] >= e['ts'] + e['dur']:
        leaves.append(e)
  return leaves


def profile_call(compiled, call: Callable[[], Any]) -> dict[str, float] | None:
  """Seconds per category of the ops of ``compiled`` run by ``call()``.

  ``call`` runs the executable once (and keeps what it returns, e.g. the new
  state of a donating step); its result is waited for inside the trace.
  """
  try:
    categories = _op_categories(compiled.as_text())
    with tempfile.TemporaryDirectory() as tmp:
      with jax.profiler.trace(tmp, create_perfetto_trace=True):
        jax.block_until_ready(call())
      (path,) = glob.glob(f'{tmp}/**/*.trace.json.gz', recursive=True)
      with gzip.open(path) as f:
        trace = json.load(f)
    events = trace['traceEvents'] if isinstance(trace, dict) else trace
    totals: collections.Counter = collections.Counter()
    for e in _leaves(events, categories):
      totals[categories[e['name']]] += e['dur'] / 1e6
    return {k: round(v, 5) for k, v in totals.most_common()}
  except Exception:  # pylint: disable=broad-except
    return None
