"""Tokenizers (no network) and the exact prompt/response token boundary.

Two tokenizers share one small interface (``vocab_size``, ``pad_id``,
``bos_id``, ``eos_id``, ``encode``, ``decode``, ``chat_ids``, ``render``):

* :class:`ByteTokenizer` -- dependency-free: UTF-8 bytes plus 8 special ids
  and a built-in chat format
  ``<|bos|><|user|>...<|end|><|assistant|>...<|end|>``, rendered straight to
  ids (message text can never turn into special tokens).
* :class:`HFTokenizer` -- a Hugging Face tokenizer read from a local directory
  (``tokenizer.json`` and ``tokenizer_config.json``; the ``chat_template``
  from the config, ``chat_template.jinja`` or ``data.chat_template``). Needs
  the optional packages ``tokenizers`` and ``jinja2``.

The boundary (:func:`tokenize_preference`). Text prompts: prompt = BOS +
``encode(prompt)``, each response = ``encode(response)`` + EOS, encoded
separately as TRL does. Conversations: the prompt is the chat template applied
to the prompt messages with the generation prompt; a response's tokens are
what the full conversation (prompt + response messages, no generation prompt)
adds after those prompt tokens. When the template's text merges across the
boundary (a BPE merge that spans the generation prompt and the response, so
the full conversation's tokens do not start with the prompt's tokens), the
prompt tokens are kept and the response is the remaining *text* encoded on
its own; such responses are counted as ``boundary_retokenized``. A template
that does not render the prompt as a text prefix of the full conversation is
skipped (``template_mismatch``).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any, Protocol, Sequence

import ml_collections
import numpy as np

from prefix_dpo.data.accounting import DataError, Skip
from prefix_dpo.data.formats import Preference


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int
  bos_id: int | None
  eos_id: int | None

  def encode(self, text: str) -> list[int]: ...
  def decode(self, ids: Sequence[int]) -> str: ...
  def text_prompt_ids(self, text: str) -> list[int]: ...
  def chat_ids(self, messages: Sequence[dict], add_generation_prompt: bool) -> list[int]: ...
  def render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes as ids ``8..263``; ids ``0..7`` are special tokens."""

  SPECIALS = ('<|pad|>', '<|bos|>', '<|eos|>', '<|system|>', '<|user|>',
              '<|assistant|>', '<|end|>', '<|tool|>')
  OFFSET = 8
  ROLES = {'system': 3, 'user': 4, 'assistant': 5, 'tool': 7}
  END = 6

  vocab_size = 256 + OFFSET
  pad_id, bos_id, eos_id = 0, 1, 2

  def encode(self, text: str) -> list[int]:
    """Text -> byte ids (special strings are plain text here)."""
    return self._bytes(text).tolist()

  def _bytes(self, text: str) -> np.ndarray:
    try:
      data = text.encode('utf-8')
    except UnicodeEncodeError as e:  # lone surrogates from JSON escapes
      raise Skip('undecodable_bytes', str(e)) from None
    return np.frombuffer(data, np.uint8).astype(np.int32) + self.OFFSET

  def decode(self, ids: Sequence[int]) -> str:
    out, run = [], bytearray()
    for i in ids:
      i = int(i)
      if i >= self.OFFSET:
        run.append(i - self.OFFSET)
        continue
      out.append(run.decode('utf-8', errors='replace'))
      run = bytearray()
      out.append(self.SPECIALS[i])
    out.append(run.decode('utf-8', errors='replace'))
    return ''.join(out)

  def text_prompt_ids(self, text: str) -> list[int]:
    return [self.bos_id] + self.encode(text)

  def response_ids(self, text: str) -> list[int]:
    return self.encode(text) + [self.eos_id]

  def chat_ids(self, messages: Sequence[dict], add_generation_prompt: bool) -> list[int]:
    parts = [_BOS]
    for m in messages:
      role = self.ROLES.get(m['role'])
      if role is None:
        raise Skip('bad_messages', f"role {m['role']!r}; byte chat format knows {sorted(self.ROLES)}")
      parts.append(_byte_message(role, m['content']))
    if add_generation_prompt:
      parts.append(_ASSISTANT)
    return np.concatenate(parts).tolist()

  def render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    return self.decode(self.chat_ids(messages, add_generation_prompt))

  def __repr__(self) -> str:
    return 'ByteTokenizer(vocab_size=264)'


_BOS = np.array([ByteTokenizer.bos_id], np.int32)
_ASSISTANT = np.array([ByteTokenizer.ROLES['assistant']], np.int32)


@functools.lru_cache(maxsize=256)
def _byte_message(role: int, content: str) -> np.ndarray:
  """``role content <|end|>`` ids; cached: a prompt is rendered once per response."""
  ids = np.concatenate([[role], ByteTokenizer()._bytes(content), [ByteTokenizer.END]])
  ids = ids.astype(np.int32)
  ids.setflags(write=False)
  return ids


def _token_str(value: Any) -> str | None:
  if isinstance(value, dict):  # AddedToken serialised as a dict
    return value.get('content')
  return value


