"""PPO: experience matches the sampler and the reward definitions; the update moves only what it should;
PPO learns."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax import compute, sharding, state as state_lib
from rlhf_jax.algorithms import ppo as ppo_lib
from rlhf_jax.algorithms.ppo import (PPOConfig, make_experience, make_experience_fn, make_ppo_step,
                                     make_ppo_update, truncate_after_stop, truncate_rollout, value_head_params)
from rlhf_jax.generate import SamplingConfig
from rlhf_jax.models import Decoder, DecoderConfig, ScalarModel
from rlhf_jax.rl.kl import update_kl_coef
from rlhf_jax.rollout import Rollout, make_rollout_fn, policy_log_probs
from rlhf_jax.scoring import RewardModelScorer
from rlhf_jax.state import TrainState, seed_key_data

EOS, PAD = 3, 0
MODEL = DecoderConfig(vocab_size=16, num_layers=1, d_model=32, num_heads=4, d_ff=64, max_len=32)
PROMPT = jnp.array([[0, 0, 2, 9], [2, 11, 12, 13], [0, 0, 0, 2], [0, 2, 5, 6]], jnp.int32)
PROMPT_MASK = (PROMPT > 0).astype(jnp.int32)
SAMPLING = SamplingConfig(max_new_tokens=6, temperature=1.3, eos_id=EOS)


def pure_split(module):
  graphdef, params = nnx.split(module)
  return graphdef, nnx.to_pure_dict(params)


@pytest.fixture(scope="module")
def models():
  policy_g, policy = pure_split(Decoder(MODEL, rngs=nnx.Rngs(0)))
  _, ref = pure_split(Decoder(MODEL, rngs=nnx.Rngs(1)))
  value_g, value = pure_split(ScalarModel(MODEL, 0.1, rngs=nnx.Rngs(2)))
  reward_g, reward = pure_split(ScalarModel(MODEL, 0.5, rngs=nnx.Rngs(3)))
  return dict(policy_g=policy_g, policy=policy, ref=ref, value_g=value_g, value=value, reward_g=reward_g,
              reward=reward)


# Jitted functions are cached per config so that tests sharing a config compile once.
rollout_fn = functools.cache(make_rollout_fn)
experience_fn = functools.cache(make_experience_fn)
GROUP = jnp.arange(PROMPT.shape[0], dtype=jnp.int32)


def rollout(models, sampling, key=0) -> Rollout:
  return rollout_fn(models["policy_g"], sampling)(models["policy"], PROMPT, PROMPT_MASK, GROUP, jax.random.key(key))


def rm_score(models, r):
  return RewardModelScorer(models["reward_g"], models["reward"])(r)


def experience(models, cfg, r, beta=0.1, ref=None, score=None):
  r = truncate_rollout(r, cfg)
  score = rm_score(models, r) if score is None else score
  fn = experience_fn(models["policy_g"], models["value_g"], cfg)
  return fn(models["policy"], models["ref"] if ref is None else ref, models["value"], r, score, beta)


TRUNCATED_SAMPLING = SamplingConfig(6, temperature=0.7, top_k=5, top_p=0.9, eos_id=EOS)


@pytest.mark.parametrize("sampling", [SAMPLING, TRUNCATED_SAMPLING])
def test_teacher_forced_log_probs_match_sampler(models, sampling):
  r = rollout(models, sampling)
  exp, metrics = experience(models, PPOConfig(sampling=sampling), r)
  real = np.asarray(r.response_mask, bool)
  if sampling is SAMPLING:  # no truncation: the policy distribution is the sampling distribution
    np.testing.assert_allclose(np.asarray(exp.log_probs)[real], np.asarray(r.log_probs)[real], atol=2e-5)
  # Under top-k/top-p the sampler's truncated log-probs are compared with the truncated teacher-forced ones.
  assert float(metrics["rollout/logprob_diff"]) < 1e-5
  assert np.all(np.asarray(exp.log_probs)[~real] == 0)
  assert all(np.isfinite(float(v)) for v in metrics.values())


KL_SAMPLINGS = [SAMPLING, TRUNCATED_SAMPLING, SamplingConfig(6, temperature=1.0, top_k=8, eos_id=EOS),
                SamplingConfig(6, temperature=0.5, top_p=0.5, eos_id=EOS)]


@pytest.mark.parametrize("sampling, estimator", [(s, "k1") for s in KL_SAMPLINGS] + [(TRUNCATED_SAMPLING, "k3")])
def test_kl_against_itself_is_zero_for_every_sampling_setting(models, sampling, estimator):
  r = rollout(models, sampling)
  cfg = PPOConfig(sampling=sampling, kl_estimator=estimator)
  exp, metrics = experience(models, cfg, r, beta=0.5, ref=models["policy"])
  np.testing.assert_allclose(exp.kl, 0.0, atol=1e-6)
  assert abs(float(metrics["rollout/kl"])) < 1e-5 and abs(float(metrics["rollout/kl_penalty"])) < 1e-5
  # Against a different reference the penalty is not zero.
  _, other = experience(models, cfg, r, beta=0.5)
  assert abs(float(other["rollout/kl"])) > 1e-3


def test_tokens_outside_the_top_k_support_keep_their_true_log_probs(models):
  """Old log-probs are the policy distribution's (no -30 floor), so KL rewards and ratios stay exact."""
  sampling = SamplingConfig(6, temperature=0.7, top_k=2, eos_id=EOS)
  r = hand_rollout()  # tokens chosen by hand: most lie outside any row's top-2
  exp, metrics = experience(models, PPOConfig(sampling=sampling), r, beta=0.1)
  full_logits, _ = nnx.merge(models["policy_g"], models["policy"])(r.tokens, r.mask)
  p, n = r.prompt_len, r.response_len
  lp = policy_log_probs(full_logits[:, p - 1:p + n - 1], sampling)
  expected = np.take_along_axis(np.asarray(lp), np.asarray(r.response)[..., None], -1)[..., 0]
  real = np.asarray(r.response_mask, bool)
  np.testing.assert_allclose(np.asarray(exp.log_probs)[real], expected[real], atol=1e-5)
  assert np.all(np.isfinite(np.asarray(exp.log_probs))) and np.all(np.asarray(exp.log_probs)[real] > -25)
  # The same params give ratio 1 everywhere: nothing clipped, KL(old || new) 0.
  tx = optax.sgd(0.0)
  state = make_state({"policy": models["policy"], "value": models["value"]}, {"policy": tx, "value": tx})
  cfg = PPOConfig(sampling=sampling, epochs=1, minibatches=1)
  _, m = jax.jit(make_ppo_update(models["policy_g"], models["value_g"], tx, tx, cfg))(
      state, {"experience": exp, "ptx": None})
  assert float(m["train/clip_frac"]) == 0.0 and abs(float(m["train/approx_kl"])) < 1e-6


