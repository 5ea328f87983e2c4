"""Precomputed reference log-probs, cached on disk in the workdir.

With ``reference.mode='precomputed'`` one pass over the training data computes
every example's reference log-probs (prefix-shared, like training) before the
first step; training then reads them by example id and never runs the
reference model. Each process caches its own data share, per split (train and eval).
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Mapping

import jax
import numpy as np

MODES = ('model', 'precomputed', 'none')


def cache_path(workdir: str, split: str) -> str:
  """Example ids are per split, so each split (and process) has its own file."""
  return os.path.join(workdir, 'reference_logps', f'{split}_process_{jax.process_index()}.npz')


class ReferenceCache:
  """Example id -> ``[num_responses]`` float32 reference log-probs."""

  def __init__(self, ids: np.ndarray, logps: np.ndarray):
    order = np.argsort(ids)
    self.ids, self.logps = ids[order], logps[order]

  @classmethod
  def compute(cls, batches: Iterable[Mapping[str, np.ndarray]],
              logps_fn: Callable[[Mapping[str, np.ndarray]], np.ndarray]) -> 'ReferenceCache':
    """Runs ``logps_fn`` (``batch -> [examples, responses]``) over one pass."""
    ids, logps = [], []
    for batch in batches:
      values = np.asarray(logps_fn(batch))
      valid = batch['example_id'] >= 0
      ids.append(batch['example_id'][valid])
      logps.append(values[valid])
    return cls(np.concatenate(ids), np.concatenate(logps).astype(np.float32))

  def save(self, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + '.tmp.npz'
    np.savez(tmp, ids=self.ids, logps=self.logps)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> 'ReferenceCache':
    with np.load(path) as data:
      return cls(data['ids'], data['logps'])

  def lookup(self, example_ids: np.ndarray) -> np.ndarray:
    """``[examples, responses]`` log-probs; empty slots (id -1) get zeros."""
    index = np.clip(np.searchsorted(self.ids, example_ids), 0, len(self.ids) - 1)
    found = self.ids[index] == example_ids
    valid = example_ids >= 0
    if np.any(valid & ~found):
      missing = example_ids[valid & ~found][:5].tolist()
      raise KeyError(f'reference log-probs missing for example ids {missing}: the '
                     'cache does not match the data; delete the workdir\'s '
                     'reference_logps/ to recompute it')
    return np.where(valid[:, None], self.logps[index], 0.0).astype(np.float32)
