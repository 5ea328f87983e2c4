"""Hypothesis strategies for preference examples."""
from hypothesis import strategies as st

from prefix_dpo.layout import Example


def tokens(vocab_size: int, min_size: int, max_size: int):
  return st.lists(st.integers(1, vocab_size - 1), min_size=min_size, max_size=max_size)


@st.composite
def examples(draw, vocab_size=64, max_prompt=12, max_response=6, min_responses=2,
             max_responses=3):
  n = draw(st.integers(min_responses, max_responses))
  return Example(draw(tokens(vocab_size, 1, max_prompt)),
                 [draw(tokens(vocab_size, 1, max_response)) for _ in range(n)])


def example_lists(min_size=1, max_size=4, **kwargs):
  return st.lists(examples(**kwargs), min_size=min_size, max_size=max_size)