def test_adaptive_kl_coefficient_never_goes_negative():
  beta = update_kl_coef(0.1, 0.0, 10_000, kind="adaptive", target=6.0, horizon=100)
  assert float(beta) == 0.0
  assert float(update_kl_coef(0.1, 12.0, 10, kind="adaptive", target=6.0, horizon=100)) == pytest.approx(0.102)


def test_returns_are_score_to_go_without_discount_or_kl(models):
  r = rollout(models, SAMPLING, key=3)
  cfg = PPOConfig(sampling=SAMPLING, gamma=1.0, lam=1.0, whiten_rewards=False, whiten_advantages=False)
  exp, metrics = experience(models, cfg, r, beta=0.0)
  full = jnp.concatenate([PROMPT, r.response], 1)
  full_mask = jnp.concatenate([PROMPT_MASK, r.response_mask], 1)
  rm = nnx.merge(models["reward_g"], models["reward"])(full, full_mask)
  np.testing.assert_allclose(exp.score, rm, atol=1e-5)
  real = np.asarray(r.response_mask, bool)
  expected = np.broadcast_to(np.asarray(rm)[:, None], real.shape)
  np.testing.assert_allclose(np.asarray(exp.returns)[real], expected[real], atol=1e-5)
  np.testing.assert_allclose(np.asarray(exp.advantages + exp.values)[real], expected[real], atol=1e-5)
  # Values are read before each response token: the first one at the last prompt column.
  v_all = nnx.merge(models["value_g"], models["value"]).values(full, full_mask)
  np.testing.assert_allclose(exp.values[:, 0], v_all[:, PROMPT.shape[1] - 1], atol=1e-5)
  assert abs(float(metrics["rollout/rm_score"]) - float(rm.mean())) < 1e-5


def hand_rollout() -> Rollout:
  tokens = jnp.array([[5, 7, 3, 0, 0, 0], [5, 6, 5, 6, 5, 6], [7, 7, 8, 9, 10, 11], [4, 4, 4, 4, 3, 0]], jnp.int32)
  mask = jnp.array([[1, 1, 1, 0, 0, 0], [1] * 6, [1] * 6, [1, 1, 1, 1, 1, 0]], jnp.int32)
  return Rollout(prompt=PROMPT, prompt_mask=PROMPT_MASK, response=tokens, response_mask=mask,
                 log_probs=jnp.zeros(tokens.shape), group=GROUP)


