"""Preference training: ``python -m prefix_dpo.train --config configs/tiny.py --workdir DIR``.

One ``jax.jit`` train step with input/output shardings over a (data, fsdp,
tensor) mesh; the reference model runs inside it (or its log-probs are
precomputed, or it is skipped for reference-free losses). Checkpoints (orbax)
resume automatically; SIGTERM saves and exits; a non-finite loss stops the run
and keeps the last good checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from typing import Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags

from prefix_dpo import checkpoint as checkpoint_lib
from prefix_dpo import config as config_lib
from prefix_dpo import layout as layout_lib
from prefix_dpo import losses, metrics as metrics_lib, model as model_lib, optim
from prefix_dpo import reference as reference_lib, sharding, train_step as step_lib
from prefix_dpo.data import pipeline


class NonFiniteLossError(RuntimeError):
  pass


def initialize_distributed(c: ml_collections.ConfigDict) -> None:
  """``jax.distributed.initialize`` when enabled (auto-detects pods and SLURM)."""
  if not c.enabled:
    return
  kwargs = {}
  if c.coordinator_address:
    kwargs = dict(coordinator_address=c.coordinator_address,
                  num_processes=c.num_processes, process_id=c.process_id)
  # Cross-process collectives of the CPU backend (multi-process CPU runs and
  # tests); the GPU/TPU backends ignore it. (Asking jax.default_backend() here
  # would start the backend before initialize(), which must come first.)
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kwargs)


class Run:
  """Everything one training run holds: data, model, step functions, writers."""

  def __init__(self, c: ml_collections.ConfigDict, workdir: str):
    config_lib.validate(c)
    self.c, self.workdir = c, workdir
    self.processes, self.process = jax.process_count(), jax.process_index()
    for name in ('rows', 'max_examples'):
      if c.batch[name] % self.processes:
        raise ValueError(f'config: batch.{name}={c.batch[name]} is not divisible by '
                         f'{self.processes} processes')
    self.local_rows = c.batch.rows // self.processes
    self.local_examples = c.batch.max_examples // self.processes
    if c.model.hf_path and c.data.tokenizer == 'byte':
      c.data.tokenizer = c.model.hf_path  # one path for weights and tokenizer
    # Data first: a missing file fails before anything is written.
    self.tokenizer = pipeline.make_tokenizer(c.data)
    self.train_data = self._batches('train', num_epochs=None)
    self.model_cfg = config_lib.model_config(c, self.tokenizer.vocab_size)
    config_lib.record_model_config(c, self.model_cfg)
    self.mesh = sharding.make_mesh(c.mesh.to_dict())
    for name in ('rows', 'max_examples'):
      data_ways = self.mesh.shape['data'] * self.mesh.shape['fsdp']
      if c.batch[name] % data_ways:
        raise ValueError(f'config: batch.{name}={c.batch[name]} is not divisible by '
                         f'the data x fsdp mesh size {data_ways}')
    self.reference_mode = 'none' if not losses.uses_reference(c.loss) else c.reference.mode
    max_targets = None
    if c.train.max_target_fraction > 0:
      max_targets = int(math.ceil(c.train.max_target_fraction * c.batch.rows * c.seq_len))
    self._build_model(max_targets)

  # -- data -----------------------------------------------------------------
  def _batches(self, split: str, num_epochs: int | None):
    c = self.c
    return pipeline.make_batch_iterator(
        c.data, split=split, tokenizer=self.tokenizer, layout=c.layout, seq_len=c.seq_len,
        rows=self.local_rows, max_examples=self.local_examples,
        num_responses=c.num_responses, pack=c.pack, seed=c.seed, num_epochs=num_epochs,
        shard_index=self.process, shard_count=self.processes)

  def device_batch(self, local: Mapping[str, np.ndarray],
                   split: str = 'train') -> dict[str, jax.Array]:
    """Host batch -> global sharded arrays (adds precomputed reference log-probs)."""
    local = dict(local)
    example_ids = local.pop('example_id')
    if self.reference_mode == 'precomputed':
      local['reference_logps'] = self.reference_caches[split].lookup(example_ids)
    local = layout_lib.offset_slots(local, row_offset=self.process * self.local_rows,
                                    example_offset=self.process * self.local_examples)
    return sharding.global_batch(local, self.mesh)

  # -- model and steps ------------------------------------------------------
  def _build_model(self, max_targets: int | None) -> None:
    c, cfg = self.c, self.model_cfg
    module_type = checkpoint_lib.trained_module_type(c)
    if c.model.hf_path:
      from prefix_dpo import hf_interop  # pylint: disable=g-import-not-at-top
      module = hf_interop.load_pretrained(c.model.hf_path, cfg, mesh=self.mesh)
      if module_type is not model_lib.Decoder:  # a new value head on the pretrained model
        module = module_type.from_decoder(module, rngs=nnx.Rngs(c.seed))
    else:
      module = sharding.create_sharded(lambda: module_type(cfg, rngs=nnx.Rngs(c.seed)),
                                       self.mesh)
    graphdef, params = nnx.split(module)
    params = nnx.to_pure_dict(params)
    self.settings = step_lib.StepSettings(
        graphdef=graphdef, loss=c.loss, reference_mode=self.reference_mode,
        chunk_size=c.train.logprob_chunk, max_targets=max_targets)
    self.tx = optim.make_optimizer(c.optimizer, c.train.steps)
    # Optimiser moments shard like their parameters; counters are replicated.
    opt_shardings = optax.tree_map_params(
        self.tx, lambda _, param_sharding: param_sharding, jax.eval_shape(self.tx.init, params),
        jax.tree.map(lambda x: x.sharding, params),
        transform_non_params=lambda _: sharding.replicated(self.mesh))
    opt_state = jax.jit(self.tx.init, out_shardings=opt_shardings)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(self.mesh))
    self.state = {'params': params, 'opt_state': opt_state, 'step': step}
    # The frozen reference: a copy, so donating the state never frees it.
    self.reference_params = (jax.tree.map(jnp.copy, params)
                             if self.reference_mode in ('model', 'precomputed') else None)
    self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
    # Inputs arrive committed to their shardings (state built sharded, batches
    # assembled by sharding.global_batch); the state keeps its layout across steps.
    self.train_step = _under_mesh(self.mesh, jax.jit(
        step_lib.make_train_step(self.settings, self.tx),
        out_shardings=(self.state_shardings, None), donate_argnums=(0,)))
    self.eval_step = _under_mesh(self.mesh, jax.jit(step_lib.make_eval_step(self.settings)))
    self.reference_step = _under_mesh(
        self.mesh, jax.jit(step_lib.make_reference_step(self.settings)))
    self.reference_caches: dict[str, reference_lib.ReferenceCache] = {}

  # -- phases ---------------------------------------------------------------
  def prepare_reference(self) -> None:
    """Loads or computes the reference caches of both splits; drops the reference model."""
    if self.reference_mode != 'precomputed':
      return

    def logps_fn(batch):
      batch = {k: v for k, v in batch.items() if k != 'example_id'}
      logps = self.reference_step(self.reference_params, sharding.global_batch(batch, self.mesh))
      if self.processes > 1:
        logps = multihost_utils.process_allgather(logps, tiled=True)
      own = slice(self.process * self.local_examples, (self.process + 1) * self.local_examples)
      return np.asarray(logps)[own]

    for split in ('train', 'eval'):
      path = reference_lib.cache_path(self.workdir, split)
      if os.path.exists(path):
        self.reference_caches[split] = reference_lib.ReferenceCache.load(path)
      else:
        self.reference_caches[split] = reference_lib.ReferenceCache.compute(
            (batch for batch, _ in self._one_pass(split)), logps_fn)
        self.reference_caches[split].save(path)
    self.reference_params = None  # training never runs the reference model

  def evaluate(self) -> dict[str, float]:
    """Mean metrics over the held-out split (weighted by pairs per global batch)."""
    totals: dict[str, float] = {}
    weight = 0.0
    for i, (batch, pairs) in enumerate(self._one_pass('eval')):
      if self.c.train.eval_batches and i >= self.c.train.eval_batches:
        break
      if pairs == 0:
        continue
      values = jax.device_get(self.eval_step(
          self.state['params'], self.device_batch(batch, 'eval'), self.reference_params))
      for key, value in values.items():
        totals[key] = totals.get(key, 0.0) + float(value) * pairs
      weight += pairs
    return {f'eval/{k}': v / max(weight, 1.0) for k, v in totals.items()}

  def _one_pass(self, split: str) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """One pass over ``split``: ``(local batch, pairs in the global batch)``.

    Processes can hold different numbers of batches (their shares differ by a
    record); every step is collective, so a process that has run out feeds
    empty batches until all have.
    """
    batches = self._batches(split, num_epochs=1)
    empty = None
    while True:
      batch = next(batches, None)
      pairs = 0 if batch is None else metrics_lib.batch_stats(batch)['pairs']
      if self.processes > 1:
        counts = multihost_utils.process_allgather(np.array([batch is not None, pairs]))
        if not counts[:, 0].any():
          return
        pairs = int(counts[:, 1].sum())
        if batch is None:
          empty = empty or self._empty_batch()
          batch = empty
      elif batch is None:
        return
      yield batch, pairs

  def _empty_batch(self) -> dict[str, np.ndarray]:
    """A batch of padding only (static shapes, no examples)."""
    c = self.c
    batch = layout_lib.build_batch([], layout=c.layout, seq_len=c.seq_len,
                                   num_rows=self.local_rows, max_examples=self.local_examples,
                                   num_responses=c.num_responses, pack=c.pack)
    batch['example_id'] = np.full((self.local_examples,), -1, np.int64)
    return batch


def _under_mesh(mesh, fn):
  """Runs ``fn`` with ``mesh`` as the context mesh (the Pallas attention's shard_map uses it)."""
  def wrapped(*args):
    with jax.set_mesh(mesh):
      return fn(*args)
  return wrapped


def train_and_evaluate(c: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains per config ``c`` in ``workdir``; returns the last logged metrics."""
  run = Run(c, workdir)
  os.makedirs(workdir, exist_ok=True)
  checkpointer = checkpoint_lib.Checkpointer(workdir, max_to_keep=c.train.keep_checkpoints)
  start = checkpointer.latest_step() or 0
  if start:
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            run.state, run.state_shardings)
    run.state, data_state = checkpointer.restore(start, abstract)
    run.train_data.set_state(data_state)
  run.prepare_reference()
  writer = metrics_lib.MetricsWriter(
      workdir, tensorboard=c.logging.tensorboard, wandb_project=c.logging.wandb_project,
      config=c.to_dict(), resume_step=start)
  if run.process == 0:
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      json.dump(c.to_dict(), f, indent=2, default=str)
  stop = {'signal': None}
  previous = signal.signal(signal.SIGTERM, lambda sig, frame: stop.update(signal=sig))
  peak = metrics_lib.peak_flops_per_device()
  progress = _progress(c, start, run.process)
  last: dict[str, float] = {}
  with_reference = run.reference_mode == 'model'
  accum = c.optimizer.grad_accum_steps
  window = {'tokens': 0, 'pairs': 0, 'flops': 0.0, 'time': 0.0, 'steps': 0}
  try:
    for step in range(start, c.train.steps):
      if stop['signal'] is not None:
        _save(checkpointer, run, step, c)
        checkpointer.wait()
        print(f'received signal {stop["signal"]}: saved checkpoint {step}, exiting',
              file=sys.stderr)
        break
      t0 = time.perf_counter()
      for _ in range(accum):
        host_batch = next(run.train_data)
        stats = metrics_lib.batch_stats(host_batch)
        run.state, step_metrics = run.train_step(run.state, run.device_batch(host_batch),
                                                 run.reference_params)
        window['tokens'] += stats['tokens']
        window['pairs'] += stats['pairs']
        window['flops'] += metrics_lib.train_flops(run.model_cfg, stats,
                                                   with_reference=with_reference)
      jax.block_until_ready(run.state['step'])
      window['time'] += time.perf_counter() - t0
      window['steps'] += 1
      done = step + 1
      logged = done % c.train.log_every == 0 or done == c.train.steps
      saving = c.train.checkpoint_every and done % c.train.checkpoint_every == 0
      evaluating = c.train.eval_every and done % c.train.eval_every == 0
      if logged or saving or evaluating:
        values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        if not math.isfinite(values['loss']):
          raise NonFiniteLossError(
              f'non-finite loss {values["loss"]} at step {done}; stopping. The last good '
              f'checkpoint is step {checkpointer.latest_step()} in {workdir}')
        if logged:
          seconds = max(window['time'], 1e-9)
          values.update(
              step_time=seconds / window['steps'],
              tokens_per_sec=window['tokens'] / seconds,
              pairs_per_sec=window['pairs'] / seconds,
              model_tflops_per_sec=window['flops'] / seconds / 1e12,
              learning_rate=float(optim.learning_rate_schedule(c.optimizer, c.train.steps)(step)))
          if peak:
            values['mfu'] = window['flops'] / seconds / (peak * jax.device_count())
          window = dict.fromkeys(window, 0)
        if evaluating:
          values.update(run.evaluate())
        if logged or evaluating:
          writer.write(done, values)
          last = values
          progress.set_postfix(loss=f'{values["loss"]:.4f}',
                               acc=f'{values.get("rewards/accuracies", float("nan")):.2f}')
        if saving:
          _save(checkpointer, run, done, c)
      progress.update(1)
    else:  # finished without a stop signal: final evaluation and checkpoint
      evaluated = c.train.eval_every and c.train.steps % c.train.eval_every == 0
      final = {} if evaluated and start < c.train.steps else run.evaluate()
      if final:
        writer.write(c.train.steps, final)
        last = {**last, **final}
      _save(checkpointer, run, c.train.steps, c)
  finally:
    signal.signal(signal.SIGTERM, previous)
    progress.close()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
  return last


def _save(checkpointer: checkpoint_lib.Checkpointer, run: Run, step: int,
          c: ml_collections.ConfigDict) -> None:
  if checkpointer.latest_step() == step:
    return
  checkpointer.save(step, run.state, run.train_data.get_state(), c)


def _progress(c: ml_collections.ConfigDict, start: int, process: int):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=c.train.steps, initial=start, desc='train', unit='step',
              disable=not c.logging.progress_bar or process != 0, dynamic_ncols=True)


_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError('--config and --workdir are required')
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  config = config_lib.load_config_flag(_CONFIG.value)
  initialize_distributed(config.distributed)
  try:
    final = train_and_evaluate(config, _WORKDIR.value)
  except (ValueError, FileNotFoundError, KeyError, NonFiniteLossError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  if jax.process_index() == 0:
    print(json.dumps({k: round(v, 6) for k, v in final.items()}, sort_keys=True))


if __name__ == '__main__':
  app.run(main, flags_parser=config_lib.parse_flags)
