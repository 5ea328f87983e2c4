"""Makes the bundled default data set, data/default/{train,eval}.jsonl, from a seed.

python scripts/make_default_dataset.py [--seed 0] [--train 3000] [--eval 300] [--out data/default]
python scripts/make_default_dataset.py --responses 3 --out runs/ranked   # ranked variant

Synthetic, conversational, multi-turn (TRL conversational format: ``prompt``
is a message list, ``chosen``/``rejected`` one assistant message each). Early
in the conversation the user states a fact (a locker code, a room number, ...); small talk
follows; the last user turn asks for it back. The assistant echoes the value
when it is stated, the chosen answer repeats it, and the rejected one is the
same sentence with another number of as many digits, none of them shared. Both values are drawn uniformly,
so the responses alone say nothing: only reading the prompt tells them apart. Prompts (~150-400 bytes)
are several times longer than responses (~20-60 bytes), like Capybara/Tulu.
The held-out split uses the same generator with a different stream of the
same seed, so its conversations are new.

With ``--responses N`` (N > 2) it writes the ``ranked`` format instead
(``prompt``, ``responses``, ``scores``), for listwise losses: response k has
about ``(N-1-k)/(N-1)`` of the value's digits right, in place (the others
wrong and not in the value), and its score is the number of right digits.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# (kind, question, answer template, ways the user states it, digits of the value).
# Values are numbers and the small talk has no digits, so the digits of the
# prompt are the fact's: a tiny model can learn to copy them.
FACTS = [
    ('locker', 'what is my locker code', 'Your locker code is {}.',
     ['my locker code is {}', 'the code for my locker is {}', 'I set my locker code to {}'], 4),
    ('room', 'which room am I in', 'You are in room {}.',
     ['I am staying in room {}', 'my hotel room is {}', 'they gave me room {}'], 3),
    ('gate', 'which gate does my flight leave from', 'Your flight leaves from gate {}.',
     ['my flight leaves from gate {}', 'I board at gate {}', 'the app says gate {} for my flight'], 2),
    ('order', 'what is my order number', 'Your order number is {}.',
     ['my order number is {}', 'I placed order {} yesterday', 'the shop gave me order number {}'], 5),
    ('bus', 'which bus do I take home', 'You take bus {} home.',
     ['I take bus {} home', 'the bus I ride home is the {}', 'bus {} stops by my house'], 3),
    ('pin', 'what is my bike lock number', 'Your bike lock number is {}.',
     ['my bike lock number is {}', 'I set my bike lock to {}', 'the bike lock opens with {}'], 4),
]
SYSTEM = ['You are a helpful assistant.', 'You are a friendly assistant. Keep answers short.',
          'You are a concise, careful assistant.']
OPENERS = ['Hi! {}.', 'Hello, quick note: {}.', 'Hey there. By the way, {}.', 'Good morning! {}.']
_SENTENCE_START = ('Hi! {}', 'Good morning! {}')
# The assistant repeats the value back (as assistants do), so it appears twice.
REPLIES = ['Thanks, I will remember {}. How can I help today?', 'Noted: {}. What would you like to do?',
           'Good to know, {}. What can I do for you?', 'Got it, {}. How can I help?']
SMALL_TALK = [
    ('Can you suggest a quick breakfast?', 'Try oats with yogurt and some nuts.'),
    ('How do I keep my plants alive?', 'Water them weekly and give them some light.'),
    ('Any tips for sleeping better?', 'Keep a fixed bedtime and avoid screens late.'),
    ('What is a good way to learn a language?', 'Practise a little every day and speak often.'),
    ('How long should I boil an egg?', 'About nine minutes for a firm yolk.'),
    ('Is walking good exercise?', 'Yes, a brisk daily walk helps a lot.'),
    ('How can I save money on food?', 'Plan meals and buy basics in bulk.'),
    ('What should I read next?', 'A short novel or a book of essays might suit you.'),
    ('How do I stay focused at work?', 'Work in short blocks and take small breaks.'),
    ('Can you name a board game for four?', 'Try a cooperative game; they are fun in groups.'),
]
ASKS = ['Thanks. Remind me, {}?', 'One more thing: {}?', 'Before I go, {}?', 'Quick question, {}?']


def _value(rng: random.Random, digits: int, avoid: str = '') -> str:
  """A number of ``digits`` digits, none of them in ``avoid``."""
  allowed = [d for d in '0123456789' if d not in avoid]
  while True:
    value = ''.join(rng.choice(allowed) for _ in range(digits))
    if value[0] != '0':
      return value


def _partly_right(rng: random.Random, true: str, right: int) -> str:
  """``true`` with all but ``right`` of its digits (at random places) replaced
  by digits it does not contain."""
  keep = set(rng.sample(range(len(true)), right))
  wrong = [d for d in '0123456789' if d not in true]
  return ''.join(c if i in keep else rng.choice([d for d in wrong if i or d != '0'])
                 for i, c in enumerate(true))


def make_example(rng: random.Random, index: int, responses: int = 2) -> dict:
  """One conversation: state a fact, small talk, ask for it back."""
  kind, question, answer, statements, digits = FACTS[rng.randrange(len(FACTS))]
  true = _value(rng, digits)
  # The other value shares no digit with the true one: every digit of the
  # answer is then evidence, and the two are drawn alike (symmetric).
  other = _value(rng, digits, avoid=true)
  statement = rng.choice(statements).format(true)
  opener = rng.choice(OPENERS)
  if opener.startswith(_SENTENCE_START):
    statement = statement[0].upper() + statement[1:]
  prompt = [{'role': 'system', 'content': rng.choice(SYSTEM)},
            {'role': 'user', 'content': opener.format(statement)},
            {'role': 'assistant', 'content': rng.choice(REPLIES).format(true)}]
  for user, assistant in rng.sample(SMALL_TALK, rng.randint(0, 3)):
    prompt += [{'role': 'user', 'content': user}, {'role': 'assistant', 'content': assistant}]
  prompt.append({'role': 'user', 'content': rng.choice(ASKS).format(question)})
  if responses > 2:
    right = [round(digits * (responses - 1 - k) / (responses - 1)) for k in range(responses)]
    values = [_partly_right(rng, true, r) for r in right]
    return {'id': index, 'kind': kind, 'prompt': prompt, 'scores': right,
            'responses': [[{'role': 'assistant', 'content': answer.format(v)}] for v in values]}
  return {'id': index, 'kind': kind, 'prompt': prompt,
          'chosen': [{'role': 'assistant', 'content': answer.format(true)}],
          'rejected': [{'role': 'assistant', 'content': answer.format(other)}]}


def generate(seed: int, count: int, stream: int, responses: int = 2) -> list[dict]:
  rng = random.Random(f'{seed}/{stream}')  # a string seed hashes the same on every run
  return [make_example(rng, i, responses) for i in range(count)]


def write(path: Path, records: list[dict]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False, separators=(',', ':')) + '\n')


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--train', type=int, default=3000)
  parser.add_argument('--eval', type=int, default=300)
  parser.add_argument('--responses', type=int, default=2,
                      help='responses per prompt; > 2 writes the ranked format')
  parser.add_argument('--out', default=str(Path(__file__).resolve().parents[1] / 'data' / 'default'))
  args = parser.parse_args(argv)
  out = Path(args.out)
  if args.responses < 2:
    parser.error(f'--responses must be >= 2, got {args.responses}')
  write(out / 'train.jsonl', generate(args.seed, args.train, stream=0, responses=args.responses))
  write(out / 'eval.jsonl', generate(args.seed, args.eval, stream=1, responses=args.responses))
  print(f'wrote {args.train} train and {args.eval} eval records to {out}')


if __name__ == '__main__':
  main()