def test_no_eos_penalty_and_truncation_change_the_score(models):
  sample = hand_rollout()
  base = PPOConfig(sampling=SAMPLING)
  gold = jnp.array([1.0, 2.0, 3.0, 4.0])
  exp, metrics = experience(models, dataclasses.replace(base, no_eos_penalty=-10.0), sample, score=gold)
  np.testing.assert_allclose(exp.score, [1.0, -8.0, -7.0, 4.0])
  assert float(metrics["rollout/no_eos_fraction"]) == 0.5
  np.testing.assert_allclose(metrics["rollout/rm_score"], 2.5)

  truncating = dataclasses.replace(base, truncate_at_stop=True, stop_token=7, no_eos_penalty=-10.0)
  exp_t, metrics_t = experience(models, truncating, sample)
  tokens, mask = truncate_after_stop(sample.response, sample.response_mask, 7, PAD)
  np.testing.assert_array_equal(mask, [[1, 1, 0, 0, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(exp_t.mask, mask)
  np.testing.assert_array_equal(exp_t.rollout.response[2], [7, 0, 0, 0, 0, 0])
  rm = nnx.merge(models["reward_g"], models["reward"])
  truncated = rm(jnp.concatenate([PROMPT, tokens], 1), jnp.concatenate([PROMPT_MASK, mask], 1))
  untruncated = rm(sample.tokens, sample.mask)
  # Row 1 never stops: penalised; rows 0 and 2 stop at the stop token, row 3 at EOS.
  np.testing.assert_allclose(exp_t.score, truncated + jnp.array([0.0, -10.0, 0.0, 0.0]), atol=1e-5)
  assert abs(float(exp_t.score[2] - untruncated[2])) > 1e-4
  assert float(metrics_t["rollout/response_length"]) == mask.sum() / 4
  # Trained tokens stop at the truncation too.
  assert np.all(np.asarray(exp_t.log_probs)[~np.asarray(mask, bool)] == 0)


def make_state(params, txs, seed=0):
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state={k: txs[k].init(params[k]) for k in params}, rng=seed_key_data(seed), scalars={})


def test_update_with_zero_advantages_only_moves_the_value_model(models):
  exp, _ = experience(models, PPOConfig(sampling=SAMPLING), rollout(models, SAMPLING, key=1))
  cfg = PPOConfig(sampling=SAMPLING, epochs=2, minibatches=2, entropy_coef=0.0, ptx_coef=0.0)
  exp = exp.replace(advantages=jnp.zeros_like(exp.advantages))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.0))
  state = make_state({"policy": models["policy"], "value": models["value"]}, {"policy": tx, "value": tx})
  update = jax.jit(make_ppo_update(models["policy_g"], models["value_g"], tx, tx, cfg))
  new, metrics = update(state, {"experience": exp, "ptx": None})
  jax.tree.map(np.testing.assert_array_equal, new.params["policy"], models["policy"])
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new.params["value"],
                                       models["value"]))
  assert max(moved) > 1e-4
  assert int(new.step) == 1
  assert float(metrics["train/approx_kl"]) < 1e-6 and float(metrics["train/clip_frac"]) == 0.0
  assert float(metrics["train/policy_grad_norm"]) == 0.0 and float(metrics["train/value_loss"]) > 0
  assert "train/ptx_loss" not in metrics


