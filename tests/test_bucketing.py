"""Length bucketing: widths, which columns are cut, and that a model's outputs on real tokens do not change."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.data import bucketing
from rlhf_jax.generate import SamplingConfig, make_sampler
from rlhf_jax.models import Decoder, DecoderConfig


def test_bucket_width():
  assert [bucketing.bucket_width(n, 100, 16) for n in (1, 16, 17, 33, 64, 65, 100)] == [16, 16, 32, 64, 64, 100, 100]
  assert bucketing.bucket_width(5, 12, 16) == 12  # never wider than the full width
  assert bucketing.bucket_width(5, 100, 0) == 100  # off
  with pytest.raises(ValueError, match="do not fit"):
    bucketing.bucket_width(101, 100, 16)


def _pairs(prompt_lens, response_lens, p, r):
  """Rows of a left-padded prompt (ids 1..) and a right-padded response (ids 100..), as batching builds them."""
  tokens = np.zeros((len(prompt_lens), p + r), np.int32)
  mask = np.zeros_like(tokens)
  for i, (a, b) in enumerate(zip(prompt_lens, response_lens)):
    tokens[i, p - a:p] = np.arange(1, a + 1)
    tokens[i, p:p + b] = np.arange(100, 100 + b)
    mask[i, p - a:p + b] = 1
  loss_mask = mask.astype(np.float32)
  loss_mask[:, :p] = 0
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask, "ranks": np.arange(len(prompt_lens))}


def test_trim_pairs_cuts_both_sides_to_buckets_and_keeps_every_real_token():
  batch = _pairs([3, 5], [2, 6], p=40, r=50)
  out = bucketing.trim_pairs(batch, 40, 4)
  # prompt: 5 real columns -> bucket 8; response: 6 -> 8.
  assert out["tokens"].shape == (2, 16)
  np.testing.assert_array_equal(out["tokens"], batch["tokens"][:, 32:48])
  np.testing.assert_array_equal(out["loss_mask"], batch["loss_mask"][:, 32:48])
  assert out["mask"].sum() == batch["mask"].sum()
  assert out["ranks"] is batch["ranks"]  # not a column array: passed through
  # Responses only (a step that splits rows at the configured prompt length).
  right = bucketing.trim_pairs(batch, 40, 4, left=False)
  np.testing.assert_array_equal(right["tokens"], batch["tokens"][:, :48])
  # Off.
  assert bucketing.trim_pairs(batch, 40, 0)["tokens"].shape == (2, 90)


def test_trim_k_wise_rows_and_texts():
  batch = _pairs([3, 5, 2, 4], [2, 6, 1, 1], p=16, r=16)
  k_wise = {k: v.reshape(2, 2, -1) for k, v in batch.items() if k != "ranks"}
  k_wise["prompt_mask"] = k_wise["mask"][:, 0, :16]
  out, prompt_len = bucketing.trim(k_wise, ("tokens", "mask"), 16, 4)
  assert out["tokens"].shape == (2, 2, 16) and prompt_len == 8
  np.testing.assert_array_equal(out["prompt_mask"], out["mask"][:, 0, :8])  # cut with the prompt columns
  text = {"tokens": np.array([[1, 5, 6, 2, 0, 0, 0, 0, 0, 0]]), "mask": np.array([[1, 1, 1, 1] + [0] * 6])}
  text["loss_mask"] = text["mask"].astype(np.float32)
  out = bucketing.trim_texts(text, 4)
  assert out["tokens"].shape == (1, 4) and out["mask"].all()
  with pytest.raises(ValueError, match=r"batch\['loss_mask'\] has 3 columns"):
    bucketing.trim({**text, "loss_mask": np.ones((1, 3))}, ("tokens", "loss_mask"), 0, 4)


def test_trimmed_prompts_give_the_same_logits_and_samples():
  cfg = DecoderConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=2, d_ff=64, max_len=64)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  batch = _pairs([3, 7], [0, 0], p=32, r=0)
  prompts = {"tokens": batch["tokens"] % 60 + 4, "mask": batch["mask"]}
  trimmed = bucketing.trim_prompts(prompts, 8)
  assert trimmed["tokens"].shape == (2, 8)
  full_logits, _ = model(jnp.asarray(prompts["tokens"]), jnp.asarray(prompts["mask"]))
  cut_logits, _ = model(jnp.asarray(trimmed["tokens"]), jnp.asarray(trimmed["mask"]))
  real = trimmed["mask"].astype(bool)  # a padding query sees no key: its output is arbitrary
  np.testing.assert_allclose(np.asarray(cut_logits)[real], np.asarray(full_logits)[:, -8:][real], atol=1e-5)
  graphdef, params = nnx.split(model)
  sample = make_sampler(graphdef, SamplingConfig(max_new_tokens=6, stop_at_eos=False, method="gumbel"))
  a = sample(params, jnp.asarray(prompts["tokens"]), jnp.asarray(prompts["mask"]), jax.random.key(1))
  b = sample(params, jnp.asarray(trimmed["tokens"]), jnp.asarray(trimmed["mask"]), jax.random.key(1))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.log_probs, b.log_probs, atol=1e-5)
