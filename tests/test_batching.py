"""Batching: shapes, padding sides, loss masks, truncation counts."""

import numpy as np
from numpy.testing import assert_array_equal
import pytest

from rlhf_jax.data import batching
from rlhf_jax.data import tokenizer as tokenizer_lib


class _LetterTok:
  """'a' -> 10, 'b' -> 11, ...; so expected batches can be written by hand."""

  pad_id, bos_id, eos_id = 0, 2, 3

  def encode(self, text):
    return [ord(c) - ord("a") + 10 for c in text]


TOK = _LetterTok()


def test_lm_batch():
  batch, stats = batching.lm_batch(TOK, ["ab", "abcdef"], seq_len=5)
  assert_array_equal(batch["tokens"], [[2, 10, 11, 3, 0], [2, 10, 11, 12, 13]])
  assert_array_equal(batch["mask"], [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
  assert_array_equal(batch["loss_mask"], [[0, 1, 1, 1, 0], [0, 1, 1, 1, 1]])
  assert batch["tokens"].dtype == np.int32 and batch["mask"].dtype == np.int32
  assert batch["loss_mask"].dtype == np.float32
  assert stats == batching.TruncationStats(texts=2, texts_truncated=1)


def test_prompt_batch_left_pads_and_keeps_newest_tokens():
  batch, stats = batching.prompt_batch(TOK, ["ab", "abcde", "abc"],
                                       prompt_len=4)
  assert_array_equal(batch["tokens"], [[0, 2, 10, 11], [2, 12, 13, 14],
                                       [2, 10, 11, 12]])
  assert_array_equal(batch["mask"], [[0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]])
  assert set(batch) == {"tokens", "mask"}
  assert stats == batching.TruncationStats(prompts=3, prompts_truncated=1)


def test_sft_batch():
  prompts, responses = ["ab", "abcde", "a"], ["c", "defg", "ab"]
  batch, stats = batching.sft_batch(TOK, prompts, responses, prompt_len=4,
                                    response_len=3)
  assert_array_equal(batch["tokens"], [
      [0, 2, 10, 11, 12, 3, 0],
      [2, 12, 13, 14, 13, 14, 15],  # both parts truncated; eos dropped
      [0, 0, 2, 10, 10, 11, 3],  # response fits exactly with its eos
  ])
  assert_array_equal(batch["mask"], [[0, 1, 1, 1, 1, 1, 0], [1] * 7,
                                     [0, 0, 1, 1, 1, 1, 1]])
  assert_array_equal(batch["loss_mask"], [[0, 0, 0, 0, 1, 1, 0],
                                          [0, 0, 0, 0, 1, 1, 1],
                                          [0, 0, 0, 0, 1, 1, 1]])
  assert stats == batching.TruncationStats(
      prompts=3, prompts_truncated=1, responses=3, responses_truncated=1)

  unmasked, _ = batching.sft_batch(TOK, prompts, responses, 4, 3,
                                   mask_prompt=False)
  assert_array_equal(unmasked["tokens"], batch["tokens"])
  assert_array_equal(unmasked["loss_mask"], [[0, 0, 1, 1, 1, 1, 0],
                                             [0, 1, 1, 1, 1, 1, 1],
                                             [0, 0, 0, 1, 1, 1, 1]])


def test_response_of_exactly_r_tokens_counts_as_truncated():
  batch, stats = batching.sft_batch(TOK, ["a"], ["abc"], 2, 3)
  assert_array_equal(batch["tokens"], [[2, 10, 10, 11, 12]])
  assert stats.responses_truncated == 1


def test_comparison_batch():
  batch, stats = batching.comparison_batch(
      TOK, ["ab", "c"], [["x", "yz", "w"], ["a", "b"]], [[2, 0, 1], [0, 1]],
      prompt_len=3, response_len=2, max_k=3)
  assert batch["tokens"].shape == (2, 3, 5)
  assert_array_equal(batch["tokens"][0], [[2, 10, 11, 33, 3],
                                          [2, 10, 11, 34, 35],
                                          [2, 10, 11, 32, 3]])
  # Slot 2 of example 1 is padding: a copy of slot 0, masked out by
  # response_mask and ranked max_k.
  assert_array_equal(batch["tokens"][1], [[0, 2, 12, 10, 3],
                                          [0, 2, 12, 11, 3],
                                          [0, 2, 12, 10, 3]])
  assert_array_equal(batch["mask"][1], [[0, 1, 1, 1, 1]] * 3)
  assert_array_equal(batch["response_mask"], [[1, 1, 1], [1, 1, 0]])
  assert_array_equal(batch["ranks"], [[1, 2, 0], [0, 1, 3]])
  assert batch["ranks"].dtype == np.int32
  assert stats == batching.TruncationStats(
      prompts=2, prompts_truncated=0, responses=5, responses_truncated=1)

  with pytest.raises(ValueError, match="max_k"):
    batching.comparison_batch(TOK, ["a"], [["a", "b", "c"]], [[0, 1, 2]],
                              3, 2, max_k=2)
  with pytest.raises(ValueError, match="permutation"):
    batching.comparison_batch(TOK, ["a"], [["a", "b"]], [[0, 0]], 3, 2, 2)


def test_scored_batch():
  batch, stats = batching.scored_batch(TOK, ["ab", "b"], ["c", ""], [0.5, -2],
                                       prompt_len=3, response_len=2)
  assert_array_equal(batch["tokens"], [[2, 10, 11, 12, 3], [0, 2, 11, 3, 0]])
  assert_array_equal(batch["mask"], [[1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
  assert_array_equal(batch["score"], [0.5, -2.0])
  assert batch["score"].dtype == np.float32
  assert stats.as_dict() == {"prompts": 2, "prompts_truncated": 0,
                             "responses": 2, "responses_truncated": 0,
                             "texts": 0, "texts_truncated": 0}


def test_stats_accumulate():
  total = batching.TruncationStats()
  for _ in range(2):
    _, stats = batching.prompt_batch(TOK, ["abcdef", "a"], prompt_len=3)
    total += stats
  assert total == batching.TruncationStats(prompts=4, prompts_truncated=2)


def test_column_lengths_must_match():
  with pytest.raises(ValueError, match="differ"):
    batching.sft_batch(TOK, ["a", "b"], ["c"], 2, 2)


def test_with_sentencepiece_tokenizer(tmp_path):
  tok = tokenizer_lib.train_tokenizer(
      ["Question: what is two plus two? Answer: four."] * 20 + ["问题：答案。"],
      str(tmp_path / "t.model"), vocab_size=300, hard_vocab_limit=False)
  batch, stats = batching.sft_batch(tok, ["Question: 问题?"],
                                    [" Answer: four."], prompt_len=32,
                                    response_len=32)
  row, loss = batch["tokens"][0], batch["loss_mask"][0]
  assert tok.decode(row[:32]) == "Question: 问题?"
  assert tok.decode(row[loss > 0]) == " Answer: four."
  assert row[loss > 0][-1] == tok.eos_id
  assert stats.responses_truncated == stats.prompts_truncated == 0
