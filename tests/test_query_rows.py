"""The trunk's ``queries``: computing only some rows in the last block gives those rows of the full pass.

Used by the reward model (last real token), the policy/value response window (PPO, KL, eval) and the
sampler's prefill (last prompt column); values and gradients must be those of the full pass.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.generate import SamplingConfig, make_sampler
from rlhf_jax.models import Decoder, DecoderConfig, ScalarModel, init_cache
from rlhf_jax.models.decoder import last_token_index

TOL = 2e-6


def tiny(flavour, **kw):
  base = dict(vocab_size=53, num_layers=3, d_model=32, num_heads=4, d_ff=64, max_len=32, flavour=flavour,
              num_kv_heads=2 if flavour == "llama" else 0)
  base.update(kw)
  return DecoderConfig(**base)


def batch():
  """Full, right-padded and left-padded rows."""
  tokens = jnp.asarray(np.random.default_rng(0).integers(4, 53, (3, 10)), jnp.int32)
  mask = jnp.asarray([[1] * 10, [1] * 6 + [0] * 4, [0, 0] + [1] * 8], jnp.int32)
  return tokens, mask


CASES = [("gpt2", {}), ("llama", {}), ("gpt2", {"scan_layers": True}), ("llama", {"scan_layers": True, "remat": True}),
         ("gpt2", {"remat": True})]


@pytest.mark.parametrize("flavour,kw", CASES)
def test_window_and_row_queries_equal_the_full_pass(flavour, kw):
  model = ScalarModel(tiny(flavour, **kw), 0.1, rngs=nnx.Rngs(0))
  tokens, mask = batch()
  full, _ = model.trunk(tokens, mask)
  window, _ = model.trunk(tokens, mask, queries=(4, 5))
  np.testing.assert_allclose(window, full[:, 4:9], atol=TOL)
  last = last_token_index(mask)
  rows, _ = model.trunk(tokens, mask, queries=last)
  np.testing.assert_allclose(rows[:, 0], full[jnp.arange(3), last], atol=TOL)


@pytest.mark.parametrize("flavour,kw", CASES)
def test_reward_and_its_gradient_equal_reading_the_full_pass(flavour, kw):
  graphdef, params = nnx.split(ScalarModel(tiny(flavour, **kw), 0.1, rngs=nnx.Rngs(1)))
  tokens, mask = batch()
  last = last_token_index(mask)

  def full(p):  # the reward as read before: every token's value, then the last real one
    values = nnx.merge(graphdef, p).values(tokens, mask)
    return (jnp.take_along_axis(values, last[:, None], axis=1)[:, 0] * jnp.arange(1.0, 4.0)).sum()

  def fast(p):
    return (nnx.merge(graphdef, p)(tokens, mask) * jnp.arange(1.0, 4.0)).sum()

  (v0, g0), (v1, g1) = jax.value_and_grad(full)(params), jax.value_and_grad(fast)(params)
  np.testing.assert_allclose(v1, v0, atol=TOL)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, atol=1e-5)


@pytest.mark.parametrize("flavour,kw", CASES)
def test_prefill_query_fills_the_same_cache(flavour, kw):
  model = Decoder(tiny(flavour, **kw), rngs=nnx.Rngs(2))
  tokens, mask = batch()
  mask = mask.at[1].set(1)  # prompts are left-padded: the last column is real
  cache = init_cache(model.cfg, 3, 14)
  full, full_cache = model.trunk(tokens, mask, cache)
  last, last_cache = model.trunk(tokens, mask, cache, queries=(9, 1))
  np.testing.assert_allclose(last[:, 0], full[:, -1], atol=TOL)
  for a, b in zip(jax.tree.leaves(full_cache), jax.tree.leaves(last_cache)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dropout_keeps_the_full_pass_randomness():
  model = ScalarModel(tiny("gpt2", dropout=0.3), 0.1, rngs=nnx.Rngs(3))
  tokens, mask = batch()
  key = jax.random.key(7)
  full, _ = model.trunk(tokens, mask, dropout_key=key)
  window, _ = model.trunk(tokens, mask, dropout_key=key, queries=(2, 6))
  np.testing.assert_array_equal(window, full[:, 2:8])


def test_sampler_is_unchanged_by_the_prefill_query():
  """Greedy tokens and log-probs equal those of the teacher-forced full pass."""
  model = Decoder(tiny("llama"), rngs=nnx.Rngs(4))
  graphdef, params = nnx.split(model)
  tokens, mask = batch()
  mask = mask.at[1].set(1)
  sample = make_sampler(graphdef, SamplingConfig(max_new_tokens=4, temperature=0.0, stop_at_eos=False))(
      params, tokens, mask, jax.random.key(0))
  seq = jnp.concatenate([tokens, sample.tokens], axis=1)
  logits, _ = model(seq, jnp.concatenate([mask, jnp.ones((3, 4), jnp.int32)], axis=1))
  lp = jax.nn.log_softmax(logits[:, 9:13], axis=-1)
  np.testing.assert_array_equal(sample.tokens, jnp.argmax(lp, axis=-1))
  np.testing.assert_allclose(sample.log_probs, jnp.take_along_axis(lp, sample.tokens[..., None], -1)[..., 0],
                             atol=1e-5)