def test_shared_value_head_with_ptx_through_compile_step(models):
  sampling = SamplingConfig(6, temperature=0.9, top_k=6, top_p=0.9, eos_id=EOS)
  cfg = PPOConfig(sampling=sampling, epochs=2, minibatches=2, entropy_coef=0.01, ptx_coef=0.5,
                  whiten_rewards=True, kl_estimator="k3")
  head = value_head_params(MODEL)
  r = rollout(models, sampling, key=2)
  exp, metrics = jax.jit(make_experience, static_argnums=(0, 3, 8, 9))(
      models["policy_g"], models["policy"], models["ref"], None, head, r, rm_score(models, r), 0.1, cfg, "shared")
  np.testing.assert_array_equal(exp.values, 0.0)  # zero-initialised head
  rng = np.random.default_rng(0)
  ptx = {"tokens": jnp.asarray(rng.integers(4, 16, (2, 8)), jnp.int32), "mask": jnp.ones((2, 8), jnp.int32),
         "loss_mask": jnp.ones((2, 8), jnp.float32).at[:, 0].set(0.0)}

  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  rep = sharding.replicated(mesh)
  txs = {"policy": state_lib.make_optimizer(dict(lr=1e-2, grad_clip=1.0), 10),
         "value": state_lib.make_optimizer(dict(lr=1e-2), 10)}
  # The state is donated: give it copies of the shared fixture params.
  params = jax.tree.map(jnp.copy, {"policy": models["policy"], "value": head})
  state, state_sh = state_lib.create_train_state(params, txs, jax.tree.map(lambda _: rep, params), mesh, seed=0)
  batch = {"experience": exp, "ptx": ptx}
  update = make_ppo_update(models["policy_g"], None, txs["policy"], txs["value"], cfg, "shared")
  step = state_lib.compile_step(update, state_sh, jax.tree.map(lambda _: rep, batch), None, mesh)
  new, metrics = step(state, batch, None)
  assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
  assert float(metrics["train/ptx_loss"]) > 0
  for tree, old in ((new.params["value"], head), (new.params["policy"]["trunk"], models["policy"]["trunk"])):
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), tree, old))) > 1e-5
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree))
  assert int(new.step) == 1


def test_config_validation():
  with pytest.raises(ValueError, match="kl_estimator"):
    PPOConfig(sampling=SAMPLING, kl_estimator="k4")
  assert PPOConfig.from_mapping({"epochs": 3, "iterations": 5}, SAMPLING).epochs == 3


@pytest.mark.parametrize("advantage", ["gae", "rloo", "grpo"])
def test_ppo_raises_a_simple_reward(advantage):
  """A random tiny policy learns to emit a target token; reward = its fraction of the response.

  PPO with a value model, and the critic-free RLOO and GRPO (16 prompts x 2 samples) on the same path.
  """
  target, vocab = 5, 8
  cfg_m = DecoderConfig(vocab_size=vocab, num_layers=1, d_model=32, num_heads=4, d_ff=64, max_len=16)
  policy_g, policy = pure_split(Decoder(cfg_m, rngs=nnx.Rngs(0)))
  critic_free = advantage != "gae"
  value_g, value = (None, {}) if critic_free else pure_split(ScalarModel(cfg_m, 0.0, rngs=nnx.Rngs(1)))
  value_mode = "none" if critic_free else "separate"
  sampling = SamplingConfig(max_new_tokens=6, eos_id=EOS, stop_at_eos=False)
  cfg = PPOConfig(sampling=sampling, epochs=2, minibatches=2, lam=0.95, value_clip=1.0, advantage=advantage)
  tx = optax.adam(3e-3)
  state = make_state({"policy": policy, "value": value}, {"policy": tx, "value": tx})
  state = state.replace(scalars={"kl_coef": jnp.float32(0.01)})
  sample_fn = make_rollout_fn(policy_g, sampling)
  experience_fn = make_experience_fn(policy_g, value_g, cfg, value_mode)
  kl_config = {"kl_adaptive": False, "kl_target": 6.0, "kl_horizon": 10000}
  update = jax.jit(make_ppo_step(make_ppo_update(policy_g, value_g, tx, tx, cfg, value_mode), kl_config, 32))
  rng = np.random.default_rng(0)
  prompt = np.concatenate([np.full((16, 1), 2), rng.integers(4, vocab, (16, 2))], 1)
  prompt = jnp.asarray(np.repeat(prompt, 2, axis=0), jnp.int32)  # 2 samples per prompt
  group = jnp.repeat(jnp.arange(16), 2)
  prompt_mask = jnp.ones_like(prompt)
  scores = []
  for it in range(15):
    r = sample_fn(state.params["policy"], prompt, prompt_mask, group, jax.random.key(it))
    score = ((r.response == target) * r.response_mask).sum(1) / r.response_mask.sum(1)
    exp, metrics = experience_fn(state.params["policy"], policy, state.params["value"], r, score,
                                 state.scalars["kl_coef"])
    state, train = update(state, {"experience": exp, "ptx": None, "kl": metrics["rollout/kl"]}, None)
    scores.append(float(metrics["rollout/rm_score"]))
  assert scores[0] < 0.3
  assert np.mean(scores[-3:]) > scores[0] + 0.3, scores
  assert float(metrics["rollout/kl"]) > 0
  assert ("train/value_loss" in train) == (not critic_free)
  assert ("train/kl_loss" in train) == (advantage == "grpo")


def group_rollout() -> Rollout:
  """hand_rollout's rows as two prompts x two samples (groups [4, 9, 4, 9], not adjacent)."""
  return hand_rollout().replace(group=jnp.array([4, 9, 4, 9], jnp.int32))


