"""RFT selection rules, best-of-n maths and compute accounting against hand-made numbers."""

import dataclasses

import numpy as np
import pytest
from ml_collections import ConfigDict

from rlhf_jax import compute
from rlhf_jax.algorithms import rft
from rlhf_jax.models import DecoderConfig
from rlhf_jax.models import decoder as decoder_lib
from rlhf_jax.rl import best_of_n as bon
from rlhf_jax.rl import selection

SCORES = np.array([0.1, 0.9, 0.5, -1.0, 2.0, 2.0, 0.3, 0.2])
GROUP = np.array([0, 0, 0, 1, 1, 1, 2, 2])


def test_best_of_n_takes_each_groups_best_first_on_ties():
  np.testing.assert_array_equal(selection.best_of_n(SCORES, GROUP), [1, 4, 6])


def test_threshold_and_rest_schedule():
  np.testing.assert_array_equal(selection.threshold(SCORES, 0.5), [1, 2, 4, 5])
  assert selection.rest_threshold(0, 0.0, 0.25) == 0.0 and selection.rest_threshold(3, 0.0, 0.25) == 0.75
  cfg = ConfigDict(dict(selection="threshold", improve_passes=2, threshold_start=0.0, threshold_step=0.5))
  # Round 1, pass 1 is the run's 4th pass: threshold 1.5.
  np.testing.assert_array_equal(rft.select(cfg, SCORES, GROUP, None, 1, 1), [4, 5])


def test_top_fraction_over_the_batch():
  np.testing.assert_array_equal(selection.top_fraction(SCORES, 0.25), [4, 5])
  np.testing.assert_array_equal(selection.top_fraction(SCORES, 0.3), [1, 4, 5])  # ceil(2.4) = 3
  with pytest.raises(ValueError, match="top fraction"):
    selection.top_fraction(SCORES, 0.0)


def test_kl_aware_selection_trades_score_against_log_ratio():
  log_ratio = np.array([0.0, 5.0, 0.0, 0.0, 0.0, 30.0, 0.0, 0.0])
  np.testing.assert_array_equal(selection.kl_aware(SCORES, log_ratio, GROUP, 0.0), [1, 4, 6])
  np.testing.assert_array_equal(selection.kl_aware(SCORES, log_ratio, GROUP, 0.1), [2, 4, 6])


def test_schedule_and_total_steps():
  cfg = ConfigDict(dict(rounds=3, improve_passes=2, improve_steps=5))
  assert rft.total_steps(cfg) == 30
  assert rft.schedule(cfg, 0) == (0, 0) and rft.schedule(cfg, 9) == (0, 1) and rft.schedule(cfg, 10) == (1, 0)
  with pytest.raises(ValueError, match="rft.selection"):
    rft.select(ConfigDict(dict(selection="best")), SCORES, GROUP, None, 0, 0)


