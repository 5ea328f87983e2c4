import numpy as np
import pytest
from hypothesis import given, strategies as st

from prefix_dpo import layout
from prefix_dpo.layout import Example
from tests import strategies


def standalone(example, k):
  """The paired row of response k, built by hand."""
  return list(example.prompt) + list(example.responses[k])


@given(strategies.example_lists(max_size=5), st.sampled_from(layout.LAYOUTS),
       st.integers(0, 20))
def test_each_response_sees_exactly_its_standalone_sequence(examples, name, extra):
  longest = max(max(layout.sequence_lengths(ex, name)) for ex in examples)
  batch = layout.build_batch(examples, layout=name, seq_len=longest + extra)
  n = batch['response_mask'].shape[1]
  for e, ex in enumerate(examples):
    for k, response in enumerate(ex.responses):
      slot = e * n + k
      rows, cols = np.nonzero(batch['target_slot'] == slot)
      assert len(set(rows)) == 1 and len(cols) == len(response)
      row = rows[0]
      np.testing.assert_array_equal(batch['input_ids'][row, cols], response)
      # RoPE positions continue from the prompt, as in the standalone row.
      p = len(ex.prompt)
      np.testing.assert_array_equal(batch['positions'][row, cols], np.arange(p, p + len(response)))
      # The predicting token of each response token is its predecessor in the
      # standalone sequence; its context (tokens visible to it) is that sequence.
      seg, br = batch['segment_ids'][row], batch['branch_ids'][row]
      for j, col in enumerate(cols):
        pred = batch['logit_index'][row, col]
        visible = np.nonzero((seg == seg[pred]) & (np.arange(len(seg)) <= pred)
                             & ((br == 0) | (br == br[pred])))[0]
        np.testing.assert_array_equal(batch['input_ids'][row, visible],
                                      standalone(ex, k)[:p + j])
        np.testing.assert_array_equal(batch['positions'][row, visible], np.arange(p + j))
      assert batch['response_row'][slot] == row
      assert batch['response_end'][slot] == cols[-1]
  assert batch['response_mask'].sum() == sum(len(ex.responses) for ex in examples)
  # Padding is segment 0 with no targets.
  pad = batch['segment_ids'] == 0
  assert (batch['target_slot'][pad] == -1).all() and (batch['input_ids'][pad] == 0).all()


@given(strategies.example_lists(max_size=6))
def test_prefix_shared_uses_fewer_tokens_by_the_duplicated_prompts(examples):
  paired = layout.build_batch(examples, layout='paired', seq_len=64)
  shared = layout.build_batch(examples, layout='prefix_shared', seq_len=64)
  saved = sum((len(ex.responses) - 1) * len(ex.prompt) for ex in examples)
  assert layout.count_tokens(paired) - layout.count_tokens(shared) == saved


def test_packing_places_several_examples_per_row_with_distinct_segments():
  examples = [Example([1, 2], [[3], [4]]) for _ in range(5)]
  batch = layout.build_batch(examples, layout='prefix_shared', seq_len=8)
  assert batch['input_ids'].shape == (3, 8)
  np.testing.assert_array_equal(batch['segment_ids'][0], [1, 1, 1, 1, 2, 2, 2, 2])
  np.testing.assert_array_equal(batch['positions'][0], [0, 1, 2, 2, 0, 1, 2, 2])
  np.testing.assert_array_equal(batch['branch_ids'][0], [0, 0, 1, 2, 0, 0, 1, 2])
  # Both first response tokens are predicted by the last prompt token.
  np.testing.assert_array_equal(batch['logit_index'][0, [2, 3]], [1, 1])


def test_an_explicit_placement_is_honoured_and_checked():
  examples = [Example([1, 2], [[3], [4, 5]]), Example([6], [[7], [8]])]
  # paired: sequences (0,0) (0,1) (1,0) (1,1), each row written in that order.
  batch = layout.build_batch(examples, layout='paired', seq_len=6, num_rows=2,
                             placement=[1, 0, 0, 1])
  np.testing.assert_array_equal(batch['input_ids'], [[1, 2, 4, 5, 6, 7], [1, 2, 3, 6, 8, 0]])
  np.testing.assert_array_equal(batch['segment_ids'][1], [1, 1, 1, 2, 2, 0])
  np.testing.assert_array_equal(batch['response_row'], [1, 0, 0, 1])
  np.testing.assert_array_equal(batch['response_end'], [2, 3, 5, 4])
  build = lambda placement, **kw: layout.build_batch(
      examples, layout='paired', seq_len=6, num_rows=2, placement=placement, **kw)
  with pytest.raises(ValueError, match='placement has 3 rows for 4 sequences'):
    build([0, 0, 1])
  with pytest.raises(ValueError, match='example 1: placed in row 2, outside 2 rows'):
    build([1, 0, 0, 2])
  with pytest.raises(ValueError, match='example 0: row 0 overflows seq_len=6'):
    build([0, 0, 0, 1])
  with pytest.raises(ValueError, match='one sequence per row'):
    build([0, 1, 1, 0], pack=False)


def test_static_shapes_pad_rows_and_example_slots():
  batch = layout.build_batch([Example([1], [[2], [3]])], layout='paired', seq_len=4,
                             num_rows=3, max_examples=2, num_responses=3)
  assert batch['input_ids'].shape == (3, 4)
  np.testing.assert_array_equal(batch['response_mask'],
                                [[True, True, False], [False, False, False]])


@pytest.mark.parametrize('example, match', [
    (Example([1, 2], [[3], []]), 'example 1: response 1 is empty'),
    (Example([], [[3], [4]]), 'example 1: empty prompt'),
    (Example([1], []), 'example 1: has no responses'),
    (Example([1] * 10, [[2], [3]]), 'example 1: sequence of 12 tokens does not fit'),
    (Example([[1, 2]], [[2], [3]]), 'example 1: prompt: expected a 1-D'),
    (Example([1], [[2], [3.5]]), 'example 1: response 1: expected a 1-D'),
])
def test_bad_examples_name_the_example(example, match):
  good = Example([1], [[2], [3]])
  with pytest.raises(ValueError, match=match):
    layout.build_batch([good, example], layout='prefix_shared', seq_len=8)


def test_too_many_responses_examples_or_rows_are_errors():
  ex = Example([1], [[2], [3], [4]])
  with pytest.raises(ValueError, match='example 0: has 3 responses'):
    layout.build_batch([ex], layout='paired', seq_len=8, num_responses=2)
  with pytest.raises(ValueError, match='exceed max_examples=1'):
    layout.build_batch([ex, ex], layout='paired', seq_len=8, max_examples=1)
  with pytest.raises(ValueError, match='example 1: does not fit in 1 rows'):
    layout.build_batch([ex, ex], layout='prefix_shared', seq_len=4, num_rows=1)
  with pytest.raises(ValueError, match='unknown layout'):
    layout.build_batch([ex], layout='shared', seq_len=8)
