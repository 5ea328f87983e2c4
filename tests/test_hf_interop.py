"""Hugging Face interop, checked against ``transformers`` on tiny random models (CPU, float32).

Every checkpoint here is made locally: a randomly initialised ``transformers``
model (weights, biases and norm scales all random) saved to a temp dir.
"""
import dataclasses
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from prefix_dpo import hf_export, hf_interop, layout, logprobs  # noqa: E402
from prefix_dpo import model as model_lib  # noqa: E402
from prefix_dpo.layout import Example  # noqa: E402

os.environ.setdefault('HF_HUB_OFFLINE', '1')
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

TOL = 1e-4  # float32 logits / log-probs, absolute
VOCAB = 300
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
# name -> (transformers config, loader overrides). Between them: Llama 3 rope
# scaling, rope_theta, tied embeddings, q/k/v biases, q/k norms, head_dim !=
# hidden / heads, and vocab padding of embed and of lm_head.
ARCHS = {
    'llama3': (lambda: transformers.LlamaConfig(
        **COMMON, rope_theta=500_000.0, rope_scaling=dict(
            rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64)), dict(vocab_multiple=128)),
    'mistral': (lambda: transformers.MistralConfig(**COMMON, rope_theta=1e6,
                                                   sliding_window=None), {}),
    'qwen2': (lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
              dict(vocab_multiple=128)),
    'qwen3': (lambda: transformers.Qwen3Config(**COMMON, head_dim=32), {}),
}
SEQ_LENS = (13, 9, 20)  # packed into one row of ROW tokens
ROW = 48


