"""A Llama-family decoder in Flax NNX that takes per-token ids, not a mask.

Covers Llama 2/3.x (incl. Llama 3 rope scaling), Mistral, Qwen2/2.5 (q/k/v
biases) and Qwen3 (q/k RMSNorm): embedding, RMSNorm, RoPE, grouped-query
attention through :func:`prefix_dpo.attention.attention`, SwiGLU MLP, tied or
untied unembedding. Parameters carry logical axis names (``out_sharding``)
that :mod:`prefix_dpo.sharding` maps onto a mesh.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from prefix_dpo import attention as attention_lib

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
          'float16': jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of the decoder."""
  vocab_size: int = 512
  # Pad the embed/lm_head vocab dimension to a multiple (e.g. 128, so it
  # shards evenly). Padded ids are never scored: unembedding() drops them.
  vocab_multiple: int = 1
  hidden_size: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  mlp_dim: int = 128
  rope_theta: float = 10_000.0
  # Llama 3.x: {'factor', 'low_freq_factor', 'high_freq_factor',
  # 'original_max_position_embeddings'}; None = plain RoPE.
  rope_scaling: dict[str, float] | None = None
  rms_eps: float = 1e-6
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2/2.5
  qk_norm: bool = False   # Qwen3
  dtype: str = 'float32'        # compute dtype
  param_dtype: str = 'float32'  # master weights
  attention_impl: str = 'xla'
  remat: bool = False  # rematerialise each layer in the backward pass

  def __post_init__(self):
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f'model.{name}={getattr(self, name)!r}; expected one '
                         f'of {sorted(DTYPES)}')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'model.num_heads={self.num_heads} is not a multiple of '
                       f'model.num_kv_heads={self.num_kv_heads}')
    if self.head_dim % 2:
      raise ValueError(f'model.head_dim={self.head_dim} must be even for RoPE')
    if self.vocab_multiple < 1:
      raise ValueError(f'model.vocab_multiple={self.vocab_multiple} must be >= 1')
    if self.attention_impl not in attention_lib.IMPLS:
      raise ValueError(f'model.attention_impl={self.attention_impl!r}; '
                       f'expected one of {attention_lib.IMPLS}')

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> 'ModelConfig':
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f'unknown model config keys {unknown}; known: {sorted(known)}')
    return cls(**values)

  @property
  def padded_vocab_size(self) -> int:
    """Rows of ``embed`` (columns of ``lm_head``): vocab_size rounded up."""
    return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

  def num_params(self) -> int:
    d, h, kv, hd = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
    attn = d * hd * (h + 2 * kv) + h * hd * d
    mlp = 3 * d * self.mlp_dim
    embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return self.num_layers * (attn + mlp + 2 * d) + embed + d


PRESETS = {
    'tiny': ModelConfig(),
}