@pytest.mark.parametrize("advantage", ["rloo", "grpo"])
def test_critic_free_experience_gives_each_token_its_sequence_advantage(models, advantage):
  sample = group_rollout()
  cfg = PPOConfig(sampling=SAMPLING, advantage=advantage, whiten_advantages=False)
  score = jnp.array([1.0, 2.0, 3.0, 2.0])  # group 9 scored all equal
  beta = 0.1
  exp, metrics = jax.jit(make_experience, static_argnums=(0, 3, 8, 9))(
      models["policy_g"], models["policy"], models["ref"], None, {}, sample, score, beta, cfg, "none")
  mask = np.asarray(sample.response_mask, bool)
  seq_kl = np.asarray(exp.kl).sum(1)
  if advantage == "rloo":
    reward = np.asarray(score) - beta * seq_kl  # the KL penalty is in RLOO's reward
    expected = np.array([reward[0] - reward[2], reward[1] - reward[3], reward[2] - reward[0], reward[3] - reward[1]])
    assert "rollout/zero_variance_fraction" not in metrics
  else:
    expected = np.array([-1.0, 0.0, 1.0, 0.0]) / (1.0 + 1e-6)  # z-scores; the KL is not in GRPO's reward
    assert float(metrics["rollout/zero_variance_fraction"]) == 0.5
  for row in range(4):
    np.testing.assert_allclose(np.asarray(exp.advantages)[row][mask[row]], expected[row], rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(exp.advantages)[~mask] == 0)
  np.testing.assert_array_equal(exp.values, 0.0)
  np.testing.assert_array_equal(exp.keep, 1.0)


def test_grpo_drops_zero_variance_groups_from_the_loss(models):
  sample = group_rollout()
  cfg = PPOConfig(sampling=SAMPLING, advantage="grpo", drop_zero_variance_groups=True, epochs=1, minibatches=1)
  score = jnp.array([1.0, 2.0, 3.0, 2.0])
  exp, _ = jax.jit(make_experience, static_argnums=(0, 3, 8, 9))(
      models["policy_g"], models["policy"], models["ref"], None, {}, sample, score, 0.1, cfg, "none")
  np.testing.assert_array_equal(exp.keep, [1.0, 0.0, 1.0, 0.0])
  np.testing.assert_array_equal(np.asarray(exp.loss_mask)[[1, 3]], 0)
  # The kept rows are whitened on their own: mean 0, unit std over their tokens.
  kept = np.asarray(exp.loss_mask, bool)
  assert abs(np.asarray(exp.advantages)[kept].mean()) < 1e-5
  # The dropped rows leave the loss: changing their tokens' advantages changes nothing.
  from rlhf_jax.algorithms.ppo import ppo_losses
  params = {"policy": models["policy"], "value": {}}
  loss = lambda e: ppo_losses(models["policy_g"], None, cfg, "none", params, e, None, 0.1)[0]  # noqa: E731
  poked = exp.replace(advantages=exp.advantages.at[1].set(5.0).at[3].set(-5.0))
  assert float(loss(poked)) == pytest.approx(float(loss(exp)), abs=1e-7)
  assert float(loss(exp.replace(advantages=exp.advantages.at[0].set(5.0)))) != pytest.approx(float(loss(exp)))


def test_critic_free_value_mode_must_match():
  with pytest.raises(ValueError, match="advantage"):
    PPOConfig(sampling=SAMPLING, advantage="vtrace")


@pytest.mark.parametrize("value_mode", ["separate", "shared"])
def test_sampler_old_log_probs_equal_the_teacher_forced_ones(models, value_mode):
  """ppo.old_log_probs='sampler' skips the policy forward: the experience is the teacher-forced one to float
  tolerance (log-probs, KL, rewards, advantages, returns, values)."""
  base = PPOConfig(sampling=SAMPLING, truncate_at_stop=True)
  reuse = dataclasses.replace(base, old_log_probs="sampler")
  r = truncate_rollout(rollout(models, SAMPLING, key=3), base)
  score = rm_score(models, r)
  value_g, value = ((models["value_g"], models["value"]) if value_mode == "separate"
                    else (None, value_head_params(MODEL)))
  value = jax.tree.map(lambda x: x + 0.01, value)  # a non-zero head, so values are compared too
  got = {}
  for name, cfg in (("teacher_forced", base), ("sampler", reuse)):
    fn = make_experience_fn(models["policy_g"], value_g, cfg, value_mode)
    got[name] = fn(models["policy"], models["ref"], value, r, score, 0.1)
  (e0, m0), (e1, m1) = got["teacher_forced"], got["sampler"]
  real = np.asarray(r.response_mask, bool)
  assert real.sum() > 4
  np.testing.assert_allclose(e1.log_probs, e0.log_probs, atol=2e-5)
  for field in ("kl", "rewards", "advantages", "returns", "values"):
    np.testing.assert_allclose(getattr(e1, field), getattr(e0, field), atol=1e-4, err_msg=field)
  assert float(m1["rollout/logprob_diff"]) == 0.0
  # The sampled estimate of the entropy: -mean log p of the drawn tokens.
  np.testing.assert_allclose(m1["rollout/entropy"], -np.asarray(r.log_probs)[real].mean(), rtol=1e-5)
  with pytest.raises(ValueError, match="top_k/top_p"):
    PPOConfig(sampling=TRUNCATED_SAMPLING, old_log_probs="sampler")


