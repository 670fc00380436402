"""Stages of one process share traced and compiled programs: a second stage that builds the same model shape,
sampler, evaluator, scorer, optimizer or training step (from its own, equal, arguments) gets the first one's
jitted function back, and calling it at the same shapes traces nothing again."""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import sharding, state as state_lib
from rlhf_jax.algorithms import dpo, ppo
from rlhf_jax.algorithms.lm import make_lm_eval, make_lm_step
from rlhf_jax.config_groups import optimizer_config
from rlhf_jax.generate import SamplingConfig
from rlhf_jax.models import DecoderConfig
from rlhf_jax.rollout import make_rollout_fn
from rlhf_jax.scoring import RewardModelScorer
from rlhf_jax.stages import context, evaluation


def model_config() -> DecoderConfig:
  """A fresh (equal, not identical) config each call, as each stage's context builds its own."""
  return DecoderConfig(vocab_size=24, num_layers=1, d_model=16, num_heads=2, d_ff=32, max_len=24)


def sampling() -> SamplingConfig:
  return SamplingConfig(max_new_tokens=4, temperature=0.9, eos_id=3)


PROMPT = jnp.array([[0, 2, 9, 10], [2, 11, 12, 13]], jnp.int32)
MASK = (PROMPT > 0).astype(jnp.int32)
GROUP = jnp.arange(2, dtype=jnp.int32)


@contextlib.contextmanager
def counted_traces():
  """Counts JAX's traces of functions for jit (one per program traced) while the block runs."""
  seen = []

  def listener(event, _secs, **_):
    if event == "/jax/core/compile/jaxpr_trace_duration":
      seen.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope="module")
def params():
  lm_graphdef, lm_abstract = context._abstract_model(model_config(), "lm")
  scalar_graphdef, _ = context._abstract_model(model_config(), "scalar")
  lm = nnx.split(context.model_factory(model_config(), "lm")(nnx.Rngs(0)))[1].to_pure_dict()
  scalar = nnx.split(context.model_factory(model_config(), "scalar", 0.5)(nnx.Rngs(1)))[1].to_pure_dict()
  assert jax.tree.map(lambda a: a.shape, lm) == jax.tree.map(lambda a: a.shape, lm_abstract.to_pure_dict())
  return dict(lm_graphdef=lm_graphdef, scalar_graphdef=scalar_graphdef, lm=lm, scalar=scalar)


def test_a_model_shape_is_traced_once_per_process():
  first = context._abstract_model(model_config(), "lm")
  with counted_traces() as traces:
    again = context._abstract_model(model_config(), "lm")
  assert again is first and traces == []
  other = context._abstract_model(dataclasses.replace(model_config(), d_ff=48), "lm")
  shapes = lambda entry: jax.tree.map(lambda a: a.shape, entry[1].to_pure_dict())  # noqa: E731
  assert shapes(other) != shapes(first)  # another shape is its own entry
  with pytest.raises(ValueError):
    context._abstract_model(model_config(), "critic")


