"""Export a :class:`prefix_dpo.model.Decoder` (or a reward model) as a Hugging Face model directory.

Writes ``config.json``, ``*.safetensors`` (split into several files with
``model.safetensors.index.json`` above ``max_shard_bytes``) and the tokenizer
files of a source directory, so ``transformers.AutoModelForCausalLM`` loads
it and vLLM can serve it. Vocabulary padding is dropped. Each tensor is
gathered to the host, converted and written on its own, so at most one
tensor's worth of host memory is used beyond the open file.

A :class:`prefix_dpo.reward_model.RewardModel` exports as the architecture's
``*ForSequenceClassification`` (``AutoModelForSequenceClassification``) with
one label: the backbone's tensors without ``lm_head``, and the value head
``[hidden]`` as ``score.weight`` ``[1, hidden]`` (no bias in either). Our
score of a response is the value head on the final hidden state of the
response's last token, which the prefix-sharing mask makes equal to that of
the standalone ``[prompt | response]`` sequence. Hugging Face's classifier
applies ``score`` to every position and keeps, per row, the rightmost token
that is not ``pad_token_id``; on ``[prompt | response]``, padded on either
side with ``pad_token_id``, that is the response's last token, so the two
scores agree, provided no response ends with the pad id (a pad id equal to
the EOS that ends every response would shift the score to the token before
it). ``config.json`` therefore always carries ``pad_token_id``, which
transformers needs to score batches of more than one row.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from prefix_dpo import hf_interop
from prefix_dpo import model as model_lib
from prefix_dpo import reward_model as reward_model_lib

EXPORT_DTYPES = ('bfloat16', 'float32', 'float16')
_SAFETENSORS_NAMES = {v: k for k, v in hf_interop.SAFETENSORS_DTYPES.items()}
# Copied from the tokenizer/source directory when present.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'tokenizer.model', 'vocab.json', 'merges.txt', 'added_tokens.json',
                   'chat_template.jinja', 'chat_template.json')
# Architectural keys that the exported config.json always sets itself.
_OURS = ('architectures', 'model_type', 'vocab_size', 'hidden_size', 'intermediate_size',
         'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads', 'head_dim',
         'hidden_act', 'rms_norm_eps', 'rope_theta', 'rope_scaling', 'rope_parameters',
         'tie_word_embeddings', 'attention_bias', 'mlp_bias', 'torch_dtype', 'dtype',
         'sliding_window', 'use_sliding_window', 'layer_types', 'transformers_version',
         '_name_or_path')
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
# Each supported causal LM's Hugging Face class for a reward model (one label).
SEQUENCE_CLASSIFIERS = {arch: arch.replace('ForCausalLM', 'ForSequenceClassification')
                        for arch in hf_interop.ARCHITECTURES}


def infer_architecture(cfg: model_lib.ModelConfig) -> str:
  """Qwen3 for q/k norms, Qwen2 for q/k/v biases, else Llama."""
  if cfg.qk_norm:
    return 'Qwen3ForCausalLM'
  if cfg.qkv_bias:
    return 'Qwen2ForCausalLM'
  return 'LlamaForCausalLM'


def check_exportable(cfg: model_lib.ModelConfig, arch: str) -> None:
  """ValueError when ``arch`` cannot express ``cfg`` (biases, norms, head_dim)."""
  if arch not in hf_interop.ARCHITECTURES:
    raise ValueError(f'unsupported architecture {arch!r}; supported: '
                     f'{", ".join(hf_interop.ARCHITECTURES)}')
  wants_bias, wants_norm = arch == 'Qwen2ForCausalLM', arch == 'Qwen3ForCausalLM'
  if cfg.qkv_bias != wants_bias or cfg.qk_norm != wants_norm:
    raise ValueError(f'{arch} needs qkv_bias={wants_bias}, qk_norm={wants_norm}; the '
                     f'model has qkv_bias={cfg.qkv_bias}, qk_norm={cfg.qk_norm} '
                     f'(try architecture={infer_architecture(cfg)!r})')
  if wants_bias and cfg.head_dim * cfg.num_heads != cfg.hidden_size:
    raise ValueError(f'{arch} derives head_dim from hidden_size / num_heads = '
                     f'{cfg.hidden_size // cfg.num_heads}; the model has {cfg.head_dim}')


def hf_config(cfg: model_lib.ModelConfig, arch: str, dtype: str,
              base: dict[str, Any] | None = None) -> dict[str, Any]:
  """``config.json`` contents: ``base`` (e.g. token ids) with our architecture.

  RoPE is written in the transformers 4.x form (``rope_theta`` and
  ``rope_scaling``), which 4.x, 5.x and vLLM all read.
  """
  out = {k: v for k, v in (base or {}).items() if k not in _OURS}
  scaling = None
  if cfg.rope_scaling:
    scaling = {'rope_type': 'llama3', **cfg.rope_scaling}
  out.update(
      architectures=[arch], model_type=hf_interop.MODEL_TYPES[arch],
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, hidden_act='silu', rms_norm_eps=cfg.rms_eps,
      rope_theta=cfg.rope_theta, rope_scaling=scaling,
      tie_word_embeddings=cfg.tie_embeddings, torch_dtype=dtype)
  if arch in ('LlamaForCausalLM', 'Qwen3ForCausalLM'):
    out['attention_bias'] = False
  if arch == 'LlamaForCausalLM':
    out['mlp_bias'] = False
  # Our attention is full: no sliding window (transformers' Mistral default is 4096).
  if arch != 'LlamaForCausalLM':
    out['sliding_window'] = None
  if arch in ('Qwen2ForCausalLM', 'Qwen3ForCausalLM'):
    out['use_sliding_window'] = False
  return dict(sorted(out.items()))


def reward_model_architectures(name: str) -> tuple[str, str]:
  """``(causal LM, sequence classifier)`` named by either, e.g. ``'LlamaForCausalLM'``."""
  for causal, classifier in SEQUENCE_CLASSIFIERS.items():
    if name in (causal, classifier):
      return causal, classifier
  raise ValueError(f'no sequence-classification architecture for {name!r} to export a '
                   f'reward model as; supported: {", ".join(SEQUENCE_CLASSIFIERS.values())}')


def reward_model_config(config: dict[str, Any], classifier: str,
                        pad_token_id: int | None) -> dict[str, Any]:
  """:func:`hf_config`'s ``config`` as a one-label ``classifier``.

  ``id2label`` / ``label2id`` are how transformers stores ``num_labels=1``;
  ``pad_token_id`` (default: the one ``config`` took from the source) is how
  its classifier finds each row's last token.
  """
  pad_token_id = config.get('pad_token_id') if pad_token_id is None else pad_token_id
  if pad_token_id is None:
    raise ValueError("a reward model needs pad_token_id (Hugging Face's classifier finds "
                     "each row's last token by it); the source config.json has none")
  if not 0 <= pad_token_id < config['vocab_size']:
    raise ValueError(f'pad_token_id={pad_token_id} is not a token id (vocab_size '
                     f'{config["vocab_size"]})')
  return dict(sorted({**config, 'architectures': [classifier], 'id2label': {'0': 'LABEL_0'},
                      'label2id': {'LABEL_0': 0}, 'pad_token_id': pad_token_id}.items()))


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One Hugging Face tensor to write."""
  name: str
  shape: tuple[int, ...]
  value: Callable[[], np.ndarray]  # gathers and converts it (collective on several hosts)


