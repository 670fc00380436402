"""Trunk(shared_prefix=(P, k)): the prompt computed once per group of k rows gives the full pass's values
and gradients, and PPO's experience and update built that way match the per-row ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.models import DecoderConfig, ScalarModel, last_token_index

P, N, K, GROUPS = 6, 5, 3, 2


def _rows(seed=0):
  """GROUPS prompts (left-padded, different lengths), each repeated K times, then K different responses
  (right-padded; one row's response is empty)."""
  rng = np.random.default_rng(seed)
  prompt = np.zeros((GROUPS, P), np.int32)
  prompt_mask = np.zeros((GROUPS, P), np.int32)
  for g, length in enumerate((4, 6)):
    prompt[g, P - length:] = rng.integers(4, 40, length)
    prompt_mask[g, P - length:] = 1
  prompt, prompt_mask = np.repeat(prompt, K, 0), np.repeat(prompt_mask, K, 0)
  lengths = rng.integers(1, N + 1, GROUPS * K)
  lengths[1] = 0
  response_mask = (np.arange(N)[None] < lengths[:, None]).astype(np.int32)
  response = rng.integers(4, 40, (GROUPS * K, N)) * response_mask
  return jnp.asarray(np.concatenate([prompt, response], 1)), jnp.asarray(np.concatenate([prompt_mask, response_mask], 1))


CONFIGS = {
    "gpt2": dict(flavour="gpt2"),
    "llama_gqa": dict(flavour="llama", num_kv_heads=1),
    "gpt2_scan_remat": dict(flavour="gpt2", scan_layers=True, remat=True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shared_prefix_values_and_gradients_match_the_full_pass(name):
  cfg = DecoderConfig(vocab_size=40, num_layers=2, d_model=16, num_heads=2, d_ff=32, max_len=32, **CONFIGS[name])
  graphdef, params = nnx.split(ScalarModel(cfg, 0.3, rngs=nnx.Rngs(0)))
  tokens, mask = _rows()
  queries = (None, (P - 1, N), (P + 1, N - 1), last_token_index(mask))

  def loss(params, shared_prefix):
    values = nnx.merge(graphdef, params).values(tokens, mask, queries=(P - 1, N), shared_prefix=shared_prefix)
    return jnp.sum(jnp.sin(values) * mask[:, P:])

  @jax.jit  # one compiled program per config: op-by-op, these passes and gradients take minutes
  def both(params):
    def run(shared_prefix):
      model = nnx.merge(graphdef, params)
      outs = [model.values(tokens, mask, queries=q, shared_prefix=shared_prefix) for q in queries]
      return outs, model(tokens, mask, shared_prefix=shared_prefix), jax.grad(loss)(params, shared_prefix)
    return run(None), run((P, K))

  (full, full_reward, g_full), (got, got_reward, g_shared) = both(params)
  for q, a, b in zip(queries, got, full):
    if q is None:  # padding queries see no key: their output is arbitrary
      a, b = a * mask, b * mask
    np.testing.assert_allclose(a, b, atol=2e-5, err_msg=str(q))
  np.testing.assert_allclose(got_reward, full_reward, atol=2e-5)
  for a, b in zip(jax.tree.leaves(g_shared), jax.tree.leaves(g_full)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_shared_prefix_rejects_shapes_that_do_not_group():
  cfg = DecoderConfig(vocab_size=40, num_layers=1, d_model=16, num_heads=2, d_ff=32, max_len=32)
  model = ScalarModel(cfg, 0.3, rngs=nnx.Rngs(0))
  tokens, mask = _rows()
  with pytest.raises(ValueError, match=r"shared_prefix=\(6, 4\) does not fit"):
    model.values(tokens, mask, shared_prefix=(P, 4))


def test_k_wise_reward_scores_and_dpo_log_ratios_compute_the_prompt_once():
  """A comparison batch [B, K, T] whose K rows share the prompt: RM scores with ``prompt_mask`` (shared)
  equal the per-row scores, and DPO's log-ratios (``comparison_rollout``, shared) the per-row ones."""
  from rlhf_jax.algorithms import dpo, reward
  from rlhf_jax.generate import SamplingConfig
  from rlhf_jax.models import Decoder
  from rlhf_jax.rollout import response_log_probs

  cfg = DecoderConfig(vocab_size=40, num_layers=2, d_model=16, num_heads=2, d_ff=32, max_len=32)
  tokens, mask = _rows(1)
  batch = {"tokens": tokens.reshape(GROUPS, K, -1), "mask": mask.reshape(GROUPS, K, -1)}
  rm_graphdef, rm_params = nnx.split(ScalarModel(cfg, 0.3, rngs=nnx.Rngs(0)))
  per_row = reward.comparison_rewards(rm_graphdef, rm_params, batch)
  shared = reward.comparison_rewards(rm_graphdef, rm_params, {**batch, "prompt_mask": mask[::K, :P]})
  np.testing.assert_allclose(shared, per_row, atol=2e-5)

  lm_graphdef, policy = nnx.split(Decoder(cfg, rngs=nnx.Rngs(1)))
  ref = nnx.split(Decoder(cfg, rngs=nnx.Rngs(2)))[1]
  sampling = SamplingConfig(max_new_tokens=N)
  rollout = dpo.comparison_rollout(batch["tokens"], batch["mask"], P)
  assert rollout.prompt_group == K
  got = dpo.log_ratios(lm_graphdef, policy, ref, batch, P, sampling, average=False)
  unshared = rollout.replace(prompt_group=1)
  want = (response_log_probs(lm_graphdef, policy, unshared, sampling)[0]
          - response_log_probs(lm_graphdef, ref, unshared, sampling)[0]).sum(-1).reshape(GROUPS, K)
  np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2_scan_remat"])
def test_sampler_prefills_each_prompt_once_for_its_samples(name):
  """``generate(prompt_group=k)`` (one prefill per prompt, its cache repeated) draws what the per-row prefill
  draws: the same greedy and Gumbel tokens from the same key, log-probs equal up to rounding."""
  from rlhf_jax.generate import SamplingConfig, generate
  from rlhf_jax.models import Decoder

  cfg = DecoderConfig(vocab_size=40, num_layers=2, d_model=16, num_heads=2, d_ff=32, max_len=32, **CONFIGS[name])
  graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(3)))
  tokens, mask = _rows(2)
  prompt, prompt_mask = tokens[:, :P], mask[:, :P]
  for sampling in (SamplingConfig(max_new_tokens=N, greedy=True, stop_at_eos=False),
                   SamplingConfig(max_new_tokens=N, temperature=1.5, method="gumbel", eos_id=5)):
    run = jax.jit(lambda p, g: generate(nnx.merge(graphdef, p), prompt, prompt_mask, jax.random.key(4), sampling, g),
                  static_argnums=1)
    per_row, shared = run(params, 1), run(params, K)
    np.testing.assert_array_equal(shared.tokens, per_row.tokens)
    np.testing.assert_array_equal(shared.mask, per_row.mask)
    np.testing.assert_allclose(shared.log_probs, per_row.log_probs, atol=2e-5)
  with pytest.raises(ValueError, match="prompt_group=4 does not divide the 6 prompt rows"):
    generate(nnx.merge(graphdef, params), prompt, prompt_mask, jax.random.key(0), sampling, 4)


def test_rollout_fn_marks_the_groups_it_shared_and_falls_back_per_row():
  """``make_rollout_fn(prompt_group=k)`` marks its rollout ``prompt_group`` k (later passes share the prompt);
  a batch that k does not divide (rows padded to fit a mesh) is sampled per row and left unmarked. The
  FLOP count of a shared prefill is the per-row one less (1 - 1/k) of the prompt's pass."""
  from rlhf_jax import compute
  from rlhf_jax.generate import SamplingConfig
  from rlhf_jax.models import Decoder
  from rlhf_jax.rollout import make_rollout_fn, shared_run

  cfg = DecoderConfig(vocab_size=40, num_layers=2, d_model=16, num_heads=2, d_ff=32, max_len=32)
  graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(3)))
  tokens, mask = _rows(3)
  prompt, prompt_mask = tokens[:, :P], mask[:, :P]
  group = jnp.repeat(jnp.arange(GROUPS, dtype=jnp.int32), K)
  rollout_fn = make_rollout_fn(graphdef, SamplingConfig(max_new_tokens=N, greedy=True), K)
  shared = rollout_fn(params, prompt, prompt_mask, group, jax.random.key(0))
  assert shared.prompt_group == K and shared.shared_prefix == (P, K)
  padded = rollout_fn(params, jnp.pad(prompt, ((0, 1), (0, 0))), jnp.pad(prompt_mask, ((0, 1), (0, 0))),
                      jnp.pad(group, (0, 1)), jax.random.key(0))
  assert padded.prompt_group == 1
  np.testing.assert_array_equal(padded.response[:-1], shared.response)

  assert shared_run(8, 64) == 8 and shared_run(64, 256) == 64 and shared_run(512, 256) == 256
  assert shared_run(6, 64) == 2
  per_row = compute.generation_flops(cfg, 6, P, 4, P + N - 1)
  grouped = compute.generation_flops(cfg, 6, P, 4, P + N - 1, prompt_group=3)
  prefill = compute.forward_flops(cfg, 6 * P, P + N - 1)
  assert grouped == pytest.approx(per_row - prefill * (1 - 1 / 3))
