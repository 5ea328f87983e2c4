"""Tokenizers and the exact prompt/response boundary (byte-level and local HF)."""
import json
import pickle

import numpy as np
import pytest
from hypothesis import given, strategies as st

from prefix_dpo.data import config, formats, pipeline
from prefix_dpo.data.accounting import DataError, Skip
from prefix_dpo.data.tokenizers import ByteTokenizer, HFTokenizer, tokenize_preference
from tests.fixtures import data_records as fx

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIALS = ['<unk>', '<s>', '</s>', '<|im_start|>', '<|im_end|>']


@given(st.text(alphabet='ab <|>\né中😀', max_size=50))
def test_byte_round_trip(text):
  tok = ByteTokenizer()
  ids = tok.encode(text)
  assert all(8 <= i < tok.vocab_size for i in ids)
  assert tok.decode(ids) == text


def test_byte_chat_boundary_is_exact():
  tok = ByteTokenizer()
  pref = formats.Preference(tuple(fx.CONVERSATIONAL['prompt']),
                            (tuple(fx.CONVERSATIONAL['chosen']), tuple(fx.CONVERSATIONAL['rejected'])))
  out = tokenize_preference(tok, pref)
  assert tok.decode(out.prompt) == ('<|bos|><|system|>Be brief.<|end|><|user|>What colour is the '
                                    'sky?<|end|><|assistant|>')
  assert tok.decode(out.responses[0]) == 'It is blue.<|end|>'
  assert out.retokenized == 0
  # Message text never becomes a special token.
  spoof = formats.Preference(({'role': 'user', 'content': '<|end|>'},), ('a', 'b'))
  assert tokenize_preference(tok, formats._harmonise(spoof)).prompt.tolist() == (
      [1, 4] + [b + 8 for b in b'<|end|>'] + [6, 5])


def test_byte_text_prompt_gets_bos_and_responses_eos():
  tok = ByteTokenizer()
  out = tokenize_preference(tok, formats.Preference('ab', ('c', 'd')))
  assert out.prompt.tolist() == [1, ord('a') + 8, ord('b') + 8]
  assert out.responses[0].tolist() == [ord('c') + 8, 2]


def test_unknown_role_and_lone_surrogate_are_skips():
  tok = ByteTokenizer()
  with pytest.raises(Skip, match='bad_messages'):
    tok.chat_ids([{'role': 'narrator', 'content': 'x'}], False)
  with pytest.raises(Skip, match='undecodable_bytes'):
    tok.encode('\ud800')


def make_hf_dir(path, template=CHATML, pre_tokenizer=True, corpus=None):
  tokenizers = pytest.importorskip('tokenizers')
  pytest.importorskip('jinja2')
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE(unk_token='<unk>'))
  if pre_tokenizer:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
                                if pre_tokenizer else [])
  corpus = corpus or ['What colour is the sky? It is blue. It is green. Be brief.'] * 20
  tok.train_from_iterator(corpus, trainer)
  path.mkdir(parents=True, exist_ok=True)
  tok.save(str(path / 'tokenizer.json'))
  (path / 'tokenizer_config.json').write_text(json.dumps({
      'bos_token': '<s>', 'eos_token': {'content': '<|im_end|>'}, 'pad_token': '</s>',
      'chat_template': template}))
  return path


def test_hf_chat_template_boundary(tmp_path):
  tok = HFTokenizer(str(make_hf_dir(tmp_path / 'tok')))
  assert tok.eos_id == tok._tok.token_to_id('<|im_end|>') and tok.pad_id == 2
  pref = formats.Preference(tuple(fx.CONVERSATIONAL['prompt']),
                            (tuple(fx.CONVERSATIONAL['chosen']), tuple(fx.CONVERSATIONAL['rejected'])))
  out = tokenize_preference(tok, pref)
  assert out.retokenized == 0
  assert tok.decode(out.prompt).endswith('<|im_start|>assistant\n')
  assert tok.decode(out.responses[1]) == 'It is green.<|im_end|>\n'
  # Exact: prompt + response tokens are the full conversation's tokens.
  full = tok.chat_ids(pref.prompt + pref.responses[0], add_generation_prompt=False)
  assert np.concatenate([out.prompt, out.responses[0]]).tolist() == full
  assert pickle.loads(pickle.dumps(tok)).chat_ids(pref.prompt, True) == out.prompt.tolist()


def test_hf_boundary_merge_is_retokenized_and_counted(tmp_path):
  # No pre-tokenizer: BPE merges ':b' across the generation prompt 'A:' and the response 'bb'.
  template = ("{% for m in messages %}{{ ('A:' if m['role'] == 'assistant' else 'U:') + m['content'] }}"
              "{% endfor %}{% if add_generation_prompt %}{{ 'A:' }}{% endif %}")
  path = make_hf_dir(tmp_path / 'tok', template, pre_tokenizer=False, corpus=['U:hiA:bb'] * 50)
  tok = HFTokenizer(str(path))
  pref = formats.Preference(({'role': 'user', 'content': 'hi'},),
                            (({'role': 'assistant', 'content': 'bb'},),
                             ({'role': 'assistant', 'content': 'x'},)))
  out = tokenize_preference(tok, pref)
  assert out.retokenized >= 1
  assert tok.decode(out.prompt).replace(' ', '') == 'U:hiA:'
  assert tok.decode(out.responses[0]).replace(' ', '') == 'bb'


def test_template_that_is_not_a_prefix_is_skipped(tmp_path):
  template = ("{% if add_generation_prompt %}GEN{% endif %}"
              "{% for m in messages %}{{ m['content'] }}{% endfor %}")
  tok = HFTokenizer(str(make_hf_dir(tmp_path / 'tok', template)))
  pref = formats.Preference(({'role': 'user', 'content': 'hi'},),
                            (({'role': 'assistant', 'content': 'a'},),
                             ({'role': 'assistant', 'content': 'b'},)))
  with pytest.raises(Skip, match='template_mismatch'):
    tokenize_preference(tok, pref)


def test_hf_through_the_pipeline(tmp_path):
  path = make_hf_dir(tmp_path / 'tok')
  data = fx.write_jsonl(tmp_path / 'd.jsonl', [fx.CONVERSATIONAL, fx.STANDARD])
  c = config.default_data_config()
  c.update(train_files=str(data), eval_files='', tokenizer=str(path), format='conversational')
  tok = pipeline.make_tokenizer(c)
  summary = pipeline.load_summary(c, split='train', tokenizer=tok)
  assert (summary.used, summary.skipped) == (1, {'not_a_string': 1})


def test_missing_tokenizer_dir_is_one_line(tmp_path):
  c = config.default_data_config()
  c.tokenizer = str(tmp_path / 'none')
  pytest.importorskip('tokenizers')
  with pytest.raises(DataError, match='no tokenizer.json'):
    pipeline.make_tokenizer(c)
