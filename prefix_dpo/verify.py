"""Self-check: prefix-shared and paired layouts give the same DPO numbers.

``python -m prefix_dpo.verify`` builds a random model and random examples
(1-token responses, long prompts, 3 responses per prompt, several examples per
row), runs both layouts, and prints one JSON line with the differences. The
exit status is non-zero when a difference is above tolerance.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefix_dpo import layout as layout_lib
from prefix_dpo import logprobs as logprobs_lib
from prefix_dpo import losses
from prefix_dpo import model as model_lib

# float32 tolerances. A response's summed log-prob adds one rounding error per
# token (1 ulp of a sum of 150 is already 1.5e-5), so the log-prob tolerance is
# per scored token: |difference of sums| / tokens.
LOGP_TOL = 1e-5
LOSS_TOL = 1e-5
GRAD_REL_TOL = 1e-4


def random_examples(rng: np.random.Generator, vocab_size: int,
                    count: int = 12) -> list[layout_lib.Example]:
  """Varied examples: short and long prompts, 1-token and longer responses, N in {2, 3}."""
  examples = []
  for i in range(count):
    prompt_len = int(rng.integers(1, 8)) if i % 3 else int(rng.integers(40, 80))
    num_responses = 3 if i % 4 == 1 else 2
    responses = [rng.integers(1, vocab_size, size=1 if (i + k) % 5 == 0
                              else int(rng.integers(2, 20))).tolist()
                 for k in range(num_responses)]
    examples.append(layout_lib.Example(rng.integers(1, vocab_size, prompt_len).tolist(),
                                       responses))
  return examples


def dpo_loss(model: model_lib.Decoder, batch, reference_logps):
  logps, counts = logprobs_lib.model_logprobs(model, batch, chunk_size=64)
  loss, _ = losses.dpo_sigmoid(logps, reference_logps, batch['response_mask'])
  return loss, (logps, counts)


_loss_and_grad = nnx.jit(nnx.value_and_grad(dpo_loss, has_aux=True))


@nnx.jit
def _reference_logps(model, batch):
  return logprobs_lib.model_logprobs(model, batch, chunk_size=64)[0]


def run_layout(policy, reference, examples, layout: str, seq_len: int) -> dict:
  batch = layout_lib.build_batch(examples, layout=layout, seq_len=seq_len)
  tokens = layout_lib.count_tokens(batch)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  ref = _reference_logps(reference, batch)
  (loss, (logps, counts)), grads = _loss_and_grad(policy, batch, ref)
  return {'loss': loss, 'logps': logps, 'counts': counts, 'grads': grads,
          'tokens': tokens,
          'rows': batch['input_ids'].shape[0], 'mask': batch['response_mask']}


def max_rel_grad_diff(a, b) -> float:
  """``max|a - b|`` over all parameters, relative to the largest gradient entry.

  Measured against the whole gradient's scale, floored at 1e-3: gradients that
  cancel to ~0 (e.g. identical chosen and rejected responses) are compared in
  absolute terms instead of turning float32 noise into a large ratio.
  """
  a, b = jax.tree.leaves(nnx.to_pure_dict(a)), jax.tree.leaves(nnx.to_pure_dict(b))
  diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(a, b))
  scale = max(float(jnp.max(jnp.abs(x))) for x in a)
  return diff / max(scale, 1e-3)


def verify(cfg: model_lib.ModelConfig, seed: int = 0, count: int = 12) -> dict:
  """Compares both layouts, one example per row and packed; returns the report."""
  policy = model_lib.Decoder(cfg, rngs=nnx.Rngs(seed))
  reference = model_lib.Decoder(cfg, rngs=nnx.Rngs(seed + 1))
  examples = random_examples(np.random.default_rng(seed), cfg.vocab_size, count)
  longest = max(max(layout_lib.sequence_lengths(ex, 'prefix_shared')) for ex in examples)
  report = {'max_abs_logp_diff': 0.0, 'max_abs_logp_diff_per_token': 0.0,
            'loss_abs_diff': 0.0, 'max_rel_grad_diff': 0.0}
  runs = {}
  for name, seq_len in (('unpacked', longest), ('packed', 4 * longest)):
    for layout in layout_lib.LAYOUTS:
      runs[name, layout] = run_layout(policy, reference, examples, layout, seq_len)
  base = runs['unpacked', 'paired']
  for key, run in runs.items():
    mask = np.asarray(run['mask'])
    diff = np.abs(np.asarray(run['logps']) - np.asarray(base['logps']))[mask]
    counts = np.asarray(base['counts'])[mask]
    if not np.array_equal(np.asarray(run['counts'])[mask], counts):
      raise AssertionError(f'{key}: scored token counts differ from paired')
    report['max_abs_logp_diff'] = max(report['max_abs_logp_diff'], float(diff.max()))
    report['max_abs_logp_diff_per_token'] = max(
        report['max_abs_logp_diff_per_token'], float((diff / counts).max()))
    report['loss_abs_diff'] = max(report['loss_abs_diff'],
                                  float(abs(run['loss'] - base['loss'])))
    report['max_rel_grad_diff'] = max(report['max_rel_grad_diff'],
                                      max_rel_grad_diff(base['grads'], run['grads']))
  report.update(
      tokens_paired=runs['unpacked', 'paired']['tokens'],
      tokens_shared=runs['unpacked', 'prefix_shared']['tokens'],
      rows={f'{n}/{l}': r['rows'] for (n, l), r in runs.items()},
      examples=len(examples), loss=float(base['loss']),
      attention_impl=cfg.attention_impl, backend=jax.default_backend())
  report['ok'] = bool(report['max_abs_logp_diff_per_token'] <= LOGP_TOL
                      and report['loss_abs_diff'] <= LOSS_TOL
                      and report['max_rel_grad_diff'] <= GRAD_REL_TOL
                      and report['tokens_shared'] < report['tokens_paired'])
  return report


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='tiny', choices=sorted(model_lib.PRESETS))
  parser.add_argument('--attention_impl', default='xla',
                      choices=model_lib.attention_lib.IMPLS)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--examples', type=int, default=12)
  args = parser.parse_args(argv)
  jax.config.update('jax_default_matmul_precision', 'highest')
  preset = model_lib.PRESETS[args.preset]
  cfg = model_lib.ModelConfig.from_dict({
      **{f: getattr(preset, f) for f in preset.__dataclass_fields__},
      'attention_impl': args.attention_impl, 'dtype': 'float32',
      'param_dtype': 'float32'})
  report = verify(cfg, args.seed, args.examples)
  print(json.dumps(report, sort_keys=True))
  return 0 if report['ok'] else 1


if __name__ == '__main__':
  sys.exit(main())