def _decoder_tensors(decoder: model_lib.Decoder, *, with_lm_head: bool) -> list[_Tensor]:
  """The decoder's tensors in HF order: embeddings, layers by number, final norm, head."""
  cfg = decoder.cfg
  sources = hf_interop.param_sources(cfg)
  if not with_lm_head:
    sources.pop(('lm_head',), None)
  variables = dict(nnx.to_flat_state(nnx.state(decoder, nnx.Param)))
  groups = {'embed': 0, 'layers': 1, 'final_norm': 2, 'lm_head': 3}
  keys = sorted(sources, key=lambda k: (groups[k[0]], k[1] if k[0] == 'layers' else 0,
                                        sources[k][0]))

  def tensor(key: tuple[Any, ...]) -> _Tensor:
    name, kind = sources[key]
    return _Tensor(name, hf_interop.hf_shape(kind, tuple(variables[key].shape), cfg.vocab_size),
                   lambda: hf_interop.to_hf(_to_host(variables[key][...]), kind, cfg.vocab_size))

  return [tensor(key) for key in keys]


def _reward_model_tensors(model: reward_model_lib.RewardModel) -> list[_Tensor]:
  """The backbone's tensors without ``lm_head`` (a classifier has none), then ``score``."""
  head = model.value_head
  score = _Tensor('score.weight', (1, *head.shape), lambda: _to_host(head[...])[None, :])
  return _decoder_tensors(model.backbone, with_lm_head=False) + [score]


def _to_host(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-host sharded) array on this host."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _plan_shards(tensors: list[tuple[str, tuple[int, ...]]], itemsize: int,
                 max_shard_bytes: int) -> list[list[int]]:
  """Consecutive tensors grouped into files of at most ``max_shard_bytes``."""
  shards: list[list[int]] = [[]]
  size = 0
  for i, (_, shape) in enumerate(tensors):
    nbytes = math.prod(shape) * itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(i)
    size += nbytes
  return shards