@pytest.mark.parametrize("advantage", ["gae", "rloo"])
def test_shared_prompt_experience_and_update_match_per_row_passes(models, advantage):
  """Two prompts x two samples (rows in repeat_prompts order): with ``share_prompt`` the experience (policy,
  reference, value, RM passes) and one update equal the per-row ones; minibatches keep a prompt's rows."""
  prompt = jnp.repeat(PROMPT[:2], 2, axis=0)
  prompt_mask = jnp.repeat(PROMPT_MASK[:2], 2, axis=0)
  group = jnp.repeat(jnp.arange(2, dtype=jnp.int32), 2)
  r = rollout_fn(models["policy_g"], SAMPLING)(models["policy"], prompt, prompt_mask, group, jax.random.key(4))
  value_mode = "none" if advantage == "rloo" else "separate"
  value_g = None if value_mode == "none" else models["value_g"]
  value = {} if value_mode == "none" else models["value"]
  cfg = PPOConfig(sampling=SAMPLING, advantage=advantage, epochs=1, minibatches=2)
  shared = ppo_lib.share_prompts(r, cfg, 2)
  assert shared.prompt_group == 2 and shared.shared_prefix == (PROMPT.shape[1], 2)
  assert ppo_lib.share_prompts(r, dataclasses.replace(cfg, share_prompt=False), 2) is r
  fn = make_experience_fn(models["policy_g"], value_g, cfg, value_mode)
  exps = [fn(models["policy"], models["ref"], value, x, rm_score(models, x), 0.1)[0] for x in (r, shared)]
  np.testing.assert_allclose(rm_score(models, shared), rm_score(models, r), atol=1e-5)
  for name in ("log_probs", "ref_log_probs", "values", "kl", "advantages", "returns"):
    np.testing.assert_allclose(getattr(exps[1], name), getattr(exps[0], name), atol=2e-5, err_msg=name)

  tx = optax.sgd(1.0)  # the step is the gradient (Adam's first step would amplify rounding into signs)
  params = {"policy": models["policy"], "value": value}
  # One minibatch: any order of the rows gives the same loss, so per-row and shared updates are comparable.
  update = jax.jit(make_ppo_update(models["policy_g"], value_g, tx, tx, dataclasses.replace(cfg, minibatches=1),
                                   value_mode))
  news = [update(make_state(params, {"policy": tx, "value": tx}), {"experience": e, "ptx": None})[0] for e in exps]
  moved = 0.0
  for a, b, before in zip(jax.tree.leaves(news[1].params), jax.tree.leaves(news[0].params), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, atol=2e-5)
    moved = max(moved, float(np.abs(np.asarray(b) - before).max()))
  assert moved > 1e-3
  # Minibatches hold whole groups, in order.
  split = np.asarray(ppo_lib._split_rows(jax.random.key(0), 8, 2, "rows", 2))
  assert sorted(split.ravel().tolist()) == list(range(8))
  assert all(row[i] % 2 == 0 and row[i + 1] == row[i] + 1 for row in split for i in (0, 2))
  with pytest.raises(ValueError, match="4 rows of 2 groups of 2, not divisible by ppo.minibatches=4"):
    ppo_lib._split_rows(jax.random.key(0), 4, 4, "experience", 2)


