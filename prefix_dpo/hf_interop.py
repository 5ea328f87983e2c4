"""Load local Hugging Face checkpoints into :class:`prefix_dpo.model.Decoder`.

A Hugging Face model directory holds ``config.json`` and ``*.safetensors``
(several files with ``model.safetensors.index.json`` when sharded). Supported:
``LlamaForCausalLM`` (Llama 2/3.x, incl. ``rope_type='llama3'`` scaling),
``MistralForCausalLM``, ``Qwen2ForCausalLM`` (q/k/v biases) and
``Qwen3ForCausalLM`` (q/k RMSNorm); GQA, tied embeddings, ``rope_theta`` and
``rms_norm_eps`` come from ``config.json``, in its transformers 4.x
(``rope_theta``/``rope_scaling``) or 5.x (``rope_parameters``) form.

Every parameter is created directly in its target sharding with
``jax.make_array_from_callback``: each device's callback copies only its
slice of the tensor out of a memory map of the file and converts it to
``param_dtype``, so loading an 8B model never holds a full host copy, let
alone several. The files are memory-mapped rather than read with
``safe_open(framework='numpy')`` because numpy safetensors cannot represent
bfloat16, the dtype of nearly every released checkpoint.

Layouts (HF ``Linear`` weights are ``[out, in]``):

=============  ==========================  ==========================
ours           shape                       Hugging Face
=============  ==========================  ==========================
embed          [vocab_padded, d]           embed_tokens  [vocab, d]
attn.wq        [d, heads, head_dim]        q_proj        [heads*head_dim, d]
attn.wo        [heads, head_dim, d]        o_proj        [d, heads*head_dim]
attn.bq        [heads, head_dim]           q_proj.bias   [heads*head_dim]
mlp.w_gate     [d, mlp]                    gate_proj     [mlp, d]
lm_head        [d, vocab_padded]           lm_head       [vocab, d]
=============  ==========================  ==========================

Vocabulary padding (``vocab_multiple``): the padded rows of ``embed`` and
columns of ``lm_head`` are zeros; they are never looked up (token ids are
below ``vocab_size``) and ``Decoder.unembedding`` slices them off, so logits,
softmax and log-probs run over the real vocabulary exactly as without
padding, and no padded id can be sampled. Export drops them.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import struct
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from prefix_dpo import model as model_lib
from prefix_dpo import sharding as sharding_lib

log = logging.getLogger(__name__)

ARCHITECTURES = ('LlamaForCausalLM', 'MistralForCausalLM', 'Qwen2ForCausalLM',
                 'Qwen3ForCausalLM')
MODEL_TYPES = {'LlamaForCausalLM': 'llama', 'MistralForCausalLM': 'mistral',
               'Qwen2ForCausalLM': 'qwen2', 'Qwen3ForCausalLM': 'qwen3'}
# ModelConfig fields that are choices of this run, not of the checkpoint:
# load_pretrained(path, cfg) takes these from cfg and the rest from config.json.
RUNTIME_FIELDS = ('dtype', 'param_dtype', 'attention_impl', 'remat', 'vocab_multiple')
INDEX_FILE = 'model.safetensors.index.json'

# safetensors dtype name <-> numpy dtype (bfloat16 from ml_dtypes).
SAFETENSORS_DTYPES = {'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32),
                      'F16': np.dtype(np.float16),
                      'BF16': np.dtype(ml_dtypes.bfloat16)}


# -- config.json ---------------------------------------------------------------

def read_hf_config(path: str) -> dict[str, Any]:
  """``config.json`` of a Hugging Face model directory, as a dict."""
  file = os.path.join(path, 'config.json')
  if not os.path.isfile(file):
    raise FileNotFoundError(f'{path}: no config.json (expected a local Hugging '
                            'Face model directory)')
  with open(file) as f:
    return json.load(f)


def architecture_of(hf: dict[str, Any]) -> str:
  """The supported architecture named by a config dict, or a ValueError."""
  names = hf.get('architectures') or []
  if not names and hf.get('model_type'):
    names = [a for a, t in MODEL_TYPES.items() if t == hf['model_type']] or [hf['model_type']]
  arch = names[0] if names else None
  if arch not in ARCHITECTURES:
    raise ValueError(f'unsupported architecture {arch!r} in config.json; '
                     f'supported: {", ".join(ARCHITECTURES)}')
  return arch


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, float] | None]:
  """``(rope_theta, llama3 scaling or None)`` from a 4.x or 5.x config."""
  params = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  theta = float(params.get('rope_theta', hf.get('rope_theta', 10_000.0)))
  rope_type = params.get('rope_type', params.get('type', 'default'))
  if rope_type == 'default':
    return theta, None
  if rope_type == 'llama3':
    keys = ('factor', 'low_freq_factor', 'high_freq_factor',
            'original_max_position_embeddings')
    return theta, {k: params[k] for k in keys}
  raise ValueError(f'unsupported rope_type {rope_type!r} in config.json; '
                   "supported: 'default', 'llama3'")


def model_config_from_hf(path_or_config: str | dict[str, Any],
                         **overrides: Any) -> model_lib.ModelConfig:
  """The ``ModelConfig`` of a Hugging Face model directory (or config dict).

  ``overrides`` set any ``ModelConfig`` field, typically ``dtype``,
  ``param_dtype``, ``attention_impl``, ``remat`` or ``vocab_multiple``.
  Raises ValueError naming an unsupported architecture, rope type,
  activation or bias variant.
  """
  hf = (read_hf_config(path_or_config) if isinstance(path_or_config, (str, os.PathLike))
        else dict(path_or_config))
  arch = architecture_of(hf)
  act = hf.get('hidden_act', 'silu')
  if act not in ('silu', 'swish'):
    raise ValueError(f'{arch}: unsupported hidden_act {act!r}; supported: silu')
  if arch != 'Qwen2ForCausalLM' and hf.get('attention_bias'):
    raise ValueError(f'{arch}: attention_bias=true (o_proj bias) is not supported')
  if hf.get('mlp_bias'):
    raise ValueError(f'{arch}: mlp_bias=true is not supported')
  window = hf.get('sliding_window')
  if window and (arch == 'MistralForCausalLM' or hf.get('use_sliding_window')):
    log.warning('%s: sliding_window=%s is not implemented (attention is full); '
                'results equal transformers for sequences up to %s tokens',
                arch, window, window)
  theta, scaling = _rope(hf)
  heads = hf['num_attention_heads']
  values = dict(
      vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
      num_layers=hf['num_hidden_layers'], num_heads=heads,
      num_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
      mlp_dim=hf['intermediate_size'], rope_theta=theta, rope_scaling=scaling,
      rms_eps=hf.get('rms_norm_eps', 1e-6),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      qkv_bias=arch == 'Qwen2ForCausalLM', qk_norm=arch == 'Qwen3ForCausalLM')
  values.update(overrides)
  return model_lib.ModelConfig.from_dict(values)


# -- safetensors ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Entry:
  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  begin: int  # byte offsets in the file
  end: int


def read_safetensors_header(file: str) -> tuple[dict[str, Any], int]:
  """``(header, data_start)``: the JSON header and where tensor bytes begin."""
  with open(file, 'rb') as f:
    (size,) = struct.unpack('<Q', f.read(8))
    header = json.loads(f.read(size))
  return header, 8 + size


class SafetensorsDir:
  """The tensors of a model directory, memory-mapped: reads copy only a slice."""

  def __init__(self, path: str):
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
      with open(index) as f:
        files = sorted(set(json.load(f)['weight_map'].values()))
      files = [os.path.join(path, name) for name in files]
    else:
      files = sorted(glob.glob(os.path.join(path, '*.safetensors')))
    if not files:
      raise FileNotFoundError(f'{path}: no *.safetensors weights (convert .bin '
                              'checkpoints with save_pretrained(safe_serialization=True))')
    self.path = path
    self._entries: dict[str, _Entry] = {}
    self._maps: dict[str, np.memmap] = {}
    for file in files:
      header, start = read_safetensors_header(file)
      for name, info in header.items():
        if name == '__metadata__':
          continue
        if info['dtype'] not in SAFETENSORS_DTYPES:
          raise ValueError(f'{file}: tensor {name} has unsupported dtype '
                           f'{info["dtype"]}; supported: {sorted(SAFETENSORS_DTYPES)}')
        begin, end = info['data_offsets']
        self._entries[name] = _Entry(file, SAFETENSORS_DTYPES[info['dtype']],
                                     tuple(info['shape']), start + begin, start + end)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def names(self) -> list[str]:
    return sorted(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name].shape

  def tensor(self, name: str) -> np.ndarray:
    """A lazy, read-only view of one tensor; indexing it reads only that slice."""
    e = self._entries[name]
    if e.file not in self._maps:
      self._maps[e.file] = np.memmap(e.file, dtype=np.uint8, mode='r')
    raw = self._maps[e.file][e.begin:e.end]
    return raw.view(e.dtype).reshape(e.shape)


# -- parameter mapping -----------------------------------------------------------

# How each of our parameters relates to its HF tensor (see the module docstring):
# copy (same layout), linear ([in, out] = HF.T), embed/unembed (vocab rows,
# padded), heads_in / heads_out / heads_bias (the heads*head_dim dimension split).
KINDS = ('copy', 'linear', 'embed', 'unembed', 'heads_in', 'heads_out', 'heads_bias')


def param_sources(cfg: model_lib.ModelConfig) -> dict[tuple[Any, ...], tuple[str, str]]:
  """Our parameter path (as in ``nnx.to_flat_state``) -> ``(HF name, kind)``."""
  src: dict[tuple[Any, ...], tuple[str, str]] = {
      ('embed',): ('model.embed_tokens.weight', 'embed'),
      ('final_norm', 'weight'): ('model.norm.weight', 'copy'),
  }
  if not cfg.tie_embeddings:
    src[('lm_head',)] = ('lm_head.weight', 'unembed')
  for i in range(cfg.num_layers):
    ours, hf = ('layers', i), f'model.layers.{i}.'
    src[ours + ('attn_norm', 'weight')] = (hf + 'input_layernorm.weight', 'copy')
    src[ours + ('mlp_norm', 'weight')] = (hf + 'post_attention_layernorm.weight', 'copy')
    for x in 'qkv':
      src[ours + ('attn', f'w{x}')] = (hf + f'self_attn.{x}_proj.weight', 'heads_in')
      if cfg.qkv_bias:
        src[ours + ('attn', f'b{x}')] = (hf + f'self_attn.{x}_proj.bias', 'heads_bias')
    src[ours + ('attn', 'wo')] = (hf + 'self_attn.o_proj.weight', 'heads_out')
    if cfg.qk_norm:
      for x in 'qk':
        src[ours + ('attn', f'{x}_norm', 'weight')] = (hf + f'self_attn.{x}_norm.weight', 'copy')
    for ours_name, hf_name in (('w_gate', 'gate_proj'), ('w_up', 'up_proj'),
                               ('w_down', 'down_proj')):
      src[ours + ('mlp', ours_name)] = (hf + f'mlp.{hf_name}.weight', 'linear')
  return src


def hf_shape(kind: str, shape: tuple[int, ...], vocab_size: int) -> tuple[int, ...]:
  """The HF tensor shape of one of our parameters of ``shape``."""
  if kind == 'copy':
    return tuple(shape)
  if kind == 'linear':
    return tuple(shape[::-1])
  if kind == 'embed':
    return (vocab_size, shape[1])
  if kind == 'unembed':
    return (vocab_size, shape[0])
  if kind == 'heads_in':
    return (shape[1] * shape[2], shape[0])
  if kind == 'heads_out':
    return (shape[2], shape[0] * shape[1])
  if kind == 'heads_bias':
    return (shape[0] * shape[1],)
  raise ValueError(f'unknown kind {kind!r}; expected one of {KINDS}')


def _pad_to(x: np.ndarray, axis: int, size: int) -> np.ndarray:
  """Zero rows appended along ``axis`` up to ``size`` (vocab padding)."""
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return np.pad(x, widths)


def read_slice(t: np.ndarray, kind: str, index: tuple[slice, ...],
               shape: tuple[int, ...]) -> np.ndarray:
  """Our parameter's ``[index]`` (of full ``shape``), read from HF tensor ``t``.

  Only the HF rows/columns that the slice needs are touched.
  """
  bounds = []
  for s, n in zip(index, shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f'strided parameter slice {s} is not supported')
    bounds.append((start, stop))
  if kind == 'copy':
    return t[tuple(slice(a, b) for a, b in bounds)]
  if kind == 'linear':
    (i0, i1), (o0, o1) = bounds
    return t[o0:o1, i0:i1].T
  if kind == 'embed':
    (v0, v1), (d0, d1) = bounds
    return _pad_to(t[v0:min(v1, t.shape[0]), d0:d1], 0, v1 - v0)
  if kind == 'unembed':
    (d0, d1), (v0, v1) = bounds
    return _pad_to(t[v0:min(v1, t.shape[0]), d0:d1].T, 1, v1 - v0)
  if kind == 'heads_in':
    (d0, d1), (h0, h1), (k0, k1) = bounds
    hd = shape[2]
    x = t[h0 * hd:h1 * hd, d0:d1].reshape(h1 - h0, hd, d1 - d0)
    return x.transpose(2, 0, 1)[:, :, k0:k1]
  if kind == 'heads_out':
    (h0, h1), (k0, k1), (d0, d1) = bounds
    hd = shape[1]
    x = t[d0:d1, h0 * hd:h1 * hd].reshape(d1 - d0, h1 - h0, hd)
    return x.transpose(1, 2, 0)[:, k0:k1, :]
  if kind == 'heads_bias':
    (h0, h1), (k0, k1) = bounds
    hd = shape[1]
    return t[h0 * hd:h1 * hd].reshape(h1 - h0, hd)[:, k0:k1]
  raise ValueError(f'unknown kind {kind!r}; expected one of {KINDS}')


def to_hf(x: np.ndarray, kind: str, vocab_size: int) -> np.ndarray:
  """Our full parameter ``x`` in the HF layout (vocab padding dropped)."""
  if kind == 'copy':
    return x
  if kind == 'linear':
    return x.T
  if kind == 'embed':
    return x[:vocab_size]
  if kind == 'unembed':
    return x[:, :vocab_size].T
  if kind == 'heads_in':
    return x.reshape(x.shape[0], -1).T
  if kind == 'heads_out':
    return x.reshape(-1, x.shape[-1]).T
  if kind == 'heads_bias':
    return x.reshape(-1)
  raise ValueError(f'unknown kind {kind!r}; expected one of {KINDS}')


# -- loading ---------------------------------------------------------------------

def resolve_config(path: str, cfg: model_lib.ModelConfig | None = None,
                   **overrides: Any) -> model_lib.ModelConfig:
  """Architecture from ``path/config.json``; RUNTIME_FIELDS from ``cfg``; then overrides."""
  runtime = {f: getattr(cfg, f) for f in RUNTIME_FIELDS} if cfg is not None else {}
  return model_config_from_hf(path, **{**runtime, **overrides})


def abstract_decoder(cfg: model_lib.ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """Graph and abstract (shape-only) state of a Decoder; allocates nothing."""
  return nnx.split(nnx.eval_shape(lambda: model_lib.Decoder(cfg, rngs=nnx.Rngs(0))))


def load_pretrained(path: str, cfg: model_lib.ModelConfig | None = None, *,
                    mesh: Mesh | None = None, **overrides: Any) -> model_lib.Decoder:
  """A Decoder with the weights of a local Hugging Face model directory.

  Args:
    path: the directory (``config.json``, ``*.safetensors``).
    cfg: optional; only its RUNTIME_FIELDS (dtype, param_dtype,
      attention_impl, remat, vocab_multiple) are used, the architecture always
      comes from ``config.json``. The result's ``.cfg`` is the full config.
    mesh: place each parameter in its logical sharding on this mesh (each
      device reads only its slice); ``None`` = the first device.
    **overrides: ``ModelConfig`` fields, applied last.
  Raises:
    ValueError naming an unsupported architecture or variant, a missing
    tensor or a tensor of the wrong shape.
  """
  cfg = resolve_config(path, cfg, **overrides)
  arch = architecture_of(read_hf_config(path))
  files = SafetensorsDir(path)
  sources = param_sources(cfg)
  missing = sorted(name for name, _ in sources.values() if name not in files)
  if missing:
    raise ValueError(f'{path}: missing tensor(s) {", ".join(missing)} '
                     f'needed by {arch} with this config.json')
  used = {name for name, _ in sources.values()}
  unused = [n for n in files.names() if n not in used and 'rotary_emb' not in n
            and not (cfg.tie_embeddings and n == 'lm_head.weight')]
  if unused:
    log.warning('%s: ignoring %d tensor(s) not used by %s: %s', path, len(unused),
                arch, ', '.join(unused[:8]))
  param_dtype = np.dtype(model_lib.DTYPES[cfg.param_dtype])
  graphdef, state = abstract_decoder(cfg)
  flat = []
  for key, variable in nnx.to_flat_state(state):
    name, kind = sources[key]
    shape = tuple(variable.shape)
    expected = hf_shape(kind, shape, cfg.vocab_size)
    if files.shape(name) != expected:
      raise ValueError(f'{path}: tensor {name} has shape {files.shape(name)}, '
                       f'config.json implies {expected}')
    if mesh is None:
      sharding = SingleDeviceSharding(jax.devices()[0])
    else:
      axes = variable.get_metadata().get('out_sharding') or (None,) * len(shape)
      sharding = NamedSharding(mesh, sharding_lib.logical_spec(axes, shape, mesh))

    def callback(index, name=name, kind=kind, shape=shape):
      return read_slice(files.tensor(name), kind, index, shape).astype(param_dtype)

    flat.append((key, variable.replace(jax.make_array_from_callback(shape, sharding, callback))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))

