"""The Pallas block-sparse kernel (interpret mode on CPU) against the reference.

Small shapes throughout: interpret mode runs each grid step as XLA ops.
"""
import dataclasses
import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernels_pallas import block_sparse_attention, gpu_check
from kernels_pallas import metadata as md
from prefix_dpo import attention, layout, logprobs, masks
from prefix_dpo import model as model_lib
from prefix_dpo.layout import Example


def random_examples(rng, count, max_prompt=20, max_response=9):
  """Examples with 1-4 responses, including 1-token prompts and responses."""
  examples = []
  for _ in range(count):
    n = int(rng.integers(1, 5))
    prompt = rng.integers(1, 60, int(rng.integers(1, max_prompt + 1)))
    responses = [rng.integers(1, 60, int(rng.choice([1, rng.integers(1, max_response + 1)])))
                 for _ in range(n)]
    examples.append(Example(prompt, responses))
  return examples


def random_rows(seed, seq_len, num_rows, count=6):
  """Packed prefix-shared rows; the last row is left fully padded."""
  rng = np.random.default_rng(seed)
  examples = random_examples(rng, count)
  while True:
    try:
      batch = layout.build_batch(examples, layout='prefix_shared', seq_len=seq_len,
                                 num_rows=num_rows - 1)
      break
    except ValueError:
      examples = examples[:-1]
  pad = np.zeros((1, seq_len), np.int32)
  return tuple(np.concatenate([batch[key], pad]) for key in ('segment_ids', 'branch_ids'))


def qkv(seed, batch, seq, heads, kv_heads, head_dim, dtype):
  keys = jax.random.split(jax.random.key(seed), 4)
  shapes = [(batch, seq, heads, head_dim), (batch, seq, kv_heads, head_dim),
            (batch, seq, kv_heads, head_dim), (batch, seq, heads, head_dim)]
  return [jax.random.normal(key, shape, jnp.float32).astype(dtype)
          for key, shape in zip(keys, shapes)]


def outputs_and_grads(attn, q, k, v, do):
  """``(o, dq, dk, dv)`` of ``attn``, jitted as one program."""
  def run(q, k, v, do):
    o, vjp = jax.vjp(attn, q, k, v)
    return (o, *vjp(do))
  return [np.asarray(x, np.float32) for x in jax.jit(run)(q, k, v, do)]


# ---------------------------------------------------------------- metadata

_classify = jax.jit(md.classify_blocks, static_argnums=(2, 3))


@pytest.mark.parametrize('block_q,block_kv', [(8, 8), (16, 4), (4, 16)])
def test_classification_equals_brute_force_on_layouts(block_q, block_kv):
  seen = set()
  for seed in range(6):
    seg, br = random_rows(seed, 96, 3)
    want = md.brute_force_kind(seg, br, block_q, block_kv)
    np.testing.assert_array_equal(np.asarray(_classify(seg, br, block_q, block_kv)), want)
    seen |= set(np.unique(want).tolist())
  assert seen >= ({md.EMPTY, md.PARTIAL, md.FULL} if block_q <= 8 else {md.EMPTY, md.PARTIAL})


def test_classification_equals_brute_force_on_arbitrary_ids():
  # Exact for any ids, not only well-formed layouts: non-contiguous segments,
  # negative ids, responses before prompts.
  rng = np.random.default_rng(0)
  for trial in range(20):
    seg = rng.integers(-1, 4, (2, 48)).astype(np.int32)
    if trial % 2:
      seg = np.sort(np.abs(seg), axis=1)
    br = rng.integers(-1, 4, (2, 48)).astype(np.int32)
    for bq, bkv in ((8, 8), (16, 4)):
      np.testing.assert_array_equal(np.asarray(_classify(seg, br, bq, bkv)),
                                    md.brute_force_kind(seg, br, bq, bkv))


def test_lists_hold_exactly_the_non_empty_blocks():
  seg, br = random_rows(3, 128, 3)
  meta = jax.jit(md.block_metadata, static_argnums=(2, 3))(seg, br, 16, 8)
  kind = np.asarray(meta.kind)
  np.testing.assert_array_equal(kind, md.brute_force_kind(seg, br, 16, 8))
  for kinds, blocks, full, count in (
      (kind, meta.kv_blocks, meta.kv_full, meta.kv_count),
      (kind.swapaxes(1, 2), meta.q_blocks, meta.q_full, meta.q_count)):
    blocks, full, count = map(np.asarray, (blocks, full, count))
    for b in range(kinds.shape[0]):
      for i in range(kinds.shape[1]):
        row = kinds[b, i]
        want_full = np.flatnonzero(row == md.FULL)
        want_partial = np.flatnonzero(row == md.PARTIAL)
        n, f = count[b, i], full[b, i]
        assert (n, f) == (len(want_full) + len(want_partial), len(want_full))
        np.testing.assert_array_equal(blocks[b, i, :f], want_full)
        np.testing.assert_array_equal(blocks[b, i, f:n], want_partial)
        # Padding repeats the last listed block (no new DMA on TPU).
        assert (blocks[b, i, n:] == (blocks[b, i, n - 1] if n else 0)).all()
  assert (np.asarray(meta.kv_count)[-1] == 0).all()  # the padded row


