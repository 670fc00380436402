"""ppo stage: PPO (and PPO-ptx) of the SFT policy against the reward model, with a per-token KL penalty.

Per iteration: sample responses to a batch of train prompts with the jitted
KV-cache sampler, score them with the frozen reward model, build per-token
rewards (-beta * KL to the frozen SFT reference, plus the RM score at the last
token), GAE, then E epochs x M minibatches of clipped policy/value updates in
one compiled step. The KL coefficient lives in the state and is updated in
the same step (fixed, or the adaptive controller of Ziegler et al.).
Reference and reward params are frozen and never donated.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rlhf_jax import sharding, state as state_lib
from rlhf_jax.data import batching
from rlhf_jax.generate import make_sampler
from rlhf_jax.rl.kl import update_kl_coef
from rlhf_jax.rl.ppo import PPOConfig, make_experience_fn, make_ppo_update, value_head_params
from rlhf_jax.stages import evaluation
from rlhf_jax.stages.context import StageContext, StageError
from rlhf_jax.stages.loop import run_loop, truncation_metrics
from rlhf_jax.state import TrainState

ROLLOUT_STREAM = 101
VALUE_INITS = ("reward", "sft", "shared")


def ppo_config(ctx: StageContext) -> PPOConfig:
  """The PPO hyperparameters of ``config.ppo`` (those ``PPOConfig`` has) plus the rollout sampler."""
  c = ctx.config.ppo
  names = ({f.name for f in dataclasses.fields(PPOConfig)} - {"sampling"}) & set(c.keys())
  return PPOConfig.from_mapping({k: c[k] for k in names}, evaluation.sampling_config(ctx, c))


def init_value(ctx: StageContext, reward_params: dict) -> tuple[dict, dict, str]:
  """Value params, their shardings and the value mode, as ``ppo.value_init`` says."""
  init = ctx.config.ppo.value_init
  if init == "reward":
    return jax.tree.map(jnp.copy, reward_params), ctx.param_shardings("scalar"), "separate"
  if init == "sft":
    _, params, shardings = ctx.init_model("scalar", jax.random.key(0), head_std=0.0)
    params["trunk"] = ctx.load_params("sft", "lm")[0]["trunk"]
    return params, shardings, "separate"
  if init == "shared":
    rep = sharding.replicated(ctx.mesh)
    params = jax.device_put(value_head_params(ctx.model_config), rep)
    return params, jax.tree.map(lambda _: rep, params), "shared"
  raise StageError(f"ppo.value_init must be one of {VALUE_INITS}, got {init!r}")


def make_kl_step(update, cfg, rows: int):
  """Wraps the PPO update: also moves the KL coefficient with the rollout's observed KL."""
  kind = "adaptive" if cfg.kl_adaptive else "fixed"

  def step(state: TrainState, batch, frozen):
    new_state, metrics = update(state, batch, frozen)
    beta = update_kl_coef(state.scalars["kl_coef"], batch["kl"], rows, kind=kind,
                          target=cfg.kl_target if cfg.kl_adaptive else None,
                          horizon=cfg.kl_horizon if cfg.kl_adaptive else None)
    metrics["train/kl_coef"] = state.scalars["kl_coef"]
    return new_state.replace(scalars={**new_state.scalars, "kl_coef": beta}), metrics

  return step