@pytest.mark.parametrize("value_mode", ["separate", "none"])
def test_trimmed_response_width_gives_the_same_experience_and_update(models, value_mode):
  """``rollout.trim_response_width`` cuts the response columns no row uses (here 6 -> 4 with buckets of 2):
  the experience over [B, P + 4] equals the full one's first 4 columns (the rest is 0), and one update gives
  the same params; the FLOP count reads the trimmed width."""
  from rlhf_jax.rollout import trim_response_width

  full = rollout(models, SAMPLING, key=5)
  keep = (jnp.arange(SAMPLING.max_new_tokens) < 3)[None]  # responses of at most 3 tokens
  full = full.with_response(jnp.where(keep, full.response, PAD), full.response_mask * keep)
  assert int(np.asarray(full.response_mask).sum(1).max()) == 3
  trimmed = trim_response_width(full, 2)
  assert trimmed.response_len == 4 and trim_response_width(full, 0) is full
  assert trim_response_width(full, 8) is full  # the bucket would be wider than N: nothing to cut
  advantage = "rloo" if value_mode == "none" else "gae"
  value_g = None if value_mode == "none" else models["value_g"]
  value = {} if value_mode == "none" else models["value"]
  cfg = PPOConfig(sampling=SAMPLING, advantage=advantage, epochs=1, minibatches=1)
  fn = make_experience_fn(models["policy_g"], value_g, cfg, value_mode)
  exps = [fn(models["policy"], models["ref"], value, x, rm_score(models, x), 0.1) for x in (full, trimmed)]
  (e_full, m_full), (e_cut, m_cut) = exps
  for name in ("log_probs", "ref_log_probs", "values", "kl", "rewards", "advantages", "returns"):
    a, b = np.asarray(getattr(e_full, name)), np.asarray(getattr(e_cut, name))
    np.testing.assert_allclose(b, a[:, :4], atol=2e-5, err_msg=name)
    assert np.all(a[:, 4:] == 0), name
  for key in m_full:
    np.testing.assert_allclose(m_cut[key], m_full[key], atol=2e-5, err_msg=key)

  tx = optax.sgd(1.0)
  params = {"policy": models["policy"], "value": value}
  update = jax.jit(make_ppo_update(models["policy_g"], value_g, tx, tx, cfg, value_mode))
  news = [update(make_state(params, {"policy": tx, "value": tx}), {"experience": e, "ptx": None})[0]
          for e, _ in exps]
  for a, b in zip(jax.tree.leaves(news[1].params), jax.tree.leaves(news[0].params)):
    np.testing.assert_allclose(a, b, atol=2e-5)
  lengths = np.asarray(full.response_mask).sum(1)
  counts = [ppo_lib.iteration_counts(MODEL, cfg, 4, PROMPT.shape[1], lengths, value_mode, response_width=w).flops
            for w in (None, 4)]
  assert counts[1] < counts[0]


FUSED_CASES = [("gae", "separate", "teacher_forced", 1), ("gae", "separate", "teacher_forced", 2),
               ("gae", "shared", "teacher_forced", 1), ("gae", "separate", "sampler", 1),
               ("rloo", "none", "teacher_forced", 1), ("grpo", "none", "teacher_forced", 2)]


@pytest.mark.parametrize("advantage, value_mode, old_log_probs, epochs", FUSED_CASES)
def test_fused_update_equals_experience_then_update(models, advantage, value_mode, old_log_probs, epochs):
  """With one minibatch the update finishes ``ExperienceInputs`` from its own first forward pass: the same
  experience metrics, train metrics, new params and KL-coefficient move as the separate experience pass."""
  prompt = jnp.repeat(PROMPT[:2], 2, axis=0)
  group = jnp.repeat(jnp.arange(2, dtype=jnp.int32), 2)
  r = rollout_fn(models["policy_g"], SAMPLING)(models["policy"], prompt, jnp.repeat(PROMPT_MASK[:2], 2, axis=0),
                                               group, jax.random.key(6))
  cfg = PPOConfig(sampling=SAMPLING, advantage=advantage, epochs=epochs, minibatches=1, entropy_coef=0.01,
                  old_log_probs=old_log_probs, no_eos_penalty=-1.0)
  assert cfg.fuses_experience and not dataclasses.replace(cfg, fuse_experience=False).fuses_experience
  r = ppo_lib.share_prompts(r, cfg, 2)
  value_g, value = {"separate": (models["value_g"], models["value"]), "shared": (None, value_head_params(MODEL)),
                    "none": (None, {})}[value_mode]
  value = jax.tree.map(lambda x: x + 0.01, value)  # non-zero values, so GAE's baseline is compared too
  score = rm_score(models, r)
  exp, exp_metrics = make_experience_fn(models["policy_g"], value_g, cfg, value_mode)(
      models["policy"], models["ref"], value, r, score, 0.1)
  inputs = ppo_lib.make_experience_inputs_fn(models["policy_g"], cfg)(models["ref"], r, score)
  np.testing.assert_allclose(inputs.ref_log_probs, exp.ref_log_probs, atol=1e-6)

  tx = optax.sgd(0.5)  # the step is the gradient: rounding is not amplified into signs as by Adam
  kl_config = {"kl_adaptive": True, "kl_target": 0.01, "kl_horizon": 100}
  step = jax.jit(make_ppo_step(make_ppo_update(models["policy_g"], value_g, tx, tx, cfg, value_mode), kl_config, 4))
  params = {"policy": models["policy"], "value": value}
  state = make_state(params, {"policy": tx, "value": tx}).replace(scalars={"kl_coef": jnp.float32(0.1)})
  new0, m0 = step(state, {"experience": exp, "ptx": None, "kl": exp_metrics["rollout/kl"]}, None)
  new1, m1 = step(state, {"experience": inputs, "ptx": None, "kl": None}, None)
  assert set(m1) == set(m0) | set(exp_metrics)
  for key, want in {**m0, **exp_metrics}.items():
    np.testing.assert_allclose(m1[key], want, rtol=1e-4, atol=2e-5, err_msg=key)
  moved = 0.0
  for a, b, before in zip(jax.tree.leaves(new1.params), jax.tree.leaves(new0.params), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, atol=2e-5)
    moved = max(moved, float(np.abs(np.asarray(b) - before).max()))
  assert moved > 1e-3
  np.testing.assert_allclose(new1.scalars["kl_coef"], new0.scalars["kl_coef"], rtol=1e-6)
  assert float(new0.scalars["kl_coef"]) != 0.1  # the adaptive controller moved, from the same KL