def rope_inv_freq(head_dim: int, theta: float,
                  scaling: dict[str, float] | None = None) -> jax.Array:
  """RoPE inverse frequencies ``[head_dim // 2]``, with Llama 3 scaling."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if not scaling:
    return inv_freq
  factor = scaling['factor']
  low, high = scaling['low_freq_factor'], scaling['high_freq_factor']
  original = scaling['original_max_position_embeddings']
  wavelen = 2 * math.pi / inv_freq
  smooth = (original / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
  return jnp.where(wavelen > original / low, inv_freq / factor,
                   jnp.where(wavelen < original / high, inv_freq, smoothed))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates ``x`` ``[batch, seq, heads, head_dim]`` by ``positions`` ``[batch, seq]``.

  Uses the rotate-half convention of Hugging Face Llama checkpoints.
  """
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, s, hd/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...],
           dtype: Any, init: str = 'normal', fan_in: int | None = None) -> nnx.Param:
  if init == 'ones':
    value = jnp.ones(shape, dtype)
  elif init == 'zeros':
    value = jnp.zeros(shape, dtype)
  else:
    std = (fan_in or shape[0]) ** -0.5
    value = (std * jax.random.truncated_normal(rngs.params(), -2, 2, shape)).astype(dtype)
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32, scaled by a learned weight."""

  def __init__(self, dim: int, eps: float, param_dtype: Any, rngs: nnx.Rngs,
               axis_name: str = 'embed'):
    self.weight = _param(rngs, (dim,), (axis_name,), param_dtype, init='ones')
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE; the mask comes from the ids."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pd = DTYPES[cfg.param_dtype]
    self.cfg = cfg
    self.wq = _param(rngs, (d, h, hd), ('embed', 'heads', 'head_dim'), pd)
    self.wk = _param(rngs, (d, kv, hd), ('embed', 'kv_heads', 'head_dim'), pd)
    self.wv = _param(rngs, (d, kv, hd), ('embed', 'kv_heads', 'head_dim'), pd)
    self.wo = _param(rngs, (h, hd, d), ('heads', 'head_dim', 'embed'), pd, fan_in=h * hd)
    if cfg.qkv_bias:
      self.bq = _param(rngs, (h, hd), ('heads', 'head_dim'), pd, init='zeros')
      self.bk = _param(rngs, (kv, hd), ('kv_heads', 'head_dim'), pd, init='zeros')
      self.bv = _param(rngs, (kv, hd), ('kv_heads', 'head_dim'), pd, init='zeros')
    if cfg.qk_norm:
      self.q_norm = RMSNorm(hd, cfg.rms_eps, pd, rngs, axis_name='head_dim')
      self.k_norm = RMSNorm(hd, cfg.rms_eps, pd, rngs, axis_name='head_dim')

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               branch_ids: jax.Array, inv_freq: jax.Array) -> jax.Array:
    cfg = self.cfg
    dt = DTYPES[cfg.dtype]
    q = jnp.einsum('bsd,dhk->bshk', x, self.wq[...].astype(dt))
    k = jnp.einsum('bsd,dhk->bshk', x, self.wk[...].astype(dt))
    v = jnp.einsum('bsd,dhk->bshk', x, self.wv[...].astype(dt))
    if cfg.qkv_bias:
      q = q + self.bq[...].astype(dt)
      k = k + self.bk[...].astype(dt)
      v = v + self.bv[...].astype(dt)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    out = attention_lib.attention(q, k, v, segment_ids, branch_ids,
                                  impl=cfg.attention_impl)
    return jnp.einsum('bshk,hkd->bsd', out, self.wo[...].astype(dt))


class MLP(nnx.Module):
  """SwiGLU feed-forward."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f, pd = cfg.hidden_size, cfg.mlp_dim, DTYPES[cfg.param_dtype]
    self.dtype = DTYPES[cfg.dtype]
    self.w_gate = _param(rngs, (d, f), ('embed', 'mlp'), pd)
    self.w_up = _param(rngs, (d, f), ('embed', 'mlp'), pd)
    self.w_down = _param(rngs, (f, d), ('mlp', 'embed'), pd)

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.dtype
    gate = jax.nn.silu(x @ self.w_gate[...].astype(dt))
    return (gate * (x @ self.w_up[...].astype(dt))) @ self.w_down[...].astype(dt)


class DecoderLayer(nnx.Module):
  """Pre-norm attention and MLP blocks with residuals."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pd = DTYPES[cfg.param_dtype]
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, pd, rngs)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, pd, rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, segment_ids, branch_ids, inv_freq):
    x = x + self.attn(self.attn_norm(x), positions, segment_ids, branch_ids, inv_freq)
    return x + self.mlp(self.mlp_norm(x))


class Decoder(nnx.Module):
  """The language model: ids in, final hidden states out."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pd = DTYPES[cfg.param_dtype]
    self.cfg = cfg
    self.embed = _param(rngs, (cfg.padded_vocab_size, cfg.hidden_size), ('vocab', 'embed'),
                        pd, fan_in=1)
    self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, pd, rngs)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.hidden_size, cfg.padded_vocab_size),
                            ('embed', 'vocab'), pd)

  def __call__(self, input_ids: jax.Array, positions: jax.Array,
               segment_ids: jax.Array, branch_ids: jax.Array) -> jax.Array:
    """Final hidden states.

    Args:
      input_ids, positions, segment_ids, branch_ids: ``[batch, seq]`` int32.
    Returns:
      ``[batch, seq, hidden]`` in the compute dtype.
    """
    cfg = self.cfg
    dt = DTYPES[cfg.dtype]
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    x = jnp.take(self.embed[...], input_ids, axis=0).astype(dt)
    for layer in self.layers:
      if cfg.remat:
        x = nnx.remat(lambda l, *a: l(*a))(layer, x, positions, segment_ids,
                                           branch_ids, inv_freq)
      else:
        x = layer(x, positions, segment_ids, branch_ids, inv_freq)
    return self.final_norm(x)

  def unembedding(self) -> jax.Array:
    """The ``[hidden, vocab_size]`` matrix mapping hidden states to logits.

    Vocab padding columns are sliced off, so softmax and log-probs run over the
    real vocabulary only (exactly as without padding).
    """
    cfg = self.cfg
    weights = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
    if cfg.padded_vocab_size != cfg.vocab_size:
      weights = weights[:, :cfg.vocab_size]
    return weights

  def logits(self, input_ids, positions, segment_ids, branch_ids) -> jax.Array:
    """``[batch, seq, vocab]`` float32 logits (for tests and small inputs)."""
    hidden = self(input_ids, positions, segment_ids, branch_ids)
    return jnp.einsum('bsd,dv->bsv', hidden, self.unembedding().astype(hidden.dtype),
                      preferred_element_type=jnp.float32)
