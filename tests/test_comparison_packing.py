"""Packed comparisons (the reward and DPO stages' ``pack_width``): the packer's layout, and that a packed batch
scores and trains the reward model, and gives DPO its log-ratios and step, as its unpacked rows did.

Each example is laid out as its prompt once, then its real responses; a response attends to its prompt and
itself only (``Trunk(branches=...)``) and continues the prompt's positions, so every reward, the ranking or
direct-score loss and its gradient must equal those of the unpacked batch up to float rounding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax import sharding, state as state_lib
from rlhf_jax.algorithms.reward import comparison_rewards, make_reward_step, packed_comparison_rewards
from rlhf_jax.data import bucketing, packing
from rlhf_jax.data.batching import comparison_batch, scored_batch
from rlhf_jax.models import ScalarModel
from test_packing import PAD, CharTokenizer, tiny

PROMPTS = ["ab", "a longer prompt", "x", "mid prompt", "q"]
RESPONSES = [["yes", "no", "maybe so"], ["r", "a much longer response"], ["one", "two", "three"],
             ["ok then", ""], ["no", "fine", "x", "yy"]]
RANKINGS = [[2, 0, 1], [1, 0], [0, 2, 1], [0, 1], [3, 1, 0, 2]]


def demo_comparisons():
  return comparison_batch(CharTokenizer(), PROMPTS, RESPONSES, RANKINGS, 16, 24, 4)[0]


def assert_same_per_example(got, plain, packed, batch, atol):
  """``got`` [R, E, K] of the packed layout equals ``plain`` [B, K] of the unpacked batch on every real
  response, each example found by its ranks (unique in ``demo_comparisons``)."""
  matched = 0
  for r, e in zip(*np.nonzero(packed["response_mask"].any(axis=-1))):
    i = next(i for i in range(len(plain)) if np.array_equal(packed["ranks"][r, e], batch["ranks"][i]))
    real = batch["response_mask"][i] == 1
    np.testing.assert_allclose(got[r, e][real], plain[i][real], atol=atol)
    matched += 1
  assert matched == len(plain)


def test_pack_comparisons_lays_out_each_prompt_once_then_its_real_responses():
  batch = demo_comparisons()
  packed = packing.pack_comparisons(batch, 64, PAD)
  rows, slots = packed["reads"].shape[:2]
  assert packed["tokens"].shape == (rows, 64) and packed["reads"].shape == (rows, slots, 4)
  assert rows < batch["tokens"].shape[0] * 4 and slots & (slots - 1) == 0
  # Every real token once: each prompt once, each real response once, no padding response.
  real = batch["mask"].astype(bool)
  prompt_tokens = real[:, 0, :16].sum()
  response_tokens = sum(real[i, j, 16:].sum() for i in range(5) for j in range(4) if batch["response_mask"][i, j])
  assert packed["mask"].sum() == prompt_tokens + response_tokens
  assert packed["response_mask"].sum() == batch["response_mask"].sum() == 14
  for r in range(rows):
    for e in range(slots):
      if not packed["response_mask"][r, e].any():
        continue
      seg = packed["segments"][r] == e + 1
      i = next(i for i in range(5) if sorted(packed["ranks"][r, e]) == sorted(batch["ranks"][i])
               and np.array_equal(packed["ranks"][r, e], batch["ranks"][i]))
      prompt = batch["tokens"][i, 0, :16][real[i, 0, :16]]
      in_prompt = seg & (packed["branches"][r] == 0)
      np.testing.assert_array_equal(packed["tokens"][r, in_prompt], prompt)
      np.testing.assert_array_equal(packed["positions"][r, in_prompt], np.arange(prompt.size))
      for j in range(4):
        branch = seg & (packed["branches"][r] == j + 1)
        if not batch["response_mask"][i, j]:
          assert not branch.any() and packed["response_mask"][r, e, j] == 0
          continue
        response = batch["tokens"][i, j, 16:][real[i, j, 16:]]
        np.testing.assert_array_equal(packed["tokens"][r, branch], response)
        np.testing.assert_array_equal(packed["positions"][r, branch], prompt.size + np.arange(response.size))
        cols = np.flatnonzero(branch)
        # The read is the response's last token; an empty response reads its prompt's last token.
        want = cols[-1] if cols.size else np.flatnonzero(in_prompt)[-1]
        assert packed["reads"][r, e, j] == want


def test_pack_comparisons_refuses_an_example_wider_than_the_row():
  batch = demo_comparisons()
  with pytest.raises(ValueError, match=r"comparison example 1 has 41 tokens .* pack_width=16"):
    packing.pack_comparisons(batch, 16, PAD)
  with pytest.raises(ValueError, match="response_mask"):
    packing.pack_comparisons({"tokens": batch["tokens"], "mask": batch["mask"]}, 64, PAD)


def test_packed_comparisons_keep_their_layout_when_trimmed_to_a_bucket():
  packed = packing.pack_comparisons(demo_comparisons(), 256, PAD)
  trimmed = bucketing.trim_texts(packed, 16)
  width = trimmed["tokens"].shape[1]
  assert width < 256 and packed["mask"][:, width:].sum() == 0
  for key in ("segments", "branches", "positions"):
    np.testing.assert_array_equal(trimmed[key], packed[key][:, :width])


def test_branches_need_segments():
  model = ScalarModel(tiny("gpt2"), 0.1, rngs=nnx.Rngs(0))
  tokens = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="with segments"):
    model.values(tokens, tokens, branches=tokens)


@pytest.mark.parametrize("flavour,kw", [("gpt2", {}), ("llama", {}), ("gpt2", {"scan_layers": True, "remat": True})])
def test_packed_rewards_equal_the_unpacked_rows(flavour, kw):
  graphdef, params = nnx.split(ScalarModel(tiny(flavour, **kw), 0.5, rngs=nnx.Rngs(1)))
  batch = demo_comparisons()
  packed = packing.pack_comparisons(batch, 64, PAD)
  plain = np.asarray(comparison_rewards(graphdef, params, {k: jnp.asarray(v) for k, v in batch.items()}))
  got = np.asarray(packed_comparison_rewards(graphdef, params, {k: jnp.asarray(v) for k, v in packed.items()}))
  assert_same_per_example(got, plain, packed, batch, atol=2e-5)


def _train_once(graphdef, params, batch, loss_kind):
  mesh = sharding.make_mesh({"data": 1})
  # Plain SGD: the ranking loss's head-bias gradient is 0 up to rounding, which Adam would blow up to a step.
  tx = optax.sgd(0.1)
  step = make_reward_step(graphdef, tx, loss_kind, 0.0, mesh=mesh)
  rep = jax.tree.map(lambda _: sharding.replicated(mesh), params)
  state, _ = state_lib.create_train_state({"reward": params}, {"reward": tx}, {"reward": rep}, mesh, seed=0)
  state, metrics = jax.jit(step)(state, {k: jnp.asarray(v) for k, v in batch.items()}, None)
  return state.params["reward"], metrics


def test_a_packed_ranking_step_matches_the_unpacked_step():
  graphdef, params = nnx.split(ScalarModel(tiny("gpt2"), 0.5, rngs=nnx.Rngs(2)))
  batch = demo_comparisons()
  plain = _train_once(graphdef, params, batch, "ranking")
  packed = _train_once(graphdef, params, packing.pack_comparisons(batch, 64, PAD), "ranking")
  for key in ("train/loss", "train/accuracy", "train/reward_gap", "train/grad_norm"):
    np.testing.assert_allclose(packed[1][key], plain[1][key], rtol=2e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), packed[0], plain[0])


def test_a_packed_direct_score_step_matches_the_unpacked_step():
  graphdef, params = nnx.split(ScalarModel(tiny("llama"), 0.5, rngs=nnx.Rngs(3)))
  batch = scored_batch(CharTokenizer(), PROMPTS, [r[0] for r in RESPONSES], [0.1, 0.9, 0.5, 0.3, 0.7], 16, 24)[0]
  as_comparisons = {"tokens": batch["tokens"][:, None], "mask": batch["mask"][:, None],
                    "response_mask": np.ones((5, 1), np.int32), "score": batch["score"]}
  packed_batch = packing.pack_comparisons(as_comparisons, 48, PAD)
  assert packed_batch["score"].shape == packed_batch["reads"].shape[:2]
  plain = _train_once(graphdef, params, batch, "direct_sigmoid")
  packed = _train_once(graphdef, params, packed_batch, "direct_sigmoid")
  np.testing.assert_allclose(packed[1]["train/loss"], plain[1]["train/loss"], rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), packed[0], plain[0])


# ----------------------------------------------------------------------------- DPO on packed comparisons

def test_comparison_targets_name_each_response_token_and_the_column_predicting_it():
  batch = demo_comparisons()
  packed = packing.pack_comparisons(batch, 64, PAD)
  targets = packing.comparison_targets(packed)
  n = targets["targets"].shape[1]
  assert n % 16 == 0 and targets["sources"].shape == targets["target_slots"].shape == (len(packed["tokens"]), n)
  real = batch["mask"].astype(bool)
  # Every real response token is a target once; a response's first token is predicted by its prompt's last.
  assert (targets["target_slots"] >= 0).sum() == sum(
      real[i, j, 16:].sum() for i in range(5) for j in range(4) if batch["response_mask"][i, j])
  for r in range(len(packed["tokens"])):
    for t, src, slot in zip(targets["targets"][r], targets["sources"][r], targets["target_slots"][r]):
      if slot < 0:
        continue
      e, j = divmod(int(slot), 4)
      assert packed["segments"][r, t] == packed["segments"][r, src] == e + 1 and packed["branches"][r, t] == j + 1
      assert packed["positions"][r, src] == packed["positions"][r, t] - 1
      assert packed["branches"][r, src] in (0, j + 1)


@pytest.mark.parametrize("average", [False, True])
def test_packed_dpo_log_ratios_equal_the_unpacked_rows(average):
  from rlhf_jax.algorithms import dpo
  from rlhf_jax.generate import SamplingConfig
  from rlhf_jax.models import Decoder
  graphdef, params = nnx.split(Decoder(tiny("gpt2"), rngs=nnx.Rngs(4)))
  reference = jax.tree.map(lambda x: x * 0.9, params)
  batch = demo_comparisons()
  packed = packing.pack_comparisons(batch, 64, PAD)
  packed.update(packing.comparison_targets(packed))
  sampling = SamplingConfig(max_new_tokens=24, temperature=0.7)
  plain = np.asarray(dpo.log_ratios(graphdef, params, reference, {k: jnp.asarray(v) for k, v in batch.items()}, 16,
                                    sampling, average))
  got = np.asarray(dpo.log_ratios(graphdef, params, reference, {k: jnp.asarray(v) for k, v in packed.items()}, 16,
                                  sampling, average)).reshape(packed["reads"].shape)
  # Each ratio is a difference of two sums of up to 23 token log-probs of ~-4: float32 rounding ~1e-5.
  assert_same_per_example(got, plain, packed, batch, atol=1e-4)
  assert np.abs(plain).max() > 0.05  # the two policies differ: the ratios are not all ~0


def test_a_packed_dpo_step_matches_the_unpacked_step():
  from rlhf_jax.algorithms import dpo
  from rlhf_jax.generate import SamplingConfig
  from rlhf_jax.models import Decoder
  graphdef, params = nnx.split(Decoder(tiny("llama"), rngs=nnx.Rngs(5)))
  reference = jax.tree.map(lambda x: x * 0.9, params)
  batch = demo_comparisons()
  packed = packing.pack_comparisons(batch, 64, PAD)
  packed.update(packing.comparison_targets(packed))
  mesh = sharding.make_mesh({"data": 1})
  tx = optax.sgd(0.1)
  settings, sampling = dpo.DPOSettings(beta=0.1), SamplingConfig(max_new_tokens=24, temperature=1.0)
  step = jax.jit(dpo.make_dpo_step(graphdef, tx, settings, 16, sampling, mesh))
  results = []
  for b in (batch, packed):
    rep = jax.tree.map(lambda _: sharding.replicated(mesh), params)
    state, _ = state_lib.create_train_state({"policy": params}, {"policy": tx}, {"policy": rep}, mesh, seed=0)
    state, metrics = step(state, {k: jnp.asarray(v) for k, v in b.items()}, {"reference": reference})
    results.append((state.params["policy"], metrics))
  for key in ("train/loss", "train/log_ratio", "train/grad_norm"):
    np.testing.assert_allclose(results[1][1][key], results[0][1][key], rtol=2e-5, atol=1e-7, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), results[1][0], results[0][0])


def test_a_direct_score_step_ignores_the_padding_rows_put_adds():
  """``ctx.put`` pads a batch's rows to fit the data axes with all-zero rows: they are no examples."""
  graphdef, params = nnx.split(ScalarModel(tiny("gpt2"), 0.5, rngs=nnx.Rngs(6)))
  batch = scored_batch(CharTokenizer(), PROMPTS, [r[0] for r in RESPONSES], [0.1, 0.9, 0.5, 0.3, 0.7], 16, 24)[0]
  padded = sharding.pad_batch(batch, 4)[0]
  assert len(padded["tokens"]) == 8
  plain = _train_once(graphdef, params, batch, "direct_mse")
  with_padding = _train_once(graphdef, params, padded, "direct_mse")
  np.testing.assert_allclose(with_padding[1]["train/loss"], plain[1]["train/loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), with_padding[0], plain[0])
