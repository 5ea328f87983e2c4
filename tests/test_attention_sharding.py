"""The Pallas kernel inside a sharded jit (8 simulated devices, interpret mode)."""
import subprocess
import sys
import textwrap

from tests.train_helpers import ROOT, env

SCRIPT = textwrap.dedent('''
  import dataclasses, jax, jax.numpy as jnp, numpy as np
  from flax import nnx
  from prefix_dpo import layout, logprobs, model as model_lib, sharding
  from prefix_dpo.layout import Example
  jax.config.update('jax_default_matmul_precision', 'highest')
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  examples = [Example([1, 2, 3, 4, 5], [[6, 7], [8]]), Example([9, 10], [[11], [12, 13, 14]]),
              Example([3] * 9, [[4, 5, 6], [7]]), Example([2], [[5], [6]])]
  batch = layout.build_batch(examples, layout='prefix_shared', seq_len=24, num_rows=4)
  results = {}
  for impl in ('xla', 'pallas'):
    cfg = dataclasses.replace(model_lib.PRESETS['tiny'], vocab_size=32, num_layers=1,
                              attention_impl=impl)
    model = sharding.create_sharded(lambda: model_lib.Decoder(cfg, rngs=nnx.Rngs(0)), mesh)
    graphdef, params = nnx.split(model)
    device_batch = sharding.global_batch(batch, mesh)
    def loss(params, batch):
      return logprobs.model_logprobs(nnx.merge(graphdef, params), batch)[0].sum()
    with jax.set_mesh(mesh):
      value, grads = jax.jit(jax.value_and_grad(loss))(params, device_batch)
    results[impl] = (float(value), jax.tree.leaves(jax.tree.map(np.asarray, nnx.to_pure_dict(grads))))
  (a, ga), (b, gb) = results['xla'], results['pallas']
  assert abs(a - b) < 1e-4, (a, b)
  for x, y in zip(ga, gb):
    np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-3)
  print('OK', a, b)
''')


def test_pallas_attention_in_a_sharded_step_matches_xla():
  result = subprocess.run([sys.executable, '-c', SCRIPT], env=env(8), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith('OK')
