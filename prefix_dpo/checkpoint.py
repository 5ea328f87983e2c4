"""Checkpoints with orbax's CheckpointManager: train state, data state, config.

A checkpoint holds three items: ``state`` (params, optimiser state, step; a
pytree of sharded arrays, saved asynchronously), ``data`` (the data iterator's
JSON state) and ``config`` (the run's config as JSON, so a workdir is
self-describing: :func:`load_policy` rebuilds the trained module from it, a
:class:`~prefix_dpo.model.Decoder` or, for reward-model runs, a
:class:`~prefix_dpo.reward_model.RewardModel`).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from prefix_dpo import losses, model as model_lib
from prefix_dpo import reward_model as reward_model_lib

CHECKPOINT_DIR = 'checkpoints'


class Checkpointer:
  """Saves and restores training checkpoints under ``workdir/checkpoints``."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3, asynchronous: bool = True):
    self.manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=asynchronous))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: Any,
           config: ml_collections.ConfigDict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config.to_dict())))

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
    """Restores ``(state, data_state)``; ``abstract_state`` gives shardings."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored.state, restored.data

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def restore_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The config saved with a checkpoint (the latest by default)."""
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {workdir}/{CHECKPOINT_DIR}')
  config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
  manager.close()
  return ml_collections.ConfigDict(config)


def trained_module_type(config: ml_collections.ConfigDict
                        ) -> type[model_lib.Decoder] | type[reward_model_lib.RewardModel]:
  """The module a run trains: a RewardModel for reward-model losses, else a Decoder."""
  return (reward_model_lib.RewardModel if losses.is_reward_model(config.loss)
          else model_lib.Decoder)


def load_policy(workdir: str, step: int | None = None
                ) -> tuple[model_lib.Decoder | reward_model_lib.RewardModel,
                           ml_collections.ConfigDict]:
  """The trained module of a workdir's checkpoint (latest by default), on host devices.

  A Decoder, or a RewardModel (backbone and value head) when the run's loss
  trains a reward model; both take ``(cfg, rngs=...)``, so one abstract
  module gives the restore target for either.
  """
  config = restore_config(workdir, step)
  model_cfg = model_lib.ModelConfig.from_dict(
      {k: v for k, v in config.model.to_dict().items() if k != 'hf_path'})
  module_type = trained_module_type(config)
  abstract = nnx.eval_shape(lambda: module_type(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(abstract, nnx.Param)
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {'params': jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      nnx.to_pure_dict(params))}
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True)))
  manager.close()
  nnx.replace_by_pure_dict(params, restored.state['params'])
  return nnx.merge(graphdef, params), config