def run(ctx: StageContext) -> dict[str, float]:
  cfg = ctx.config.ppo
  tok = ctx.tokenizer
  pcfg = ppo_config(ctx)
  lm_graphdef, scalar_graphdef = ctx.graphdef("lm"), ctx.graphdef("scalar")

  # Models: trained policy and value; frozen reference and reward model.
  policy, _ = ctx.load_params("sft", "lm")
  reference, _ = ctx.load_params("sft", "lm")
  reward, _ = ctx.load_params("reward", "scalar")
  value, value_shardings, value_mode = init_value(ctx, reward)
  updates_total = cfg.iterations * cfg.epochs * cfg.minibatches
  policy_tx = state_lib.make_optimizer(cfg.policy_optimizer, updates_total)
  value_tx = state_lib.make_optimizer(cfg.value_optimizer, updates_total)
  state, shardings = state_lib.create_train_state(
      {"policy": policy, "value": value}, {"policy": policy_tx, "value": value_tx},
      {"policy": ctx.param_shardings("lm"), "value": value_shardings}, ctx.mesh, seed=ctx.config.seed,
      scalars={"kl_coef": cfg.kl_coef})

  # Rollouts: prompts by step, sampler keys by step, so a resumed run replays the same data.
  prompts = ctx.records("prompts", "train")
  loader = ctx.loader(prompts, cfg.prompts_per_iteration)
  if cfg.ptx_coef:
    text = ctx.records("pretraining", "train")
    text_loader = ctx.loader(text, cfg.ptx_batch_size)
  sampler = make_sampler(lm_graphdef, pcfg.sampling)
  experience_fn = make_experience_fn(lm_graphdef, scalar_graphdef if value_mode == "separate" else None,
                                     scalar_graphdef, pcfg, value_mode)
  rollout_key = ctx.key(ROLLOUT_STREAM)
  rows = cfg.prompts_per_iteration * cfg.samples_per_prompt

  def rollout(params, prompt, prompt_mask, key, kl_coef):
    sample = sampler(params["policy"], prompt, prompt_mask, key)
    exp, metrics = experience_fn(params["policy"], reference, params["value"], reward, prompt, prompt_mask,
                                 sample, kl_coef)
    return sample, exp, metrics

  def host_prompts(step):
    texts = [prompts[int(i)]["prompt"] for i in loader.indices_for_step(step)]
    texts = [t for t in texts for _ in range(cfg.samples_per_prompt)]
    return texts, batching.prompt_batch(tok, texts, ctx.config.data.prompt_len)

  def host_ptx(step):
    return batching.lm_batch(tok, [text[int(i)]["text"] for i in text_loader.indices_for_step(step)],
                             ctx.config.data.seq_len)

  def make_batch(step, state):
    texts, (prompt, stats) = host_prompts(step)
    prompt = ctx.put(prompt)
    sample, exp, rollout_metrics = rollout(state.params, prompt["tokens"], prompt["mask"],
                                           jax.random.fold_in(rollout_key, step), state.scalars["kl_coef"])
    host = {k: float(v) for k, v in jax.device_get(rollout_metrics).items()}
    # The gold score is read for monitoring only; nothing trains on it.
    host["rollout/gold_score"] = float(ctx.task.gold_scores(texts, evaluation.decode_responses(ctx, sample)).mean())
    batch = {"experience": exp, "kl": rollout_metrics["rollout/kl"], "ptx": None}
    if cfg.ptx_coef:
      ptx, ptx_stats = host_ptx(step)
      batch["ptx"] = ctx.put(ptx)
      stats = stats + ptx_stats
    host.update(truncation_metrics(stats))
    return batch, host

  # Batch shapes by abstract evaluation: no throw-away rollout just to learn them.
  example_prompt = host_prompts(0)[1][0]
  _, exp_shape, metrics_shape = jax.eval_shape(rollout, state.params, example_prompt["tokens"],
                                               example_prompt["mask"], rollout_key, state.scalars["kl_coef"])
  batch_shape = {"experience": exp_shape, "kl": metrics_shape["rollout/kl"],
                 "ptx": host_ptx(0)[0] if cfg.ptx_coef else None}
  update = make_ppo_update(lm_graphdef, scalar_graphdef if value_mode == "separate" else None, policy_tx,
                           value_tx, pcfg, value_mode)
  step = state_lib.compile_step(make_kl_step(update, cfg, rows), shardings, ctx.batch_shardings(batch_shape),
                                None, ctx.mesh)

  evaluator = evaluation.PolicyEvaluator(ctx)
  reward_fn = evaluation.make_reward_fn(scalar_graphdef)
  sft_gold = evaluation.load_gold(ctx, "sft")

  def evaluate(state, step_number):
    del step_number
    metrics, _ = evaluator.evaluate(state.params["policy"], reference=reference, reward=(reward_fn, reward),
                                    baseline_gold=sft_gold)
    return metrics

  loop_cfg = dict(checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints,
                  async_checkpoints=cfg.async_checkpoints, log_every=cfg.log_every, eval_every=cfg.eval_every)
  state, last_eval = run_loop(ctx, "ppo", state, shardings, step, make_batch, cfg.iterations, loop_cfg,
                              evaluate=evaluate)
  ctx.save_params("ppo", state.params["policy"], {"kl_coef": float(state.scalars["kl_coef"])})
  return {**last_eval, "ppo/kl_coef": float(state.scalars["kl_coef"])}