def test_fused_experience_needs_one_minibatch_and_counts_two_passes_less(models):
  cfg = PPOConfig(sampling=SAMPLING, epochs=1, minibatches=2)
  assert not cfg.fuses_experience
  r = rollout(models, SAMPLING, key=7)
  inputs = ppo_lib.make_experience_inputs_fn(models["policy_g"], cfg)(models["ref"], r, rm_score(models, r))
  tx = optax.sgd(0.1)
  state = make_state({"policy": models["policy"], "value": models["value"]}, {"policy": tx, "value": tx})
  update = make_ppo_update(models["policy_g"], models["value_g"], tx, tx, cfg)
  with pytest.raises(ValueError, match="needs ppo.minibatches=1, got 2"):
    jax.eval_shape(update, state, {"experience": inputs, "ptx": None})

  lengths = np.asarray(r.response_mask).sum(1)
  one = dataclasses.replace(cfg, minibatches=1)
  flops = {fuse: ppo_lib.iteration_counts(MODEL, dataclasses.replace(one, fuse_experience=fuse), 4,
                                          PROMPT.shape[1], lengths, "separate").flops for fuse in (False, True)}
  width = PROMPT.shape[1] + SAMPLING.max_new_tokens
  saved = compute.sequence_flops(MODEL, 4, width) + compute.sequence_flops(MODEL, 4, width, lm_head=False)
  assert flops[False] - flops[True] == pytest.approx(saved)


def test_outputs_outside_the_loss_carry_no_gradient(models):
  """Under ``rows_call`` every output of the model pass gets a dense cotangent: the entropy (without an
  entropy bonus) and the logits (read only for a truncated sampler's metric) are cut from the gradient."""
  r = rollout(models, SAMPLING, key=8)

  def grad_of(cfg, pick):
    def f(p):
      out = ppo_lib._policy_and_values(models["policy_g"], p, models["value_g"], models["value"], r, cfg, "separate")
      return pick(out).sum()
    return jax.tree.leaves(jax.grad(f)(models["policy"]))

  def norm(leaves):
    return max(float(jnp.abs(x).max()) for x in leaves)

  entropy = lambda out: out[1]  # noqa: E731
  assert norm(grad_of(PPOConfig(sampling=SAMPLING), entropy)) == 0.0
  assert norm(grad_of(PPOConfig(sampling=SAMPLING, entropy_coef=0.01), entropy)) > 1e-4
  assert norm(grad_of(PPOConfig(sampling=SAMPLING), lambda out: out[0])) > 1e-4
  assert ppo_lib._policy_and_values(models["policy_g"], models["policy"], models["value_g"], models["value"], r,
                                    PPOConfig(sampling=SAMPLING), "separate")[2] is None
  truncated = PPOConfig(sampling=TRUNCATED_SAMPLING)
  assert norm(grad_of(truncated, lambda out: out[2])) == 0.0