def randomize(hf_model, seed: int = 0):
  """All parameters random (norm scales near 1), so every mapping is exercised."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in hf_model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      p.copy_((1 + 0.1 * noise) if 'norm' in name else 0.1 * noise)
  return hf_model


def make_hf(config, seed: int = 0):
  config._attn_implementation = 'eager'  # pylint: disable=protected-access
  return randomize(transformers.AutoModelForCausalLM.from_config(config).float().eval(), seed)


def hf_logits(hf_model, ids) -> np.ndarray:
  """``[len, vocab]`` logits of one standalone sequence."""
  with torch.no_grad():
    return hf_model(torch.tensor([list(ids)])).logits[0].float().numpy()


def packed_row(seed: int = 0):
  """One row holding several sequences (segments 1..3) and padding."""
  rng = np.random.default_rng(seed)
  seqs = [rng.integers(0, VOCAB, n) for n in SEQ_LENS]
  row = {k: np.zeros((1, ROW), np.int32) for k in ('input_ids', 'positions', 'segment_ids',
                                                   'branch_ids')}
  start = 0
  for seg, seq in enumerate(seqs, 1):
    span = slice(start, start + len(seq))
    row['input_ids'][0, span] = seq
    row['positions'][0, span] = np.arange(len(seq))
    row['segment_ids'][0, span] = seg
    start += len(seq)
  return seqs, row


@nnx.jit
def _logits(model, row):
  return model.logits(row['input_ids'], row['positions'], row['segment_ids'],
                      row['branch_ids'])


def packed_diffs(logits: np.ndarray, seqs, references) -> list[float]:
  """Max |ours - reference| for each packed sequence."""
  diffs, start = [], 0
  for seq, ref in zip(seqs, references):
    diffs.append(float(np.abs(logits[0, start:start + len(seq)] - ref).max()))
    start += len(seq)
  return diffs


@pytest.fixture(scope='module', params=list(ARCHS))
def ckpt(request, tmp_path_factory):
  """A saved random transformers checkpoint, its HF model and our loaded copy."""
  name = request.param
  make_config, overrides = ARCHS[name]
  hf_model = make_hf(make_config())
  path = str(tmp_path_factory.mktemp(name))
  hf_model.save_pretrained(path)
  ours = hf_interop.load_pretrained(path, **overrides)
  seqs, row = packed_row()
  refs = [hf_logits(hf_model, s) for s in seqs]
  return types.SimpleNamespace(name=name, path=path, hf=hf_model, ours=ours, seqs=seqs,
                               row=row, refs=refs)


# -- per architecture ----------------------------------------------------------

def test_config_is_read(ckpt):
  cfg, hf = ckpt.ours.cfg, ckpt.hf.config
  assert (cfg.vocab_size, cfg.num_heads, cfg.num_kv_heads) == (VOCAB, 4, 2)
  assert cfg.tie_embeddings == bool(hf.tie_word_embeddings)
  assert cfg.head_dim == getattr(hf, 'head_dim', 16)
  assert cfg.qkv_bias == (ckpt.name == 'qwen2') and cfg.qk_norm == (ckpt.name == 'qwen3')
  assert (cfg.rope_scaling is not None) == (ckpt.name == 'llama3')


def test_packed_logits_equal_transformers(ckpt):
  logits = np.asarray(_logits(ckpt.ours, {k: jnp.asarray(v) for k, v in ckpt.row.items()}))
  assert logits.shape == (1, ROW, VOCAB)  # vocab padding never shows
  assert min(np.abs(r).max() for r in ckpt.refs) > 1.0  # logits are not trivially small
  assert max(packed_diffs(logits, ckpt.seqs, ckpt.refs)) <= TOL


def test_prefix_shared_logprobs_equal_transformers(ckpt):
  rng = np.random.default_rng(1)
  examples = [Example(rng.integers(0, VOCAB, p).tolist(),
                      [rng.integers(0, VOCAB, n).tolist() for n in ns])
              for p, ns in ((7, (5, 3)), (1, (4, 1, 6)), (12, (2, 8)))]
  batch = layout.build_batch(examples, layout='prefix_shared', seq_len=40, num_rows=2,
                             num_responses=3)
  logps, _ = nnx.jit(logprobs.model_logprobs)(
      ckpt.ours, {k: jnp.asarray(v) for k, v in batch.items()})
  logps = np.asarray(logps)
  for e, ex in enumerate(examples):
    for k, response in enumerate(ex.responses):
      full = list(ex.prompt) + list(response)
      logits = torch.tensor(hf_logits(ckpt.hf, full)).double()
      lp = torch.log_softmax(logits, -1)
      p = len(ex.prompt)
      expected = sum(float(lp[p - 1 + j, t]) for j, t in enumerate(response))
      assert abs(logps[e, k] - expected) <= TOL, (e, k, logps[e, k], expected)


def test_export_round_trip(ckpt, tmp_path):
  out = hf_export.export_hf(ckpt.ours, str(tmp_path / 'out'), source_dir=ckpt.path,
                            dtype='float32')
  config = json.load(open(os.path.join(out, 'config.json')))
  assert config['architectures'] == ckpt.hf.config.architectures
  assert config['vocab_size'] == VOCAB  # padding dropped
  assert config.get('sliding_window') is None  # our attention is full
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, attn_implementation='eager').eval()
  ours = np.asarray(_logits(ckpt.ours, {k: jnp.asarray(v) for k, v in ckpt.row.items()}))
  assert max(packed_diffs(ours, ckpt.seqs, [hf_logits(reloaded, s) for s in ckpt.seqs])) <= TOL
  # Same tensors as transformers' own checkpoint, bit for bit.
  original = dict(ckpt.hf.state_dict())
  for name, value in reloaded.state_dict().items():
    assert torch.equal(value, original[name]), name


# -- sharded load on 8 simulated devices -------------------------------------------

SHARDED_SCRIPT = r'''
import json, sys
import numpy as np
import jax
jax.config.update('jax_default_matmul_precision', 'highest')
import jax.numpy as jnp
from flax import nnx
from prefix_dpo import hf_interop, sharding
assert jax.device_count() == 8, jax.devices()
args = json.loads(sys.argv[1])
row = {k: jnp.asarray(v) for k, v in np.load(args['row']).items()}
mesh = sharding.make_mesh({'data': 1, 'fsdp': 2, 'tensor': 4})
out = {}
for name, path in args['dirs'].items():
  model = hf_interop.load_pretrained(path, mesh=mesh, vocab_multiple=128)
  for key, p in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    out[name + '/shard/' + '.'.join(map(str, key))] = np.array(
        p[...].addressable_shards[0].data.shape)
  out[name + '/spec/embed'] = np.array(str(model.embed[...].sharding.spec))
  logits = nnx.jit(lambda m, r: m.logits(r['input_ids'], r['positions'], r['segment_ids'],
                                          r['branch_ids']))(model, row)
  out[name + '/logits'] = np.asarray(logits)
np.savez(args['out'], **out)
'''


@pytest.fixture(scope='module')
def sharded_results(tmp_path_factory):
  """Runs SHARDED_SCRIPT once for all architectures (XLA_FLAGS must precede jax import)."""
  tmp = tmp_path_factory.mktemp('sharded')
  dirs, refs = {}, {}
  seqs, row = packed_row()
  for i, (name, (make_config, _)) in enumerate(ARCHS.items()):
    hf_model = make_hf(make_config(), seed=10 + i)
    dirs[name] = str(tmp / name)
    hf_model.save_pretrained(dirs[name])
    refs[name] = [hf_logits(hf_model, s) for s in seqs]
  np.savez(tmp / 'row.npz', **row)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  args = json.dumps({'dirs': dirs, 'row': str(tmp / 'row.npz'), 'out': str(tmp / 'out.npz')})
  proc = subprocess.run([sys.executable, '-c', SHARDED_SCRIPT, args], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return dict(np.load(tmp / 'out.npz')), seqs, refs


@pytest.mark.parametrize('name', list(ARCHS))
def test_sharded_load_on_8_devices_equals_transformers(sharded_results, name):
  out, seqs, refs = sharded_results
  assert max(packed_diffs(out[name + '/logits'], seqs, refs[name])) <= TOL
  # Each device holds only its slice: heads over 'tensor' (4), embed over 'fsdp' (2),
  # the padded vocab (384) over 'tensor'; 2 KV heads do not divide 4 -> replicated.
  shard = lambda key: tuple(out[f'{name}/shard/{key}'])
  hd = 32 if name == 'qwen3' else 16
  assert shard('layers.0.attn.wq') == (32, 1, hd)
  assert shard('layers.0.attn.wk') == (32, 2, hd)
  assert shard('layers.1.mlp.w_down') == (32, 32)
  assert shard('embed') == (96, 32)
  assert "('tensor', 'fsdp')" in str(out[name + '/spec/embed'])


# -- checkpoint formats ----------------------------------------------------------

@pytest.fixture(scope='module')
def llama_hf():
  return make_hf(ARCHS['llama3'][0](), seed=3)


def _logits_of(model, row):
  return np.asarray(_logits(model, {k: jnp.asarray(v) for k, v in row.items()}))


def test_bf16_checkpoint(tmp_path):
  path = str(tmp_path / 'bf16')
  hf_bf16 = make_hf(ARCHS['qwen2'][0](), seed=4).to(torch.bfloat16)
  hf_bf16.save_pretrained(path)
  header, _ = hf_interop.read_safetensors_header(os.path.join(path, 'model.safetensors'))
  assert header['model.embed_tokens.weight']['dtype'] == 'BF16'
  seqs, row = packed_row()
  # (Not hf_bf16.float(): its RoPE buffer was rounded to bfloat16 too.)
  hf32 = transformers.AutoModelForCausalLM.from_pretrained(
      path, dtype=torch.float32, attn_implementation='eager').eval()
  ours = hf_interop.load_pretrained(path)  # bf16 weights, float32 params
  assert ours.embed[...].dtype == jnp.float32
  assert max(packed_diffs(_logits_of(ours, row), seqs,
                          [hf_logits(hf32, s) for s in seqs])) <= TOL
  as_bf16 = hf_interop.load_pretrained(path, param_dtype='bfloat16')
  wq = np.asarray(as_bf16.layers[1].attn.wq[...])
  assert wq.dtype == jnp.bfloat16
  q_proj = hf_bf16.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
  np.testing.assert_array_equal(wq.astype(np.float32), q_proj.T.reshape(64, 4, 16))


def test_sharded_checkpoint_with_index(llama_hf, tmp_path):
  path = str(tmp_path / 'multi')
  llama_hf.save_pretrained(path, max_shard_size='60KB')
  assert os.path.isfile(os.path.join(path, 'model.safetensors.index.json'))
  assert len([f for f in os.listdir(path) if f.endswith('.safetensors')]) > 2
  seqs, row = packed_row()
  ours = hf_interop.load_pretrained(path)
  assert max(packed_diffs(_logits_of(ours, row), seqs,
                          [hf_logits(llama_hf, s) for s in seqs])) <= TOL


def test_missing_tensor_is_named(llama_hf, tmp_path):
  from safetensors.torch import load_file, save_file
  path = tmp_path / 'missing'
  llama_hf.save_pretrained(str(path))
  tensors = load_file(str(path / 'model.safetensors'))
  del tensors['model.layers.1.mlp.up_proj.weight']
  save_file(tensors, str(path / 'model.safetensors'), metadata={'format': 'pt'})
  with pytest.raises(ValueError, match=r'model\.layers\.1\.mlp\.up_proj\.weight'):
    hf_interop.load_pretrained(str(path))


def test_wrong_shape_is_named(llama_hf, tmp_path):
  path = tmp_path / 'shape'
  llama_hf.save_pretrained(str(path))
  config = json.loads((path / 'config.json').read_text())
  config['intermediate_size'] = 96
  (path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r'mlp\.\w+_proj\.weight has shape \((128, 64|64, 128)\), '
                                       r'config\.json implies'):
    hf_interop.load_pretrained(str(path))


@pytest.mark.parametrize('change, message', [
    (dict(architectures=['GPT2LMHeadModel']), 'GPT2LMHeadModel'),
    (dict(rope_scaling=None, rope_parameters=dict(rope_type='yarn', factor=4.0,
                                                  rope_theta=1e4)), 'yarn'),
    (dict(attention_bias=True), 'attention_bias'),
    (dict(hidden_act='gelu'), 'gelu'),
])
def test_unsupported_configs_are_named(change, message):
  base = transformers.LlamaConfig(**COMMON).to_dict()
  with pytest.raises(ValueError, match=message):
    hf_interop.model_config_from_hf({**base, **change})


def test_unsupported_architecture_dir(llama_hf, tmp_path):
  path = tmp_path / 'gpt2'
  llama_hf.save_pretrained(str(path))
  config = json.loads((path / 'config.json').read_text())
  config['architectures'] = ['GPT2LMHeadModel']
  (path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ValueError, match='unsupported architecture .GPT2LMHeadModel'):
    hf_interop.load_pretrained(str(path))


def test_transformers_4_config_of_llama31_8b():
  # config.json of Llama 3.1 8B as released (transformers 4.x keys).
  config = {
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'hidden_act': 'silu',
      'hidden_size': 4096, 'intermediate_size': 14336, 'num_attention_heads': 32,
      'num_hidden_layers': 32, 'num_key_value_heads': 8, 'rms_norm_eps': 1e-05,
      'rope_scaling': {'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                       'original_max_position_embeddings': 8192, 'rope_type': 'llama3'},
      'rope_theta': 500000.0, 'tie_word_embeddings': False, 'torch_dtype': 'bfloat16',
      'vocab_size': 128256, 'attention_bias': False, 'mlp_bias': False}
  cfg = hf_interop.model_config_from_hf(config, param_dtype='bfloat16', vocab_multiple=128)
  assert (cfg.head_dim, cfg.num_kv_heads, cfg.rope_theta) == (128, 8, 500000.0)
  assert cfg.rope_scaling['original_max_position_embeddings'] == 8192
  assert cfg.padded_vocab_size == 128256 and cfg.param_dtype == 'bfloat16'
  assert round(cfg.num_params() / 1e9, 2) == 8.03


# -- slicing (what each device's callback reads) ------------------------------------

@pytest.mark.parametrize('kind, shape, vocab', [
    ('copy', (6, 8), 0), ('linear', (6, 10), 0), ('embed', (12, 6), 9),
    ('unembed', (6, 12), 9), ('heads_in', (6, 4, 8), 0), ('heads_out', (4, 8, 6), 0),
    ('heads_bias', (4, 8), 0)])
def test_read_slice_is_a_slice_of_the_full_parameter(kind, shape, vocab):
  rng = np.random.default_rng(0)
  hf = rng.standard_normal(hf_interop.hf_shape(kind, shape, vocab)).astype(np.float32)
  full = hf_interop.read_slice(hf, kind, tuple(slice(None) for _ in shape), shape)
  assert full.shape == shape
  np.testing.assert_array_equal(hf_interop.to_hf(full, kind, vocab), hf)
  if kind in ('embed', 'unembed'):  # padding is zeros
    assert not np.take(full, range(vocab, 12), axis=0 if kind == 'embed' else 1).any()
  for _ in range(20):
    index = []
    for n in shape:
      a = int(rng.integers(0, n))
      index.append(slice(a, int(rng.integers(a + 1, n + 1))))
    np.testing.assert_array_equal(hf_interop.read_slice(hf, kind, tuple(index), shape),
                                  full[tuple(index)])


# -- export of a model trained here --------------------------------------------------

def _randomized_decoder(cfg: model_lib.ModelConfig, seed: int) -> model_lib.Decoder:
  """A Decoder with all parameters random (built from numpy: no per-shape compiles)."""
  rng = np.random.default_rng(seed)
  graphdef, state = hf_interop.abstract_decoder(cfg)
  flat = [(key, v.replace(jnp.asarray(('norm' in str(key)) + 0.1 * rng.standard_normal(v.shape),
                                      v.dtype)))
          for key, v in nnx.to_flat_state(state)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _tiny_tokenizer(path: str):
  from tokenizers import Tokenizer, models, pre_tokenizers
  words = ['<unk>', '<s>', '</s>', 'hello', 'world', 'prefix', 'sharing']
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<s>',
                                              eos_token='</s>', unk_token='<unk>')
  fast.save_pretrained(path)
  return fast


def test_export_of_a_native_model_with_tokenizer_bf16_and_shards(tmp_path):
  cfg = model_lib.ModelConfig(vocab_size=VOCAB, vocab_multiple=128, qkv_bias=True,
                              rope_theta=1e5, rms_eps=1e-5)
  model = _randomized_decoder(cfg, seed=5)
  tokenizer = _tiny_tokenizer(str(tmp_path / 'tok'))
  seqs, row = packed_row()
  ours = _logits_of(model, row)
  out = hf_export.export_hf(model, str(tmp_path / 'f32'), tokenizer_dir=str(tmp_path / 'tok'),
                            dtype='float32', max_shard_bytes=50_000)
  assert json.load(open(os.path.join(out, 'config.json')))['architectures'] == ['Qwen2ForCausalLM']
  index = json.load(open(os.path.join(out, 'model.safetensors.index.json')))
  assert len(set(index['weight_map'].values())) > 2
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, attn_implementation='eager').eval()
  assert max(packed_diffs(ours, seqs, [hf_logits(reloaded, s) for s in seqs])) <= TOL
  assert {'tokenizer.json', 'tokenizer_config.json'} <= set(os.listdir(out))
  # (AutoTokenizer would pick Qwen2's tokenizer class from config.json for this toy.)
  loaded_tok = transformers.PreTrainedTokenizerFast.from_pretrained(out)
  assert loaded_tok.encode('hello prefix sharing') == tokenizer.encode('hello prefix sharing')
  # bfloat16 export: transformers and our loader read the same rounded weights.
  out16 = hf_export.export_hf(model, str(tmp_path / 'bf16'), dtype='bfloat16')
  header, _ = hf_interop.read_safetensors_header(os.path.join(out16, 'model.safetensors'))
  assert {v['dtype'] for k, v in header.items() if k != '__metadata__'} == {'BF16'}
  hf16 = transformers.AutoModelForCausalLM.from_pretrained(
      out16, dtype=torch.float32, attn_implementation='eager').eval()
  back = hf_interop.load_pretrained(out16)
  assert max(packed_diffs(_logits_of(back, row), seqs,
                          [hf_logits(hf16, s) for s in seqs])) <= TOL


def test_export_refuses_an_architecture_that_cannot_hold_the_model(tmp_path):
  model = nnx.eval_shape(lambda: model_lib.Decoder(model_lib.ModelConfig(qk_norm=True),
                                                   rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="try architecture='Qwen3ForCausalLM'"):
    hf_export.export_hf(model, str(tmp_path), architecture='LlamaForCausalLM')


# -- the export CLI on a training checkpoint -------------------------------------------

def test_export_cli_from_a_training_checkpoint(llama_hf, tmp_path):
  from prefix_dpo import checkpoint, config as config_lib, export
  source = str(tmp_path / 'source')
  llama_hf.save_pretrained(source)
  _tiny_tokenizer(source)
  model = hf_interop.load_pretrained(source, vocab_multiple=128)
  # A checkpoint as the trainer writes it: the state's params and the run's config.
  c = config_lib.base_config()
  for field in dataclasses.fields(model.cfg):
    c.model[field.name] = getattr(model.cfg, field.name)
  c.model.hf_path = source
  workdir = str(tmp_path / 'workdir')
  saver = checkpoint.Checkpointer(workdir, asynchronous=False)
  saver.save(7, {'params': nnx.to_pure_dict(nnx.state(model)), 'step': 7}, {}, c)
  saver.wait()
  saver.close()
  out = str(tmp_path / 'exported')
  assert export.main(['--workdir', workdir, '--out', out, '--dtype', 'float32']) == 0
  assert {'tokenizer.json', 'generation_config.json'} <= set(os.listdir(out))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, attn_implementation='eager').eval()
  seqs, _ = packed_row()
  for seq in seqs:
    assert np.abs(hf_logits(reloaded, seq) - hf_logits(llama_hf, seq)).max() <= TOL