def test_stages_share_the_sampler_evaluators_and_scorer(params):
  graphdef, scalar_graphdef = params["lm_graphdef"], params["scalar_graphdef"]
  key = jax.random.key(0)
  # The first stage: traces and compiles each program once.
  rollout = make_rollout_fn(graphdef, sampling())(params["lm"], PROMPT, MASK, GROUP, key)
  scores = RewardModelScorer(scalar_graphdef, params["scalar"])(rollout)
  kl = evaluation.log_ratio_fn(graphdef, sampling())(params["lm"], params["lm"], rollout)
  batch = {"tokens": rollout.tokens, "mask": rollout.mask,
           "loss_mask": jnp.concatenate([jnp.zeros_like(MASK), rollout.response_mask], axis=1)}
  loss = make_lm_eval(graphdef)(params["lm"], batch)
  # A later stage, with its own equal arguments (its own graphdef, sampler settings and scorer).
  later_graphdef = context._abstract_model(model_config(), "lm")[0]
  later_scalar = context._abstract_model(model_config(), "scalar")[0]
  with counted_traces() as traces:
    rollout_2 = make_rollout_fn(later_graphdef, sampling())(params["lm"], PROMPT, MASK, GROUP, key)
    scores_2 = RewardModelScorer(later_scalar, params["scalar"])(rollout_2)
    kl_2 = evaluation.log_ratio_fn(later_graphdef, sampling())(params["lm"], params["lm"], rollout_2)
    loss_2 = make_lm_eval(later_graphdef)(params["lm"], batch)
  assert traces == []
  np.testing.assert_array_equal(rollout_2.tokens, rollout.tokens)
  np.testing.assert_array_equal(scores_2, scores)
  np.testing.assert_allclose(kl_2, 0.0, atol=1e-6)
  np.testing.assert_array_equal(kl_2, kl)
  assert [float(x) for x in loss_2] == [float(x) for x in loss]
  # Other settings are other programs.
  assert make_rollout_fn(graphdef, SamplingConfig(max_new_tokens=5, eos_id=3)) is not make_rollout_fn(graphdef,
                                                                                                    sampling())
  assert make_rollout_fn(graphdef, sampling(), 2) is not make_rollout_fn(graphdef, sampling(), 1)
  # The PPO instances of an iterated run, and DPO's held-out log-ratios, the same way.
  assert ppo.make_experience_fn(graphdef, scalar_graphdef, ppo.PPOConfig(sampling())) is ppo.make_experience_fn(
      later_graphdef, later_scalar, ppo.PPOConfig(sampling()))
  assert dpo.make_log_ratio_fn(graphdef, 4, sampling(), False) is dpo.make_log_ratio_fn(later_graphdef, 4, sampling(),
                                                                                         False)


def test_stages_share_their_optimizer_and_training_step(params):
  graphdef = params["lm_graphdef"]
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  rep = sharding.replicated(mesh)
  tokens = jnp.array([[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14]], jnp.int32)
  batch = {"tokens": tokens, "mask": (tokens > 0).astype(jnp.int32), "loss_mask": (tokens > 0).astype(jnp.float32)}
  batch_shardings = jax.tree.map(lambda _: rep, batch)

  def stage(graphdef):
    """What a stage builds from its own config: optimizer, state, step; then one step from the same params."""
    tx = state_lib.make_optimizer(optimizer_config(1e-2), 10)
    shardings = state_lib.param_shardings(context._abstract_model(model_config(), "lm")[1], mesh,
                                          sharding.DEFAULT_RULES)
    state, state_shardings = state_lib.create_train_state({"policy": jax.tree.map(jnp.copy, params["lm"])},
                                                          {"policy": tx}, {"policy": shardings}, mesh, seed=0)
    step = state_lib.compile_step(make_lm_step(graphdef, tx, mesh=mesh), state_shardings, batch_shardings, None,
                                  mesh)
    state, metrics = step(state, batch, None)
    return tx, step, state, metrics

  tx, step, state, metrics = stage(graphdef)
  with counted_traces() as traces:
    tx_2, step_2, state_2, metrics_2 = stage(context._abstract_model(model_config(), "lm")[0])
  assert traces == []
  assert tx_2 is tx and step_2 is step
  assert float(metrics_2["train/loss"]) == float(metrics["train/loss"])
  jax.tree.map(np.testing.assert_array_equal, state_2.params, state.params)
  # Other settings are other transformations and steps.
  other = state_lib.make_optimizer(optimizer_config(1e-3), 10)
  assert other is not tx and state_lib.make_optimizer(optimizer_config(1e-2), 20) is not tx
  assert make_lm_step(graphdef, other, mesh=mesh) is not make_lm_step(graphdef, tx, mesh=mesh)
  # PPO's update and its KL-controlled step, from equal instance settings.
  pcfg = ppo.PPOConfig(sampling())
  section = {"kl_adaptive": True, "kl_target": 6.0, "kl_horizon": 10000}
  update = ppo.make_ppo_update(graphdef, params["scalar_graphdef"], tx, tx, pcfg)
  assert ppo.make_ppo_update(graphdef, params["scalar_graphdef"], tx_2, tx_2, ppo.PPOConfig(sampling())) is update
  assert ppo.make_ppo_step(update, dict(section), 8) is ppo.make_ppo_step(update, dict(section), 8)
  assert ppo.make_ppo_step(update, {**section, "kl_target": 3.0}, 8) is not ppo.make_ppo_step(update, section, 8)


def test_optimizer_settings_must_be_flat():
  with pytest.raises(ValueError, match=r"optimizer\.lr must be a number, string or flat sequence"):
    state_lib.make_optimizer({"lr": {"peak": 1e-3}}, 10)