def test_sft_rows_train_on_the_response_only():
  rows = rft.sft_rows(np.array([[0, 2, 7]]), np.array([[0, 1, 1]]), np.array([[5, 3, 0]]), np.array([[1, 1, 0]]))
  np.testing.assert_array_equal(rows["tokens"], [[0, 2, 7, 5, 3, 0]])
  np.testing.assert_array_equal(rows["mask"], [[0, 1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(rows["loss_mask"], [[0, 0, 0, 1, 1, 0]])


def test_kl_bon_formula_and_estimate():
  assert bon.kl_bon_formula(1) == 0.0
  assert bon.kl_bon_formula(4) == pytest.approx(np.log(4) - 0.75)
  scores = np.random.default_rng(0).normal(size=(20, 2048))
  for n in (1, 2, 8, 32):
    assert bon.kl_bon_estimate(scores, n) == pytest.approx(bon.kl_bon_formula(n), abs=1e-3)
  # A policy that repeats itself has less room to move: the estimate falls below the bound.
  tied = np.repeat(scores[:, :16], 128, axis=1)
  assert bon.kl_bon_estimate(tied, 32) < bon.kl_bon_formula(32) - 0.1
  # Hand case: two distinct outcomes of mass 1/2: best of 2 picks the better with 3/4.
  assert bon.kl_bon_estimate(np.array([[0.0, 1.0]]), 2) == pytest.approx(
      0.25 * np.log(0.5) + 0.75 * np.log(1.5))


def test_best_of_n_draws_use_disjoint_groups():
  scores = np.array([[1.0, 3.0, 2.0, 0.0]])
  values = np.array([[10.0, 30.0, 20.0, 0.0]])
  np.testing.assert_array_equal(bon.best_of_n_indices(scores, 2), [[1, 2]])
  assert bon.best_of_n_values(scores, values, 2)[0] == 25.0
  assert bon.best_of_n_values(scores, values, 4)[0] == 30.0
  with pytest.raises(ValueError, match="multiple of n"):
    bon.best_of_n_indices(scores, 3)


CFG = DecoderConfig(vocab_size=100, num_layers=2, d_model=8, num_heads=2, d_ff=32, max_len=64)


def test_flops_against_hand_counts():
  # Per layer: attention 4 * 8 * 8 = 256, MLP 2 * 8 * 32 = 512; two layers and an LM head of 8 * 100.
  assert compute.matmul_weights(CFG) == 2 * (256 + 512) + 800
  assert compute.matmul_weights(CFG, lm_head=False) == 2 * (256 + 512) + 8
  # 3 tokens attending to 5 positions: 2 * 3 * (2336 + 2 * 2 * 5 * 8).
  assert compute.forward_flops(CFG, 3, 5) == 2 * 3 * (2336 + 160)
  assert compute.sequence_flops(CFG, 2, 4, train=True) == 3 * compute.forward_flops(CFG, 8, 4)
  # Prefill 2 x 3 prompt tokens, then 2 one-token steps over a cache of 3 + 4 - 1 = 6.
  counts = compute.rollout_counts(CFG, 2, 3, [3, 1], max_new_tokens=4)
  assert counts.samples == 2 and counts.tokens_generated == 4 and counts.grad_steps == 0
  assert counts.flops == compute.forward_flops(CFG, 6, 6) + 2 * compute.forward_flops(CFG, 2, 6)
  total = counts + compute.Counts(grad_steps=1, flops=1.0)
  assert total.metrics() == {"compute/samples": 2.0, "compute/tokens_generated": 4.0, "compute/grad_steps": 1.0,
                             "compute/flops": counts.flops + 1.0}


def test_flops_count_the_keys_that_query_blocks_and_decode_phases_read():
  blocked = dataclasses.replace(CFG, attention_block=4)
  # 8 queries in blocks of 4 read 4 and 8 keys (mean 6); a tail at slots 4..11 reads 8 and 12 (mean 10).
  assert compute.causal_context(blocked, 8, 8) == 6 and compute.causal_context(blocked, 8, 12, 4) == 10
  assert compute.causal_context(CFG, 8, 8) == 8  # rows under two blocks of 128: every key
  assert compute.sequence_flops(blocked, 2, 8) == compute.forward_flops(CFG, 16, 6)
  assert compute.sequence_flops(blocked, 4, 12, shared_prefix=(4, 2)) == (
      compute.forward_flops(CFG, 2 * 4, 12) + compute.forward_flops(CFG, 4 * 8, 10))
  # 600 new tokens decode in 4 phases of caches 8 + 150, 8 + 300, 8 + 450, 8 + 599 slots; a run that stops
  # after 200 steps went through the first two.
  assert decoder_lib.decode_cache_lengths(8, 600) == [158, 308, 458, 607]
  prefill = compute.forward_flops(CFG, 2 * 8, 607)
  assert compute.generation_flops(CFG, 2, 8, 200, 607) == (
      prefill + 150 * compute.forward_flops(CFG, 2, 158) + 50 * compute.forward_flops(CFG, 2, 308))