def _write_safetensors(file: str, names: list[str], shapes: list[tuple[int, ...]],
                       dtype: np.dtype, produce) -> None:
  """Streams tensors into a safetensors file; ``produce(i)`` makes tensor ``i``."""
  header: dict[str, Any] = {'__metadata__': {'format': 'pt'}}
  offset = 0
  for name, shape in zip(names, shapes):
    nbytes = math.prod(shape) * dtype.itemsize
    header[name] = {'dtype': _SAFETENSORS_NAMES[dtype], 'shape': list(shape),
                    'data_offsets': [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)  # tensor data starts 8-byte aligned
  with open(file, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)))
    f.write(blob)
    for i, shape in enumerate(shapes):
      array = np.ascontiguousarray(produce(i), dtype=dtype)
      if array.shape != tuple(shape):
        raise AssertionError(f'{names[i]}: produced {array.shape}, planned {shape}')
      f.write(array.tobytes())


def copy_tokenizer_files(src: str, out_dir: str) -> list[str]:
  """Copies the tokenizer files (and generation_config.json) found in ``src``."""
  copied = []
  for name in os.listdir(src):
    if name in TOKENIZER_FILES or name == 'generation_config.json' or name.endswith('.tiktoken'):
      shutil.copyfile(os.path.join(src, name), os.path.join(out_dir, name))
      copied.append(name)
  return sorted(copied)


def export_hf(model: model_lib.Decoder | reward_model_lib.RewardModel, out_dir: str, *,
              tokenizer_dir: str | None = None, source_dir: str | None = None,
              dtype: str = 'bfloat16', architecture: str | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              pad_token_id: int | None = None) -> str:
  """Writes ``model`` as a Hugging Face model directory; returns ``out_dir``.

  Args:
    model: the Decoder, or a RewardModel (exported as ``*ForSequenceClassification``;
      see the module docstring). Any sharding; on several hosts every process
      must call this, process 0 writes.
    out_dir: created if missing; existing weight files there are replaced.
    tokenizer_dir: a directory whose tokenizer files are copied; defaults to
      ``source_dir``.
    source_dir: the Hugging Face directory the model was loaded from: its
      ``config.json`` supplies the architecture name and non-architectural
      fields (token ids, ``max_position_embeddings``), and its
      ``generation_config.json`` is copied.
    dtype: ``'bfloat16'`` (the usual), ``'float32'`` or ``'float16'``.
    architecture: e.g. ``'MistralForCausalLM'`` (for a reward model this or
      ``'MistralForSequenceClassification'``); default: the source's, else
      inferred from the config (:func:`infer_architecture`).
    max_shard_bytes: above this the weights are split over several files.
    pad_token_id: reward models only, and required for them unless the
      source's ``config.json`` has one: the id that pads rows, which no
      response may end with.
  """
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f'dtype={dtype!r}; expected one of {EXPORT_DTYPES}')
  is_reward_model = isinstance(model, reward_model_lib.RewardModel)
  cfg = model.cfg
  base = hf_interop.read_hf_config(source_dir) if source_dir else {}
  if architecture is None:
    architecture = hf_interop.architecture_of(base) if base else infer_architecture(cfg)
  arch = architecture
  if is_reward_model:
    arch, classifier = reward_model_architectures(architecture)
  check_exportable(cfg, arch)
  config = hf_config(cfg, arch, dtype, base)
  if is_reward_model:
    config = reward_model_config(config, classifier, pad_token_id)
  np_dtype = np.dtype(model_lib.DTYPES[dtype])
  tensors = (_reward_model_tensors(model) if is_reward_model
             else _decoder_tensors(model, with_lm_head=True))
  shards = _plan_shards([(t.name, t.shape) for t in tensors], np_dtype.itemsize,
                        max_shard_bytes)
  files = (['model.safetensors'] if len(shards) == 1 else
           [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))])
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(out_dir, exist_ok=True)
    for stale in os.listdir(out_dir):
      if stale.endswith('.safetensors') or stale == hf_interop.INDEX_FILE:
        os.remove(os.path.join(out_dir, stale))

  weight_map = {}
  for file, members in zip(files, shards):
    if writer:
      _write_safetensors(os.path.join(out_dir, file), [tensors[i].name for i in members],
                         [tensors[i].shape for i in members], np_dtype,
                         lambda j, members=members: tensors[members[j]].value())
    else:  # the gathers are collective: other processes take part too
      for i in members:
        tensors[i].value()
    weight_map.update({tensors[i].name: file for i in members})
  if not writer:
    return out_dir
  if len(files) > 1:
    total = sum(math.prod(t.shape) * np_dtype.itemsize for t in tensors)
    with open(os.path.join(out_dir, hf_interop.INDEX_FILE), 'w') as f:
      json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2)
  if source_dir and os.path.isfile(os.path.join(source_dir, 'generation_config.json')):
    shutil.copyfile(os.path.join(source_dir, 'generation_config.json'),
                    os.path.join(out_dir, 'generation_config.json'))
  if tokenizer_dir or source_dir:
    copy_tokenizer_files(tokenizer_dir or source_dir, out_dir)
  return out_dir
