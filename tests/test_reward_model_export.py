"""Reward-model runs: loaded back as a RewardModel, exported as ``*ForSequenceClassification``.

A tiny reward model is trained for a few steps through the real CLI; its
checkpoint must score like the trained state, and the exported directory,
loaded by ``transformers.AutoModelForSequenceClassification`` (CPU, float32),
must score every ``[prompt | response]`` as our prefix-shared batch does.
"""
import dataclasses
import itertools
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from prefix_dpo import checkpoint, export, hf_export, hf_interop, layout, losses  # noqa: E402
from prefix_dpo import metrics, model as model_lib  # noqa: E402
from prefix_dpo.data import pipeline  # noqa: E402
from prefix_dpo.reward_model import RewardModel  # noqa: E402
from tests.train_helpers import read_metrics, run_training  # noqa: E402

os.environ.setdefault('HF_HUB_OFFLINE', '1')
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

TOL = 1e-4  # float32 scores, absolute
PAD, EOS = 0, 2  # the byte tokenizer's <|pad|> and <|eos|>
# Byte-tokenizer ids (8..263); every response ends with EOS, as the data pipeline writes it.
EXAMPLES = [
    layout.Example([1, 72, 101, 108], [[108, 111, EOS], [33, 33, 33, 63, EOS], [EOS]]),
    layout.Example([1, 200], [[150, 151, 152, 153, 154, EOS], [9, EOS]]),
    layout.Example([1, 80, 81, 82, 83, 84, 85], [[90, EOS], [91, 92, EOS]]),
]

scores_of = nnx.jit(lambda model, batch: model.scores(batch))


def as_jax(batch):
  return {k: jnp.asarray(v) for k, v in batch.items() if k != 'example_id'}


def our_scores(model: RewardModel) -> np.ndarray:
  """``[E, N]`` scores of EXAMPLES, all responses of an example behind one shared prompt."""
  batch = layout.build_batch(EXAMPLES, layout='prefix_shared', seq_len=64, num_responses=3)
  return np.asarray(scores_of(model, as_jax(batch)))


def hf_scores(hf_model) -> np.ndarray:
  """``[E, N]`` scores of each standalone ``[prompt | response]``, in one right-padded batch."""
  sequences = [list(ex.prompt) + list(r) for ex in EXAMPLES for r in ex.responses]
  ids = torch.full((len(sequences), max(map(len, sequences))), PAD)
  for i, seq in enumerate(sequences):
    ids[i, :len(seq)] = torch.tensor(seq)
  with torch.no_grad():
    flat = hf_model(input_ids=ids, attention_mask=(ids != PAD).long()).logits[:, 0].numpy()
  scores, i = np.zeros((len(EXAMPLES), 3), np.float32), 0
  for e, ex in enumerate(EXAMPLES):
    scores[e, :len(ex.responses)] = flat[i:i + len(ex.responses)]
    i += len(ex.responses)
  return scores


def load_classifier(path: str):
  return transformers.AutoModelForSequenceClassification.from_pretrained(
      path, dtype=torch.float32, attn_implementation='eager').eval()


def max_score_difference(ours: np.ndarray, theirs: np.ndarray) -> float:
  real = np.zeros(ours.shape, bool)
  for e, ex in enumerate(EXAMPLES):
    real[e, :len(ex.responses)] = True
  assert np.ptp(ours[real]) > 1e-3  # the responses' scores differ: the check has teeth
  return float(np.abs(ours - theirs)[real].max())


@pytest.fixture(scope='module')
def workdir(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp('reward_model') / 'run')
  run_training(path, '--config.loss.type=reward_model', '--config.seq_len=256', steps=3)
  return path