def test_skip_empty_false_lists_every_block():
  seg, br = random_rows(1, 64, 2)
  meta = jax.jit(md.block_metadata, static_argnums=(2, 3), static_argnames='skip_empty')(
      seg, br, 16, 16, skip_empty=False)
  assert (np.asarray(meta.kv_count) == 4).all() and (np.asarray(meta.q_count) == 4).all()


# ------------------------------------------------------- kernel vs reference

# (backend, dtype, batch seq heads kv_heads head_dim, fwd blocks, bwd blocks)
CASES = {
    'gpu-f32-gqa': ('gpu', jnp.float32, (3, 90, 4, 2, 16), (16, 16), (16, 16)),
    'gpu-bf16-mha': ('gpu', jnp.bfloat16, (3, 90, 2, 2, 32), (32, 16), (16, 32)),
    'tpu-f32-gqa': ('tpu', jnp.float32, (2, 260, 4, 2, 16), (128, 128), (128, 128)),
    'tpu-bf16-gqa': ('tpu', jnp.bfloat16, (2, 200, 2, 1, 32), (128, 128), (128, 128)),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_forward_and_grads_match_reference(case):
  backend, dtype, (b, s, h, kvh, d), (bq, bkv), (bbq, bbkv) = CASES[case]
  seg, br = random_rows(len(case), s, b, count=8)
  seg, br = jnp.asarray(seg), jnp.asarray(br)
  q, k, v, do = qkv(0, b, s, h, kvh, d, dtype)
  scale = d ** -0.5
  kernel = functools.partial(block_sparse_attention, segment_ids=seg, branch_ids=br,
                             sm_scale=scale, block_q=bq, block_kv=bkv, bwd_block_q=bbq,
                             bwd_block_kv=bbkv, backend=backend)
  reference = functools.partial(attention.xla_attention, segment_ids=seg, branch_ids=br,
                                sm_scale=scale)
  got = outputs_and_grads(kernel, q, k, v, do)
  f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
  want = outputs_and_grads(reference, *f32)
  padding = ~np.asarray(masks.dense_mask(seg, br).any(-1))  # [b, s]
  assert padding[-1].all()
  for name, g, w in zip(('o', 'dq', 'dk', 'dv'), got, want):
    assert np.isfinite(g).all(), name
    if dtype == jnp.float32:
      np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5, err_msg=name)
    else:
      scale_w = np.abs(w).max()
      assert np.abs(g - w).max() <= 2e-2 * scale_w, name
  o, dq = got[0], got[1]
  assert (o[padding] == 0).all() and (dq[padding] == 0).all()


def test_public_defaults_and_skip_empty_false():
  seg, br = random_rows(5, 40, 2)
  seg, br = jnp.asarray(seg), jnp.asarray(br)
  q, k, v, _ = qkv(1, 2, 40, 2, 1, 16, jnp.float32)

  @jax.jit
  def run(q, k, v):
    return (attention.attention(q, k, v, seg, br, impl='pallas'),  # the dispatch
            block_sparse_attention(q, k, v, seg, br, block_q=16, block_kv=32,
                                   skip_empty=False))

  want = attention.xla_attention(q, k, v, seg, br, sm_scale=0.25)
  for got in run(q, k, v):
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_bad_arguments_are_clear_errors():
  q = jnp.zeros((1, 32, 4, 16))
  ids = jnp.ones((1, 32), jnp.int32)
  with pytest.raises(ValueError, match='multiple of kv_heads'):
    block_sparse_attention(q, q[:, :, :3], q[:, :, :3], ids, ids)
  with pytest.raises(ValueError, match='multiples of 128'):
    block_sparse_attention(q, q, q, ids, ids, backend='tpu', block_q=64)
  with pytest.raises(ValueError, match='powers of two'):
    block_sparse_attention(q, q, q, ids, ids, backend='gpu', block_kv=48)


@pytest.mark.parametrize('backend,platform', [('gpu', 'cuda'), ('tpu', 'tpu')])
def test_kernels_lower_for_the_real_backend(backend, platform):
  # Lowers (no compile) through Triton / Mosaic at a realistic head_dim.
  q = jnp.zeros((1, 384, 4, 128), jnp.bfloat16)
  k = jnp.zeros((1, 384, 2, 128), jnp.bfloat16)
  ids = jnp.ones((1, 384), jnp.int32)

  def run(q, k, v):
    o, vjp = jax.vjp(functools.partial(block_sparse_attention, segment_ids=ids,
                                       branch_ids=ids, backend=backend,
                                       interpret=False), q, k, v)
    return o, vjp(o)

  try:
    lowered = jax.jit(run).trace(q, k, k).lower(lowering_platforms=(platform,))
  except RuntimeError as e:  # jax 0.11 needs a (possibly abstract) GPU for Triton
    if 'No supported GPU devices' not in str(e):
      raise
    pytest.skip(f'this jax cannot lower Triton kernels without a GPU: {e}')
  text = lowered.as_text()
  marker = 'triton' if backend == 'gpu' else 'tpu_custom_call'
  assert text.count(marker) >= 3  # forward, dq, dkv


