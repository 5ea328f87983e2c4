"""Static shapes per mode, and the host batches of every step.

Every mode lays out the same examples per step. Shapes are fixed per mode for
the whole run (one compilation, no per-step recompiles):

* unpacked: one sequence per row, ``seq_len`` = the longest sequence of the
  run rounded up to ``seq_multiple``;
* packed: first-fit-decreasing rows (examples sorted longest first, as the
  paper's multipack); ``seq_len`` and ``rows`` minimise a cost model over the
  run's steps (padded tokens, plus ``rows * seq_len**2`` attention when the
  attention is dense).

Static budgets come from the batches themselves: ``max_targets`` (response
tokens scored; logits of prompts and padding are never computed) and, for
``xla_blocked``, the number of non-empty attention tiles.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from prefix_dpo import attention, layout, metrics, model as model_lib
from prefix_dpo.benchmark import config as config_lib

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Plan:
  """A mode's static shapes and its host batches (one per step)."""
  mode: str
  layout: str
  pack: bool
  seq_len: int
  rows: int
  max_examples: int
  max_targets: int | None
  chunk_size: int
  max_tiles: int | None
  batches: tuple[Batch, ...]

  def stats(self) -> list[dict[str, int]]:
    return [metrics.batch_stats(b) for b in self.batches]


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def order_longest_first(examples: Sequence[layout.Example]) -> list[layout.Example]:
  """First-fit-decreasing order (by prefix-shared length), stable."""
  return sorted(examples, key=lambda e: -layout.sequence_lengths(e, 'prefix_shared')[0])


def count_rows(lengths: Sequence[int], seq_len: int) -> int:
  """Rows first-fit placement needs for sequences of ``lengths`` (in order)."""
  free: list[int] = []
  for n in lengths:
    for r, room in enumerate(free):
      if room >= n:
        free[r] -= n
        break
    else:
      free.append(seq_len - n)
  return len(free)


def packed_shape(step_lengths: Sequence[Sequence[int]], *, multiple: int,
                 max_factor: float, cost) -> tuple[int, int]:
  """``(seq_len, rows)`` of least ``cost(seq_len, rows)`` that fits every step."""
  longest = round_up(max(max(s) for s in step_lengths), multiple)
  best = None
  for seq_len in range(longest, int(longest * max_factor) + 1, multiple):
    rows = max(count_rows(s, seq_len) for s in step_lengths)
    candidate = (cost(seq_len, rows), seq_len, rows)
    best = candidate if best is None or candidate < best else best
  return best[1], best[2]


def make_cost(cfg: model_lib.ModelConfig):
  """Relative step cost of ``rows x seq_len`` rows (FLOPs per forward).

  Padded tokens cost the matmuls; the dense ``xla`` attention also costs
  every (query, key) pair of a row (block-sparse impls skip empty tiles, so
  their attention cost follows the real tokens and is left out here).
  """
  per_token = 2 * (cfg.num_params() - cfg.vocab_size * cfg.hidden_size
                   * (1 if cfg.tie_embeddings else 2))
  per_pair = 4 * cfg.num_heads * cfg.head_dim * cfg.num_layers
  dense = cfg.attention_impl == 'xla'

  def cost(seq_len: int, rows: int) -> float:
    return rows * seq_len * (per_token + (per_pair * seq_len if dense else 0))

  return cost


def make_plans(steps: Sequence[Sequence[layout.Example]], modes: Sequence[str],
               cfg: model_lib.ModelConfig, *, seq_multiple: int = 16,
               max_pack_factor: float = 4.0, max_targets: bool = True,
               exact_tile_budget: bool = True, chunk: int = 512) -> dict[str, Plan]:
  """The plan of every mode for the same examples per step.

  Args:
    steps: the examples of each step (same count per step).
    modes: names from :data:`config.MODES`.
    cfg: the model (cost model, attention impl).
    seq_multiple: row lengths are multiples of this.
    max_pack_factor: packed row lengths tried, up to this x the longest.
    max_targets: compact the scored tokens to a static budget.
    exact_tile_budget: for ``xla_blocked``, budget the batches' tiles exactly.
    chunk: most tokens per log-prob chunk; with ``max_targets`` the chunks
      are sized so that they tile the budget with < 16 tokens to spare.
  """
  pairs = len(steps[0])
  steps = [order_longest_first(s) for s in steps]
  cost = make_cost(cfg)
  plans = {}
  for mode in modes:
    lay, pack = config_lib.mode_layout(mode)
    lengths = [[n for e in s for n in layout.sequence_lengths(e, lay)] for s in steps]
    per_example = 1 if lay == 'prefix_shared' else max(len(e.responses) for s in steps for e in s)
    if pack:
      seq_len, rows = packed_shape(lengths, multiple=seq_multiple,
                                   max_factor=max_pack_factor, cost=cost)
    else:
      seq_len = round_up(max(max(s) for s in lengths), seq_multiple)
      rows = pairs * per_example
    batches = tuple(layout.build_batch(s, layout=lay, seq_len=seq_len, num_rows=rows,
                                       max_examples=pairs, num_responses=2, pack=pack)
                    for s in steps)
    targets, chunk_size = None, chunk
    if max_targets:
      most = max(int((b['target_slot'] >= 0).sum()) for b in batches)
      chunks = -(-most // chunk)
      chunk_size = round_up(-(-most // chunks), 16)
      targets = chunks * chunk_size
    tiles = None
    if exact_tile_budget and cfg.attention_impl == 'xla_blocked':
      tiles = max(attention.count_tiles(b['segment_ids'], b['branch_ids']) for b in batches)
    plans[mode] = Plan(mode, lay, pack, seq_len, rows, pairs, targets, chunk_size, tiles,
                       batches)
  return plans