def eval_loss(model: RewardModel, c) -> float:
  """The trainer's final ``eval/loss`` (mean over pairs), recomputed from ``model``'s scores."""
  batches = pipeline.make_batch_iterator(
      c.data, split='eval', tokenizer=pipeline.make_tokenizer(c.data), layout=c.layout,
      seq_len=c.seq_len, rows=c.batch.rows, max_examples=c.batch.max_examples,
      num_responses=c.num_responses, pack=c.pack, seed=c.seed, num_epochs=1)
  total = pairs = 0.0
  for batch in itertools.islice(batches, c.train.eval_batches):
    loss, _ = losses.compute_loss(c.loss, policy_logps=None, reference_logps=None, counts=None,
                                  response_mask=jnp.asarray(batch['response_mask']),
                                  scores=scores_of(model, as_jax(batch)))
    count = metrics.batch_stats(batch)['pairs']
    total, pairs = total + float(loss) * count, pairs + count
  return total / pairs


def test_load_policy_restores_the_trained_reward_model(workdir):
  model, config = checkpoint.load_policy(workdir)
  assert isinstance(model, RewardModel)
  fresh = RewardModel(model.cfg, rngs=nnx.Rngs(config.seed))
  assert not np.allclose(model.value_head[...], fresh.value_head[...])  # trained, not initial
  assert eval_loss(model, config) == pytest.approx(read_metrics(workdir)[-1]['eval/loss'],
                                                   abs=1e-5)


@pytest.fixture(scope='module')
def exported(workdir, tmp_path_factory) -> str:
  out = str(tmp_path_factory.mktemp('exported') / 'reward_model')
  assert export.main(['--workdir', workdir, '--out', out, '--dtype', 'float32']) == 0
  return out


def test_export_is_a_one_label_sequence_classifier(exported):
  with open(os.path.join(exported, 'config.json'), encoding='utf-8') as f:
    config = json.load(f)
  assert config['architectures'] == ['LlamaForSequenceClassification']
  assert config['pad_token_id'] == PAD  # the run's padding, not the EOS ending each response
  header, _ = hf_interop.read_safetensors_header(os.path.join(exported, 'model.safetensors'))
  assert header['score.weight']['shape'] == [1, 32]
  assert not [name for name in header if name.startswith('lm_head')]


def test_transformers_scores_equal_ours(workdir, exported):
  model, _ = checkpoint.load_policy(workdir)
  hf_model = load_classifier(exported)
  assert hf_model.config.num_labels == 1
  assert max_score_difference(our_scores(model), hf_scores(hf_model)) <= TOL


def test_qwen2_with_tied_embeddings_exports_too(tmp_path):
  cfg = dataclasses.replace(model_lib.PRESETS['tiny'], vocab_size=264, vocab_multiple=128,
                            qkv_bias=True, tie_embeddings=True)
  model = RewardModel(cfg, rngs=nnx.Rngs(0))
  out = hf_export.export_hf(model, str(tmp_path / 'qwen2'), dtype='float32', pad_token_id=PAD)
  hf_model = load_classifier(out)
  assert type(hf_model).__name__ == 'Qwen2ForSequenceClassification'
  assert max_score_difference(our_scores(model), hf_scores(hf_model)) <= TOL


@pytest.mark.parametrize('kwargs, message', [
    (dict(), 'needs pad_token_id'),
    (dict(pad_token_id=264), 'pad_token_id=264 is not a token id'),
    (dict(pad_token_id=PAD, architecture='GPT2LMHeadModel'),
     "no sequence-classification architecture for 'GPT2LMHeadModel'"),
])
def test_bad_reward_model_exports_are_named(tmp_path, kwargs, message):
  cfg = dataclasses.replace(model_lib.PRESETS['tiny'], vocab_size=264)
  model = nnx.eval_shape(lambda: RewardModel(cfg, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=message):
    hf_export.export_hf(model, str(tmp_path), **kwargs)


def test_export_cli_refuses_eos_as_padding(workdir, tmp_path, capsys):
  out = str(tmp_path / 'eos')
  assert export.main(['--workdir', workdir, '--out', out, '--pad_token_id', str(EOS)]) == 1
  assert 'is the EOS id that ends every response' in capsys.readouterr().err
  assert not os.path.exists(out)