# ------------------------------------------------------------------- model

CFG = dataclasses.replace(model_lib.PRESETS['tiny'], vocab_size=64, num_layers=1)


def test_model_with_pallas_matches_xla_and_trains():
  examples = [Example([1, 2, 3, 4, 5], [[6, 7, 8], [9], [10, 11]]),
              Example([12], [[13], [14, 15, 16, 17]]),
              Example([18, 19, 20], [[21, 22]])]
  batch = layout.build_batch(examples, layout='prefix_shared', seq_len=24, num_rows=3)
  batch = {key: jnp.asarray(val) for key, val in batch.items()}
  assert int(batch['segment_ids'][-1].max()) == 0  # a fully padded row

  def loss_fn(model):
    logps, _ = logprobs.model_logprobs(model, batch, chunk_size=16)
    return -(logps * batch['response_mask']).sum(), logps

  @nnx.jit
  def train_step(model):
    (loss, logps), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p, g: p - 0.05 * g, params, grads))
    return loss, logps, grads

  history = {}
  for impl in ('xla', 'pallas'):
    model = model_lib.Decoder(dataclasses.replace(CFG, attention_impl=impl),
                              rngs=nnx.Rngs(0))
    history[impl] = [jax.tree.map(np.asarray, train_step(model)) for _ in range(2)]
  for (loss_x, logps_x, grads_x), (loss_p, logps_p, grads_p) in zip(
      history['xla'], history['pallas']):
    np.testing.assert_allclose(logps_p, logps_x, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(loss_p, loss_x, rtol=1e-5)
    for gx, gp in zip(jax.tree.leaves(grads_x), jax.tree.leaves(grads_p)):
      assert np.isfinite(gp).all()
      np.testing.assert_allclose(gp, gx, atol=1e-4 * max(np.abs(gx).max(), 1.0))
  assert history['pallas'][1][0] < history['pallas'][0][0]  # it learns


# ---------------------------------------------------------------- sharding

SHARDING_SCRIPT = textwrap.dedent('''
    import functools, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from kernels_pallas import sharded_block_sparse_attention
    from prefix_dpo.attention import xla_attention
    mesh = Mesh(np.array(jax.devices()).reshape(2, 1, 2), ('data', 'fsdp', 'tensor'))
    ids = np.zeros((2, 48), np.int32)
    ids[0, :30], ids[1, :20], ids[1, 20:40] = 1, 1, 2
    branch = np.zeros_like(ids)
    branch[0, 12:20], branch[0, 20:30] = 1, 2
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 48, 4, 16))
    k, v = (jax.random.normal(key, (2, 48, 2, 16)) for key in keys[1:])
    def loss(attn, q, k, v):
      return (attn(q, k, v, ids, branch) ** 2).sum()
    sharded = functools.partial(sharded_block_sparse_attention, mesh=mesh, block_q=16,
                                block_kv=16)
    plain = functools.partial(xla_attention, sm_scale=16 ** -0.5)
    spec = NamedSharding(mesh, P(('data', 'fsdp'), None, 'tensor', None))
    args = [jax.device_put(x, spec) for x in (q, k, v)]
    got = jax.jit(jax.value_and_grad(functools.partial(loss, sharded), (0, 1, 2)))(*args)
    want = jax.value_and_grad(functools.partial(loss, plain), (0, 1, 2))(q, k, v)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    print('SHARDED_OK')
''')


def test_shard_map_over_data_and_tensor_axes():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', SHARDING_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
  assert 'SHARDED_OK' in result.stdout, result.stderr[-3000:]


# --------------------------------------------------------------- GPU check


def test_gpu_check_arguments_and_layout():
  args = gpu_check.parse_args(['--blocks', '64x64,128x64:64x32', '--seq', '4096'])
  assert args.blocks == [((64, 64), (64, 64)), ((128, 64), (64, 32))]
  assert (args.seq, args.heads, args.kv_heads, args.head_dim) == (4096, 32, 8, 128)
  batch = gpu_check.capybara_batch(np.random.default_rng(0), 8192, 1)
  segments = batch['segment_ids']
  assert (segments > 0).mean() > 0.8 and segments.max() >= 3
  assert set(np.unique(batch['branch_ids'])) == {0, 1, 2}
  assert gpu_check.causal_blocks(256, 128, 128, 1) == 3


def test_gpu_check_dry_run(capsys):
  # The correctness check and the baselines run in the CLI's own dry run.
  assert gpu_check.main(['--dry_run', '--skip_check', '--skip_xla', '--skip_mha',
                         '--skip_dense', '--blocks', '32x32']) == 0
  out = capsys.readouterr().out
  assert '| ours 32x32/32x32' in out and 'blocks visited' in out
