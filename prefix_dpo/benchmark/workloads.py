"""Benchmark workloads: synthetic examples shaped like the paper's data sets.

Each of the paper's six data sets (Wang & Hegde 2024, table 1) is summarised
by two numbers: the median length of a whole example (prompt + chosen +
rejected) and the ratio of the median prompt length to the median response
length. A workload draws prompt and response lengths from log-normal
distributions with those medians (responses of one example correlated, as
chosen and rejected answers to one prompt are), truncates the tail as trainers
do with ``max_length``, then rescales so the realised median total equals the
target. ``length_scale`` shrinks every length by the same factor for CPU runs:
the prompt/response ratio -- which sets the ideal speedup -- is unchanged.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from prefix_dpo import layout


@dataclasses.dataclass(frozen=True)
class PaperRow:
  """One data set of the paper: statistics and reported speedups vs FA3."""
  name: str
  median_len: int
  prefix_ratio: float     # median prompt length / median response length
  speedup: float          # Flex + prefix sharing vs FA3, no packing
  speedup_packed: float   # the same with packing (baselines packed too)


PAPER = {r.name: r for r in (
    PaperRow('capybara', 1160, 1.59, 1.42, 1.34),
    PaperRow('hh_rlhf', 186, 2.15, 1.07, 1.41),
    PaperRow('metamath', 872, 3.91, 1.38, 1.57),
    PaperRow('tldr', 416, 11.14, 1.12, 1.35),
    PaperRow('tulu_helpsteer', 775, 6.34, 1.47, 1.48),
    PaperRow('ultrafeedback', 409, 0.42, 1.11, 1.17),
)}
NAMES = tuple(PAPER)


def token_ideal(prefix_ratio: float) -> float:
  """Paired / prefix-shared token count at the medians: (2P + 2C) / (P + 2C)."""
  return (2 * prefix_ratio + 2) / (prefix_ratio + 2)


def synthetic_examples(name: str, num_examples: int, *, length_scale: float = 1.0,
                       vocab_size: int = 512, prompt_sigma: float = 0.6,
                       response_sigma: float = 0.5, response_corr: float = 0.5,
                       max_factor: float = 2.5, seed: int = 0) -> list[layout.Example]:
  """Random examples with the paper's median length and prefix ratio.

  Args:
    name: a key of :data:`PAPER`.
    num_examples: how many (prompt, chosen, rejected) examples.
    length_scale: every length is multiplied by this (CPU runs use < 1).
    vocab_size: token ids are drawn uniformly from ``[1, vocab_size)``.
    prompt_sigma, response_sigma: log-normal spreads (log space).
    response_corr: correlation of chosen and rejected log-lengths.
    max_factor: lengths are truncated at this multiple of their median.
    seed: numpy seed.
  Returns:
    ``num_examples`` examples with two responses each.
  """
  row = PAPER[name]
  rng = np.random.default_rng(seed)
  total = row.median_len * length_scale
  response_median = total / (row.prefix_ratio + 2)
  prompt_median = row.prefix_ratio * response_median
  prompt = prompt_median * np.exp(prompt_sigma * rng.standard_normal(num_examples))
  shared = rng.standard_normal(num_examples)
  responses = [response_median * np.exp(response_sigma * (
      np.sqrt(response_corr) * shared
      + np.sqrt(1 - response_corr) * rng.standard_normal(num_examples)))
               for _ in range(2)]
  prompt = np.minimum(prompt, max_factor * prompt_median)
  responses = [np.minimum(r, max_factor * response_median) for r in responses]
  # Sampling noise and the spread move the medians: pin the prompt/response
  # ratio of medians, then the median total.
  prompt = prompt * (row.prefix_ratio * np.median(np.concatenate(responses))
                     / np.median(prompt))
  factor = total / np.median(prompt + responses[0] + responses[1])
  lengths = [np.maximum(1, np.round(x * factor)).astype(int)
             for x in (prompt, *responses)]
  return [layout.Example(prompt=rng.integers(1, vocab_size, p).tolist(),
                         responses=[rng.integers(1, vocab_size, c).tolist(),
                                    rng.integers(1, vocab_size, r).tolist()])
          for p, c, r in zip(*lengths)]


def length_stats(examples: list[layout.Example]) -> dict[str, float]:
  """Realised medians: whole example, prompt/response ratio, token ideal."""
  prompts = np.array([len(e.prompt) for e in examples])
  responses = np.array([len(r) for e in examples for r in e.responses[:2]])
  totals = np.array([len(e.prompt) + sum(len(r) for r in e.responses) for e in examples])
  paired = sum(len(r) + len(e.prompt) for e in examples for r in e.responses)
  return {
      'median_len': float(np.median(totals)),
      'prefix_ratio': float(np.median(prompts) / np.median(responses)),
      'max_len': int(totals.max()),
      'token_ratio': float(paired / totals.sum()),
  }


def examples_from_batch(batch: dict[str, np.ndarray]) -> list[layout.Example]:
  """The examples of an unpacked ``prefix_shared`` batch (one example per row)."""
  out = []
  for row in range(batch['input_ids'].shape[0]):
    ids, seg, br = (batch[k][row] for k in ('input_ids', 'segment_ids', 'branch_ids'))
    if not (seg > 0).any():
      continue
    real = seg > 0
    responses = [ids[real & (br == k)].tolist() for k in range(1, int(br.max()) + 1)]
    out.append(layout.Example(prompt=ids[real & (br == 0)].tolist(), responses=responses))
  return out


def file_examples(data_cfg, num_examples: int, *, seq_len: int, seed: int = 0
                  ) -> tuple[list[layout.Example], int]:
  """``num_examples`` examples read, tokenised and truncated by the data pipeline.

  Returns the examples and the tokenizer's vocabulary size. The pipeline lays
  them out (``prefix_shared``, one per row); they are read back from its
  batches so that every mode can lay out the same examples.
  """
  from prefix_dpo.data import pipeline  # pylint: disable=g-import-not-at-top
  tokenizer = pipeline.make_tokenizer(data_cfg)
  batches = pipeline.make_batch_iterator(
      data_cfg, split='train', tokenizer=tokenizer, layout='prefix_shared',
      seq_len=seq_len, rows=num_examples, max_examples=num_examples, num_responses=2,
      pack=False, seed=seed, num_epochs=None)
  examples: list[layout.Example] = []
  while len(examples) < num_examples:
    examples += [e for e in examples_from_batch(next(batches)) if len(e.responses) == 2]
  batches.close()
  return examples[:num_examples], tokenizer.vocab_size
