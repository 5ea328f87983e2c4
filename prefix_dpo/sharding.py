"""Device mesh and logical-axis sharding rules.

Parameters carry logical axis names (see :mod:`prefix_dpo.model`); the rules
here map them onto the mesh axes ``data``, ``fsdp`` and ``tensor``. A mesh axis
is dropped from a dimension it does not divide (e.g. 8 KV heads on a tensor
axis of 16), so any model runs on any mesh, replicated where it must be.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# logical axis -> mesh axes (in order of preference).
LOGICAL_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ('batch', BATCH_AXES),
    ('vocab', ('tensor',)),
    ('embed', ('fsdp',)),
    ('mlp', ('tensor',)),
    ('heads', ('tensor',)),
    ('kv_heads', ('tensor',)),
    ('head_dim', ()),
)


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves axis sizes (``-1`` = the rest of the devices) in MESH_AXES order."""
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f'unknown mesh axes {unknown}; expected {MESH_AXES}')
  shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
  if shape.count(-1) > 1:
    raise ValueError(f'at most one mesh axis may be -1, got {dict(sizes)}')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f'mesh {dict(sizes)} does not divide {num_devices} devices')
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} '
                     f'devices, {num_devices} are available')
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A ``Mesh`` over all (or the given) devices with axes ``data, fsdp, tensor``."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(sizes, len(devices))
  # Auto axes: the compiler propagates shardings (GSPMD, what pjit did).
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_spec(logical_axes: Sequence[str | None], shape: Sequence[int],
                 mesh: Mesh) -> P:
  """PartitionSpec for a value with ``logical_axes``; non-dividing axes dropped."""
  rules = dict(LOGICAL_RULES)
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical_axes, shape):
    axes = []
    for axis in rules.get(name, ()) if name else ():
      size = mesh.shape[axis]
      if axis in used or size == 1 or dim % (math.prod(mesh.shape[a] for a in axes) * size):
        continue
      axes.append(axis)
    used.update(axes)
    spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh) -> Any:
  """NamedShardings for an (abstract) NNX state from each Variable's axes."""
  def one(variable):
    axes = variable.get_metadata().get('out_sharding') or (None,) * variable.ndim
    return NamedSharding(mesh, logical_spec(axes, variable.shape, mesh))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch/rows) dimension over the data axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def create_sharded(build: Any, mesh: Mesh) -> Any:
  """Builds an NNX module (``build()``) directly in its sharded layout.

  The module is created inside ``jax.jit`` with output shardings from its
  logical axes, so no device ever holds the full unsharded parameters.
  """
  abstract = nnx.eval_shape(build)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh)

  state = jax.jit(lambda: nnx.state(build()), out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles this process's rows of a batch into global sharded arrays.

  Each process passes its own share (``[local_rows, ...]``); the result's
  leading dimension is ``local_rows * process_count``. Example-level arrays
  (``[local_examples, ...]``) are sharded the same way.
  """
  out = {}
  for key, value in local.items():
    sharding = batch_sharding(mesh, value.ndim)
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out
