"""Sampler: returned log-probs equal teacher-forced ones; EOS stopping; greedy and top-k/top-p behaviour."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.models import decoder as decoder_lib
from rlhf_jax.generate import SamplingConfig, inverse_cdf_sample, make_sampler, sampling_log_probs, sampling_logits
from rlhf_jax.models import Decoder, DecoderConfig

EOS = 3


@pytest.fixture(scope="module")
def model():
  cfg = DecoderConfig(vocab_size=40, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_len=64,
                      flavour="llama", num_kv_heads=2)
  return Decoder(cfg, rngs=nnx.Rngs(0))


PROMPT = jnp.array([[0, 0, 0, 2, 9, 10], [2, 11, 12, 13, 14, 15], [0, 0, 0, 0, 2, 16]], jnp.int32)
PROMPT_MASK = (PROMPT > 0).astype(jnp.int32)


@pytest.mark.parametrize("sampling", [
    SamplingConfig(max_new_tokens=10, temperature=0.8, top_k=12, top_p=0.9, eos_id=EOS),
    SamplingConfig(max_new_tokens=10, temperature=1.0, eos_id=EOS, stop_at_eos=False),
])
def test_log_probs_equal_teacher_forcing(model, sampling):
  graphdef, params = nnx.split(model)
  sample = make_sampler(graphdef, sampling)(params, PROMPT, PROMPT_MASK, jax.random.key(0))
  tokens = jnp.concatenate([PROMPT, sample.tokens], axis=1)
  mask = jnp.concatenate([PROMPT_MASK, sample.mask], axis=1)
  logits, _ = model(tokens, mask)
  p = PROMPT.shape[1]
  log_probs = sampling_log_probs(logits[:, p - 1:-1], sampling)
  forced = jnp.take_along_axis(log_probs, sample.tokens[..., None], axis=-1)[..., 0]
  real = np.asarray(sample.mask, bool)
  assert real.sum() > 0
  np.testing.assert_allclose(np.asarray(sample.log_probs)[real], np.asarray(forced)[real], atol=2e-5)
  assert np.all(np.asarray(sample.log_probs)[~real] == 0)


def test_eos_stops_row_and_masks_are_prefixes(model):
  graphdef, params = nnx.split(model)
  # Make EOS likely so rows stop at different times.
  params = jax.tree.map(lambda x: x, params)
  sampling = SamplingConfig(max_new_tokens=12, temperature=3.0, eos_id=EOS)
  sample = make_sampler(graphdef, sampling)(params, PROMPT, PROMPT_MASK, jax.random.key(5))
  tokens, mask = np.asarray(sample.tokens), np.asarray(sample.mask)
  for row_tokens, row_mask in zip(tokens, mask):
    n = row_mask.sum()
    assert np.all(row_mask[:n] == 1) and np.all(row_mask[n:] == 0)
    assert np.all(row_tokens[n:] == 0)
    assert EOS not in row_tokens[:max(n - 1, 0)]
    if n < len(row_mask):
      assert row_tokens[n - 1] == EOS


def test_greedy_is_deterministic_and_argmax(model):
  graphdef, params = nnx.split(model)
  sampling = SamplingConfig(max_new_tokens=6, greedy=True, stop_at_eos=False, eos_id=EOS)
  sampler = make_sampler(graphdef, sampling)
  a = sampler(params, PROMPT, PROMPT_MASK, jax.random.key(0))
  b = sampler(params, PROMPT, PROMPT_MASK, jax.random.key(1))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  logits, _ = model(PROMPT, PROMPT_MASK)
  np.testing.assert_array_equal(a.tokens[:, 0], jnp.argmax(logits[:, -1], -1))


def test_top_k_and_top_p_restrict_support():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  top2 = jnp.exp(sampling_log_probs(logits, SamplingConfig(1, top_k=2)))
  np.testing.assert_allclose(top2, [[0.625, 0.375, 0, 0]], atol=1e-6)
  nucleus = jnp.exp(sampling_log_probs(logits, SamplingConfig(1, top_p=0.7)))
  np.testing.assert_allclose(nucleus, [[0.625, 0.375, 0, 0]], atol=1e-6)
  hot = jnp.exp(sampling_log_probs(logits, SamplingConfig(1, temperature=2.0)))
  ref = np.sqrt([0.5, 0.3, 0.15, 0.05])
  np.testing.assert_allclose(hot[0], ref / ref.sum(), atol=1e-6)
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(1, top_p=0.0)


def _numpy_cut(logits, top_k, top_p):
  """The sort-based definition, row by row in float64: top-k keeps logits >= the k-th largest; top-p then keeps
  the tokens (in descending order, ties in any order) whose predecessors hold less than p of the mass, and
  every token tied with the smallest kept one."""
  out = logits.astype(np.float64).copy()
  for row in out:
    if top_k and top_k < len(row):
      row[row < np.sort(row)[::-1][top_k - 1]] = -np.inf
    if top_p < 1:
      order = np.sort(row)[::-1]
      probs = np.exp(order - order[0])
      probs /= probs.sum()
      before = np.cumsum(probs) - probs
      row[row < order[before < top_p].min()] = -np.inf
  return out


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (1, 1.0), (0, 0.9), (0, 0.3), (20, 0.8), (500, 0.95)])
def test_top_k_and_top_p_cuts_match_the_sort_definition(top_k, top_p):
  """Bisection cuts against sorting each row: random rows (V 257), rows with ties at the cut (repeated
  values), rows that already hold -inf, a [2, 3, V] batch, and a top-k above V (no cut)."""
  rng = np.random.default_rng(top_k * 100 + int(top_p * 10))
  logits = rng.normal(size=(12, 257)).astype(np.float32) * 3
  logits[3] = np.round(logits[3])  # many exact ties, also at the cut
  logits[4, ::2] = -np.inf
  logits[5] = 1.5  # all tied: everything stays
  cfg = SamplingConfig(1, top_k=top_k, top_p=top_p)
  got = np.asarray(sampling_logits(jnp.asarray(logits), cfg))
  want = _numpy_cut(logits, top_k, top_p)
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6)
  assert np.all(np.isfinite(got).sum(-1) >= 1)
  batched = np.asarray(sampling_logits(jnp.asarray(logits.reshape(2, 6, 257)), cfg))
  np.testing.assert_array_equal(batched.reshape(12, 257), got)
  if top_p == 1:  # a row without ties keeps exactly k
    assert np.isfinite(got[0]).sum() == min(top_k, 257)


def test_inverse_cdf_sample_frequencies_and_support():
  probs = np.array([0.5, 0.3, 0.15, 0.05, 0.0])
  logits = jnp.log(jnp.broadcast_to(jnp.asarray(probs, jnp.float32), (40000, 5))) + 3.0  # unnormalised
  tokens, log_probs = inverse_cdf_sample(jax.random.key(3), logits)
  tokens = np.asarray(tokens)
  freq = np.bincount(tokens, minlength=5) / len(tokens)
  np.testing.assert_allclose(freq, probs, atol=0.01)
  assert freq[4] == 0 and tokens.dtype == np.int32
  np.testing.assert_allclose(log_probs, np.log(probs[tokens]), atol=1e-6)


def test_inverse_cdf_sample_two_levels_match_a_flat_cdf():
  """V = 70 (blocks of 8, the last one short): mass spread over blocks, whole blocks of zero probability
  (between and after the live ones) and zeros inside a block; frequencies and log-probs against numpy."""
  rng = np.random.default_rng(0)
  probs = rng.random(70) * (rng.random(70) < 0.6)
  probs[16:32] = 0.0
  probs[60:] = 0.0
  probs /= probs.sum()
  logits = np.where(probs > 0, np.log(np.maximum(probs, 1e-30)), -np.inf).astype(np.float32)
  tokens, log_probs = inverse_cdf_sample(jax.random.key(5), jnp.broadcast_to(jnp.asarray(logits), (60000, 70)))
  tokens = np.asarray(tokens)
  assert probs[tokens].min() > 0
  np.testing.assert_allclose(np.bincount(tokens, minlength=70) / len(tokens), probs, atol=0.006)
  np.testing.assert_allclose(log_probs, np.log(probs[tokens]), atol=1e-5)
  # Each row's token is where a flat inverse CDF puts that row's uniform.
  keys = jax.random.split(jax.random.key(7), 200)
  rows = jnp.asarray(rng.normal(size=(200, 70)) * 3, jnp.float32)
  got = np.asarray(jax.vmap(lambda k, r: inverse_cdf_sample(k, r[None])[0][0])(keys, rows))
  p = np.exp(np.asarray(rows, np.float64) - np.asarray(rows).max(-1, keepdims=True))
  u = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, (1,), jnp.float32)[0])(keys), np.float64)
  want = (np.cumsum(p, -1) <= (u * p.sum(-1))[:, None]).sum(-1)
  assert (got == want).mean() >= 0.99


def test_bfloat16_sampler_log_probs_match_teacher_forcing():
  cfg = DecoderConfig(vocab_size=40, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_len=64, dtype="bfloat16")
  model = Decoder(cfg, rngs=nnx.Rngs(1))
  graphdef, params = nnx.split(model)
  sampling = SamplingConfig(max_new_tokens=8, eos_id=EOS, stop_at_eos=False)
  sample = make_sampler(graphdef, sampling)(params, PROMPT, PROMPT_MASK, jax.random.key(2))
  assert sample.log_probs.dtype == jnp.float32
  logits, _ = model(jnp.concatenate([PROMPT, sample.tokens], 1), jnp.concatenate([PROMPT_MASK, sample.mask], 1))
  p = PROMPT.shape[1]
  forced = jnp.take_along_axis(sampling_log_probs(logits[:, p - 1:-1], sampling), sample.tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(sample.log_probs, forced, atol=2e-2)


def test_decode_cache_lengths_split_the_steps_into_phases():
  assert decoder_lib.decode_cache_lengths(64, 64) == [127]  # fewer than two phases' worth: one loop
  assert decoder_lib.decode_cache_lengths(64, 256) == [64 + 128, 64 + 255]
  assert decoder_lib.decode_cache_lengths(64, 448) == [64 + 149, 64 + 298, 64 + 447]
  assert decoder_lib.decode_cache_lengths(8, 4096) == [8 + 1024, 8 + 2048, 8 + 3072, 8 + 4095]
  assert decoder_lib.decode_cache_lengths(8, 1) == [8]


@pytest.mark.parametrize("sampling", [
    SamplingConfig(max_new_tokens=16, temperature=1.0, eos_id=EOS, stop_at_eos=False),
    SamplingConfig(max_new_tokens=16, temperature=3.0, eos_id=EOS),  # rows stop early, some in the first phase
])
@pytest.mark.parametrize("scan", [False, True])
def test_decoding_in_phases_samples_what_one_loop_samples(model, sampling, scan, monkeypatch):
  """Phases grow the cache between loops (``grow_cache``); the tokens, log-probs and masks are those of one
  loop over the whole cache, for a layer loop's per-layer caches and a layer scan's stacked one."""
  if scan:
    model = Decoder(dataclasses.replace(model.cfg, scan_layers=True), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  samples = []
  for tokens_per_phase in (1000, 4):  # one loop; four phases of 15 steps / 4 (cache 10, 14, 18, 21)
    monkeypatch.setattr(decoder_lib, "DECODE_PHASE_TOKENS", tokens_per_phase)
    assert len(decoder_lib.decode_cache_lengths(PROMPT.shape[1], 16)) == (1 if tokens_per_phase == 1000 else 4)
    samples.append(make_sampler(graphdef, sampling)(params, PROMPT, PROMPT_MASK, jax.random.key(7)))
  one, phased = samples
  np.testing.assert_array_equal(phased.tokens, one.tokens)
  np.testing.assert_array_equal(phased.mask, one.mask)
  np.testing.assert_allclose(phased.log_probs, one.log_probs, atol=1e-6)
  assert 0 < int(one.mask.sum()) and (sampling.stop_at_eos or int(one.mask.sum()) == one.mask.size)