class HFTokenizer:
  """A Hugging Face ``tokenizers`` tokenizer plus a jinja2 chat template."""

  def __init__(self, path: str, chat_template: str = ''):
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise DataError(f'data.tokenizer={path!r} needs the optional package '
                      '`tokenizers` (pip install tokenizers jinja2)') from None
    root = Path(path)
    if not (root / 'tokenizer.json').is_file():
      found = sorted(p.name for p in root.iterdir()) if root.is_dir() else 'no such directory'
      raise DataError(f'data.tokenizer={path!r}: no tokenizer.json (found {found}); '
                      "use 'byte' or a local Hugging Face tokenizer directory")
    self.path = str(root)
    self._tok = tokenizers.Tokenizer.from_file(str(root / 'tokenizer.json'))
    config = {}
    if (root / 'tokenizer_config.json').is_file():
      config = json.loads((root / 'tokenizer_config.json').read_text())
    self.bos_token = _token_str(config.get('bos_token'))
    self.eos_token = _token_str(config.get('eos_token'))
    pad_token = _token_str(config.get('pad_token'))
    self.bos_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
    self.eos_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
    pad_id = self._tok.token_to_id(pad_token) if pad_token else None
    self.pad_id = pad_id if pad_id is not None else (self.eos_id or 0)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.chat_template = self._find_template(root, config, chat_template)
    self._template = None  # compiled lazily: jinja templates do not pickle

  @staticmethod
  def _find_template(root: Path, config: dict, override: str) -> str | None:
    if override:
      return Path(override).read_text() if os.path.isfile(override) else override
    template = config.get('chat_template')
    if isinstance(template, list):  # [{'name': 'default', 'template': ...}, ...]
      named = {t['name']: t['template'] for t in template}
      template = named.get('default', next(iter(named.values()), None))
    if template is None and (root / 'chat_template.jinja').is_file():
      template = (root / 'chat_template.jinja').read_text()
    return template

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_template'] = None
    return state

  def encode(self, text: str) -> list[int]:
    try:
      return self._tok.encode(text, add_special_tokens=False).ids
    except Exception as e:  # lone surrogates cannot cross into Rust
      if isinstance(e, (TypeError, UnicodeEncodeError)) or 'surrogate' in str(e):
        raise Skip('undecodable_bytes', str(e)) from None
      raise

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def text_prompt_ids(self, text: str) -> list[int]:
    ids = self._tok.encode(text, add_special_tokens=True).ids
    if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
      ids = [self.bos_id] + ids  # a prompt needs a first token to score from
    return ids

  def response_ids(self, text: str) -> list[int]:
    return self.encode(text) + ([self.eos_id] if self.eos_id is not None else [])

  def render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    if self._template is None:
      if not self.chat_template:
        raise DataError(f'data.tokenizer={self.path!r} has no chat_template for '
                        'conversational data; set data.chat_template')
      try:
        import jinja2  # pylint: disable=g-import-not-at-top
        from jinja2 import sandbox  # pylint: disable=g-import-not-at-top
      except ImportError:
        raise DataError('chat templates need the optional package `jinja2` '
                        '(pip install jinja2)') from None

      def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

      env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
      env.filters['tojson'] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
      env.globals['raise_exception'] = raise_exception
      self._template = env.from_string(self.chat_template)
    try:
      return self._template.render(
          messages=list(messages), add_generation_prompt=add_generation_prompt,
          bos_token=self.bos_token or '', eos_token=self.eos_token or '')
    except Exception as e:  # a template's raise_exception: e.g. roles must alternate
      raise Skip('bad_messages', f'chat template: {e}') from None

  def chat_ids(self, messages: Sequence[dict], add_generation_prompt: bool) -> list[int]:
    # The template writes BOS itself when it wants one.
    return self.encode(self.render(messages, add_generation_prompt))

  def __repr__(self) -> str:
    return f'HFTokenizer({self.path!r}, vocab_size={self.vocab_size})'


def make_tokenizer(data_cfg: ml_collections.ConfigDict):
  """``data.tokenizer``: ``'byte'`` or a local Hugging Face tokenizer directory."""
  if data_cfg.tokenizer == 'byte':
    return ByteTokenizer()
  return HFTokenizer(data_cfg.tokenizer, data_cfg.chat_template)


@dataclasses.dataclass(frozen=True)
class Tokenized:
  """Token ids of one preference; ``retokenized`` counts boundary fallbacks."""
  prompt: np.ndarray
  responses: tuple[np.ndarray, ...]
  retokenized: int = 0


def tokenize_preference(tokenizer, pref: Preference) -> Tokenized:
  """Prompt and response ids with the exact boundary described above."""
  as_array = lambda ids: np.asarray(ids, np.int32)
  if isinstance(pref.prompt, str):
    prompt = tokenizer.text_prompt_ids(pref.prompt)
    return Tokenized(as_array(prompt),
                     tuple(as_array(tokenizer.response_ids(r)) for r in pref.responses))
  prompt = tokenizer.chat_ids(pref.prompt, add_generation_prompt=True)
  n = len(prompt)
  responses, retokenized = [], 0
  for response in pref.responses:
    full = tokenizer.chat_ids(pref.prompt + tuple(response), add_generation_prompt=False)
    if full[:n] == prompt:
      responses.append(as_array(full[n:]))
      continue
    prompt_text = tokenizer.render(pref.prompt, add_generation_prompt=True)
    full_text = tokenizer.render(pref.prompt + tuple(response), add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
      raise Skip('template_mismatch', 'the rendered prompt is not a prefix of the conversation')
    responses.append(as_array(tokenizer.encode(full_text[len(prompt_text):])))
    retokenized += 1
  return Tokenized(as_array(prompt), tuple(responses), retokenized)
