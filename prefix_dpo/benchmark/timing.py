"""Compiling and timing the trainer's DPO step per mode, interleaved.

The step is :func:`prefix_dpo.train_step.make_train_step` -- the function the
trainer jits: policy forward and backward, the reference forward (when the
loss uses one) and the optimiser update -- jitted with the state donated, as
in ``prefix_dpo/train.py``. Each mode is lowered and compiled once ahead of
time (compile seconds measured separately); the timed calls go to the
compiled executable, which cannot retrace, so no step recompiles. Batches are
on the device before timing: host-side layout is the data pipeline's job.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from prefix_dpo import attention, model as model_lib, optim, train_step
from prefix_dpo.benchmark.plan import Plan


@dataclasses.dataclass
class ModeRun:
  """One mode: its plan, compiled step, state and measurements."""
  plan: Plan
  settings: train_step.StepSettings
  compiled: Any
  state: dict
  batches: list[dict[str, jax.Array]]
  compile_seconds: float
  memory: dict[str, int]
  times: list[float] = dataclasses.field(default_factory=list)      # wall seconds
  cpu_times: list[float] = dataclasses.field(default_factory=list)  # process CPU seconds


def init_params(cfg: model_lib.ModelConfig, seed: int):
  """``(graphdef, params)`` of a freshly initialised decoder."""
  graphdef, params = nnx.split(model_lib.Decoder(cfg, rngs=nnx.Rngs(seed)))
  return graphdef, nnx.to_pure_dict(params)


def memory_of(compiled) -> dict[str, int]:
  """XLA's buffer assignment of an executable: the step's peak memory.

  ``peak_bytes`` = arguments + outputs - donated aliases + temporaries: exact
  for the executable on every backend, and per mode (a process-wide RSS or
  allocator high-water mark cannot separate interleaved modes).
  """
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {'peak_bytes': -1, 'temp_bytes': -1}
  peak = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
          - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
  return {'peak_bytes': int(peak), 'temp_bytes': int(analysis.temp_size_in_bytes)}


def _settings(graphdef, plan: Plan, c: ml_collections.ConfigDict) -> train_step.StepSettings:
  return train_step.StepSettings(graphdef=graphdef, loss=c.loss,
                                 reference_mode=c.reference_mode,
                                 chunk_size=plan.chunk_size, max_targets=plan.max_targets)


def compile_modes(plans: dict[str, Plan], graphdef, params, tx, reference_params,
                  c: ml_collections.ConfigDict) -> dict[str, ModeRun]:
  """Lowers and compiles the train step of every mode; puts its batches on device."""
  runs = {}
  for mode, plan in plans.items():
    settings = _settings(graphdef, plan, c)
    step = jax.jit(train_step.make_train_step(settings, tx), donate_argnums=(0,))
    state = {'params': jax.tree.map(jnp.copy, params), 'opt_state': tx.init(params),
             'step': jnp.zeros((), jnp.int32)}
    batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in plan.batches]
    start = time.perf_counter()
    with attention.tile_budget(plan.max_tiles):  # read while tracing
      compiled = step.lower(state, batches[0], reference_params).compile()
    seconds = time.perf_counter() - start
    runs[mode] = ModeRun(plan, settings, compiled, state, batches, seconds,
                         memory_of(compiled))
  return runs


def time_interleaved(runs: dict[str, ModeRun], reference_params, *, rounds: int,
                     warmup: int) -> None:
  """Runs A B C D A B C D ...: round ``r`` times every mode on batch ``r``.

  ``warmup`` untimed rounds come first (first-call allocation, caches). Wall
  time is the measure; the process's CPU time is kept too: on a shared
  machine it is barely moved by other processes' load.
  """
  for r in range(warmup + rounds):
    for run in runs.values():
      batch = run.batches[r % len(run.batches)]
      start, cpu = time.perf_counter(), time.process_time()
      run.state, _ = run.compiled(run.state, batch, reference_params)
      jax.block_until_ready(run.state)
      if r >= warmup:
        run.times.append(time.perf_counter() - start)
        run.cpu_times.append(time.process_time() - cpu)


def profile_modes(runs: dict[str, ModeRun], reference_params) -> dict[str, dict | None]:
  """One profiled step per mode: seconds per op category (see :mod:`.profile`)."""
  from prefix_dpo.benchmark import profile  # pylint: disable=g-import-not-at-top
  out = {}
  for mode, run in runs.items():
    def call(run=run):
      run.state, _ = run.compiled(run.state, run.batches[0], reference_params)
      return run.state
    out[mode] = profile.profile_call(run.compiled, call)
  return out


def response_logprobs(runs: dict[str, ModeRun], params) -> dict[str, np.ndarray]:
  """Per-response log-probs ``[examples, 2]`` of each mode on its first batch.

  Uses the trainer's reference step (the same ``model_logprobs`` path as the
  loss) with the same parameters for every mode; empty slots are NaN.
  """
  out = {}
  for mode, run in runs.items():
    fn = jax.jit(train_step.make_reference_step(run.settings))
    with attention.tile_budget(run.plan.max_tiles):
      logps = np.asarray(fn(params, run.batches[0]), np.float64)
    out[mode] = np.where(run.plan.batches[0]['response_mask'], logps, np.nan)
  return out


def response_lengths(batch: dict[str, np.ndarray]) -> np.ndarray:
  """Scored tokens of every response slot ``[examples, responses]``."""
  shape = batch['response_mask'].shape
  slots = batch['target_slot'][batch['target_slot'] >= 0]
  return np.bincount(slots, minlength=shape[0] * shape[1]).reshape(shape)


def max_difference(logps: dict[str, np.ndarray], lengths: np.ndarray,
                   baseline: str = 'paired') -> dict[str, dict[str, float]]:
  """Largest difference from ``baseline`` over real responses, per mode.

  ``abs``: of the summed log-probs; ``per_token``: divided by the response's
  scored tokens (the tolerance of ``prefix_dpo.verify``: float32 rounding of a
  sum grows with its length).
  """
  base = logps.get(baseline)
  if base is None:
    return {}
  out = {}
  for mode, values in logps.items():
    diff = np.abs(values - base)
    out[mode] = {'abs': float(np.nanmax(diff)),
                 'per_token': float(np.nanmax(diff / np.maximum(lengths, 1)))}
  return out


def make_optimizer(c: ml_collections.ConfigDict, total_steps: int):
  return optim.make_optimizer(c.optimizer, total_steps)


def device_info() -> dict[str, Any]:
  """Backend, device kind and the allocator's stats where the backend has them."""
  device = jax.devices()[0]
  info = {'backend': jax.default_backend(), 'device_kind': device.device_kind,
          'device_count': jax.device_count(), 'jax': jax.__version__}
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats:
    info['device_peak_bytes_in_use'] = int(stats.get('peak_bytes_in_use', -1))
  return info


def median(values: Sequence[float]) -> float:
  return float(np.median(values)) if len(values) else float('nan')
