"""Makes the bundled default data set, data/default/{train,eval}.jsonl, from a seed.

python scripts/make_default_dataset.py [--seed 0] [--train 3000] [--eval 300] [--out data/default]

Synthetic, conversational, multi-turn (TRL conversational format: ``prompt``
is a message list, ``chosen``/``rejected`` one assistant message each). Early
in the conversation the user states a fact (e.g. their home city); small talk
follows; the last user turn asks for it back. The chosen answer repeats the
stated value; the rejected one is the same sentence with another value of the
same kind. Values are drawn uniformly for both, so the responses alone say
nothing: only reading the prompt tells them apart. Prompts (~150-400 bytes)
are several times longer than responses (~20-60 bytes), like Capybara/Tulu.
The held-out split uses the same generator with a different stream of the
same seed, so its conversations are new.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# (kind, question, answer template, how the user states it, values)
FACTS = [
    ('colour', 'what is my favourite colour', 'Your favourite colour is {}.',
     ['my favourite colour is {}', 'I love the colour {}', 'I always wear {}'],
     ['teal', 'amber', 'coral', 'olive', 'ivory', 'indigo', 'maroon', 'violet', 'khaki',
      'scarlet', 'navy', 'beige']),
    ('city', 'which city do I live in', 'You live in {}.',
     ['I live in {}', 'my home is in {}', 'I moved to {} last year'],
     ['Oslo', 'Lima', 'Kyiv', 'Rome', 'Cairo', 'Quito', 'Bern', 'Doha', 'Accra', 'Hanoi',
      'Dakar', 'Perth']),
    ('pet', "what is my dog's name", 'Your dog is called {}.',
     ["my dog's name is {}", 'I have a dog called {}', 'my dog {} is very lazy'],
     ['Biscuit', 'Pepper', 'Mango', 'Ziggy', 'Waffles', 'Nova', 'Rusty', 'Juniper', 'Pixel',
      'Toffee', 'Bruno', 'Luna']),
    ('code', 'what is my locker code', 'Your locker code is {}.',
     ['my locker code is {}', 'the code for my locker is {}', 'I set my locker code to {}'],
     None),  # 4-digit numbers
    ('day', 'which day is my dentist appointment', 'Your appointment is on {}.',
     ['my dentist appointment is on {}', 'I see the dentist on {}', 'the dentist booked me for {}'],
     ['Monday', 'Tuesday', 'Wednesday', 'Thursday', 'Friday', 'Saturday', 'Sunday']),
    ('fruit', 'which fruit do I like best', 'You like {} best.',
     ['my favourite fruit is {}', 'I eat {} every day', 'nothing beats {} for me'],
     ['mango', 'kiwi', 'papaya', 'cherries', 'figs', 'plums', 'lychee', 'apricots', 'melon',
      'guava', 'dates', 'pears']),
]
SYSTEM = ['You are a helpful assistant.', 'You are a friendly assistant. Keep answers short.',
          'You are a concise, careful assistant.']
OPENERS = ['Hi! {}.', 'Hello, quick note: {}.', 'Hey there. By the way, {}.', 'Good morning! {}.']
REPLIES = ['Thanks for telling me. How can I help today?', 'Noted! What would you like to do?',
           'Good to know. What can I do for you?', 'Got it. How can I help?']
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


def _value(rng: random.Random, values: list[str] | None) -> str:
  return values[rng.randrange(len(values))] if values else str(rng.randrange(1000, 10000))


def make_example(rng: random.Random, index: int) -> dict:
  """One conversation: state a fact, small talk, ask for it back."""
  kind, question, answer, statements, values = FACTS[rng.randrange(len(FACTS))]
  true = _value(rng, values)
  other = _value(rng, values)
  while other == true:
    other = _value(rng, values)
  statement = rng.choice(statements).format(true)
  prompt = [{'role': 'system', 'content': rng.choice(SYSTEM)},
            {'role': 'user', 'content': rng.choice(OPENERS).format(statement)},
            {'role': 'assistant', 'content': rng.choice(REPLIES)}]
  for user, assistant in rng.sample(SMALL_TALK, rng.randint(1, 3)):
    prompt += [{'role': 'user', 'content': user}, {'role': 'assistant', 'content': assistant}]
  prompt.append({'role': 'user', 'content': rng.choice(ASKS).format(question)})
  return {'id': index, 'kind': kind, 'prompt': prompt,
          'chosen': [{'role': 'assistant', 'content': answer.format(true)}],
          'rejected': [{'role': 'assistant', 'content': answer.format(other)}]}


def generate(seed: int, count: int, stream: int) -> list[dict]:
  rng = random.Random(f'{seed}/{stream}')  # a string seed hashes the same on every run
  return [make_example(rng, i) for i in range(count)]


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
  parser.add_argument('--out', default=str(Path(__file__).resolve().parents[1] / 'data' / 'default'))
  args = parser.parse_args(argv)
  out = Path(args.out)
  write(out / 'train.jsonl', generate(args.seed, args.train, stream=0))
  write(out / 'eval.jsonl', generate(args.seed, args.eval, stream=1))
  print(f'wrote {args.train} train and {args.eval} eval records to {out}')


if __name__ == '__main__':
  main()
