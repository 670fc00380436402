"""ppo stage: PPO (and PPO-ptx), RLOO and GRPO of a policy instance against a reward-model instance.

``advantage`` picks the estimator (gae: PPO with a value model; rloo, grpo: critic-free, k =
``samples_per_prompt`` samples per prompt); everything else is one code path.

Per iteration (``collect`` then the compiled ``step``): a rollout of the policy
on the iteration's prompts (``samples_per_prompt`` each), truncation, the RM
score, the experience (reference log-probs, values, rewards, advantages),
then E epochs x M minibatches of updates and the KL-coefficient update in one
compiled step (with one minibatch the step's first forward pass also gives the
experience's policy log-probs and values: ``ppo.fuse_experience``). Prompts and
keys are functions of the iteration, so a resumed
run replays the same data. Reference and reward params are frozen and never
donated.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding, state as state_lib
from rlhf_jax.algorithms import ppo
from rlhf_jax.data import batching, bucketing
from rlhf_jax.rollout import (make_rollout_fn, repeat_prompts, response_lengths, response_texts,
                              trim_response_width)
from rlhf_jax.scoring import GoldScorer
from rlhf_jax.stages import evaluation
from rlhf_jax.stages.context import StageContext, StageError
from rlhf_jax.stages.loop import run_loop, truncation_metrics


# A copy (the value model's params are donated to the update; the reward model's are not), one program.
_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


# One function per distinct argument in a process: PPO instances with equal settings (the rounds of an
# iterated run) share their traced and compiled programs.
@functools.lru_cache(maxsize=16)
def _truncate_fn(pcfg: ppo.PPOConfig) -> Callable:
  return jax.jit(lambda r: ppo.truncate_rollout(r, pcfg))


@functools.lru_cache(maxsize=16)
def _compact_fn(rows: int, real_rows: jax.sharding.Sharding) -> Callable:
  return jax.jit(lambda r, valid: sharding.take_rows(r, valid, rows), out_shardings=real_rows)


@functools.lru_cache(maxsize=16)
def _real_ptx_rows(ppo_step: Callable, ptx_rows: int) -> Callable:
  """``ppo_step`` fed only the real rows of a padded ptx batch (the update splits them into minibatches)."""

  def step_fn(state, batch, frozen):
    if batch["ptx"] is not None:
      ptx = dict(batch["ptx"])
      batch = {**batch, "ptx": sharding.take_rows(ptx, ptx.pop("valid"), ptx_rows)}
    return ppo_step(state, batch, frozen)

  return step_fn


def init_value(ctx: StageContext, instance, reward_params: dict) -> tuple[dict, dict, str]:
  """Value params, their shardings and the value mode, as ``value_init`` says (none for rloo, grpo)."""
  if instance.section.advantage in ppo.GROUP_ESTIMATORS:
    return {}, {}, "none"
  init = instance.section.value_init
  if init == "reward":
    return _copy(reward_params), ctx.param_shardings("scalar"), "separate"
  if init == "sft":
    _, params, shardings = ctx.init_model("scalar", ctx.key("init/value", instance.name), head_std=0.0)
    params["trunk"] = ctx.load_params(instance.section.reference, "lm")[0]["trunk"]
    return params, shardings, "separate"
  if init == "shared":
    rep = sharding.replicated(ctx.mesh)
    params = jax.device_put(ppo.value_head_params(ctx.model_config), rep)
    return params, jax.tree.map(lambda _: rep, params), "shared"
  raise StageError(f"{instance.name}.value_init must be one of {ppo.VALUE_INITS}, got {init!r}")


def run(ctx: StageContext, instance) -> dict[str, float]:
  cfg = instance.section
  tok = ctx.tokenizer
  try:
    pcfg = ppo.PPOConfig.from_mapping(cfg, ctx.sampling(cfg))
  except ValueError as e:
    raise StageError(f"{instance.name}: {e}") from e
  if pcfg.critic_free and cfg.samples_per_prompt < 2:
    raise StageError(f"{instance.name}.advantage={pcfg.advantage!r} compares samples of a prompt: "
                     f"{instance.name}.samples_per_prompt must be >= 2, got {cfg.samples_per_prompt}")
  if cfg.ptx_coef and cfg.ptx_batch_size % cfg.minibatches:
    raise StageError(f"{instance.name}.ptx_batch_size={cfg.ptx_batch_size} does not split into "
                     f"{instance.name}.minibatches={cfg.minibatches} equal minibatches")
  lm_graphdef, scalar_graphdef = ctx.graphdef("lm"), ctx.graphdef("scalar")

  # Models: trained policy and value; frozen reference and reward model.
  policy, _ = ctx.load_params(cfg.policy, "lm")
  reference, _ = ctx.load_params(cfg.reference, "lm")
  scorer = evaluation.reward_scorer(ctx, cfg.reward)
  value, value_shardings, value_mode = init_value(ctx, instance, scorer.params)
  value_graphdef = scalar_graphdef if value_mode == "separate" else None
  updates_total = cfg.iterations * cfg.epochs * cfg.minibatches
  policy_tx = state_lib.make_optimizer(cfg.policy_optimizer, updates_total)
  value_tx = state_lib.make_optimizer(cfg.value_optimizer, updates_total)
  state, shardings = state_lib.create_train_state(
      {"policy": policy, "value": value}, {"policy": policy_tx, "value": value_tx},
      {"policy": ctx.param_shardings("lm"), "value": value_shardings}, ctx.mesh, seed=ctx.config.seed,
      scalars={"kl_coef": cfg.kl_coef})

  prompts = ctx.records("prompts", "train")
  loader = ctx.loader(prompts, cfg.prompts_per_iteration)
  if cfg.ptx_coef:
    text = ctx.records("pretraining", "train")
    text_loader = ctx.loader(text, cfg.ptx_batch_size)
  rollout_fn = make_rollout_fn(lm_graphdef, pcfg.sampling, cfg.samples_per_prompt if pcfg.share_prompt else 1,
                             ctx.decode_layout)
  truncate = _truncate_fn(pcfg)
  # One minibatch: the update's forward pass gives the policy's and value model's numbers (pcfg.fuse_experience),
  # so the experience stops at its inputs.
  fused = pcfg.fuses_experience
  if fused:
    inputs_fn = ppo.make_experience_inputs_fn(lm_graphdef, pcfg)
  else:
    experience_fn = ppo.make_experience_fn(lm_graphdef, value_graphdef, pcfg, value_mode)
  gold = GoldScorer(ctx.task)
  rollout_key = ctx.key("rollout", instance.name)
  rows = cfg.prompts_per_iteration * cfg.samples_per_prompt

  def host_prompts(step):
    texts, group = repeat_prompts([prompts[int(i)]["prompt"] for i in loader.indices_for_step(step)],
                                  cfg.samples_per_prompt)
    batch, stats = batching.prompt_batch(tok, texts, ctx.config.data.prompt_len)
    return texts, {**bucketing.trim_prompts(batch, ctx.config.data.min_bucket_len), "group": group}, stats

  def host_ptx(step):
    batch, stats = batching.lm_batch(tok, [text[int(i)]["text"] for i in text_loader.indices_for_step(step)],
                                     ctx.config.data.seq_len)
    return bucketing.trim_texts(batch, ctx.config.data.min_bucket_len), stats

  # Prompts (and ptx rows) are padded to fit the mesh; the rollout's real rows are gathered right after
  # sampling, so the experience, its batch statistics (whitening, means) and the minibatch split are
  # those of exactly ``rows`` rows on any mesh (held replicated where the data axes do not divide them).
  real_rows = sharding.rows_sharding(ctx.mesh, ctx.rules, (rows,))
  compact = _compact_fn(rows, real_rows)

  def collect(params, prompt, key, kl_coef, trim=False):
    """One iteration's experience: rollout -> real rows -> truncation -> (with ``trim``, response columns cut
    to the longest response's bucket: a host read, so not under ``eval_shape``) -> RM score -> experience
    (``ExperienceInputs`` and no metrics when the update finishes it). Returns the rollout, experience,
    metrics and (with ``trim``) the rows' response lengths [rows]."""
    rollout = rollout_fn(params["policy"], prompt["tokens"], prompt["mask"], prompt["group"], key)
    if rollout.prompt.shape[0] != rows:
      rollout = compact(rollout, prompt["valid"])
    rollout = ppo.share_prompts(truncate(rollout), pcfg, cfg.samples_per_prompt)  # rows: repeat_prompts order
    lengths = None
    if trim:
      lengths = response_lengths(rollout)
      rollout = trim_response_width(rollout, ctx.config.data.min_bucket_len, lengths)
    if fused:
      return rollout, inputs_fn(reference, rollout, scorer(rollout)), {}, lengths
    exp, metrics = experience_fn(params["policy"], reference, params["value"], rollout, scorer(rollout), kl_coef)
    return rollout, exp, metrics, lengths

  def make_batch(step, state):
    texts, prompt, stats = host_prompts(step)
    rollout, exp, rollout_metrics, lengths = collect(state.params, ctx.put(prompt, with_valid=True),
                                            jax.random.fold_in(rollout_key, step), state.scalars["kl_coef"], trim=True)
    # As the step expects (XLA may leave a row array it built from a constant replicated; a no-op otherwise).
    exp = jax.device_put(exp, batch_shardings["experience"])
    host = {k: float(v) for k, v in jax.device_get(rollout_metrics).items()}
    # The gold score is read for monitoring only; nothing trains on it.
    host["rollout/gold_score"] = float(gold(rollout, texts, response_texts(tok, rollout)).mean())
    batch = {"experience": exp, "kl": None if fused else rollout_metrics["rollout/kl"], "ptx": None}
    ptx_shape = None
    if cfg.ptx_coef:
      ptx, ptx_stats = host_ptx(step)
      batch["ptx"] = ctx.put(ptx, with_valid=True)
      stats = stats + ptx_stats
      ptx_shape = tuple(ptx["tokens"].shape)
    host.update(truncation_metrics(stats))
    host.update(ppo.iteration_counts(ctx.model_config, pcfg, rows, rollout.prompt_len, lengths, value_mode,
                                     ptx_shape, cfg.samples_per_prompt, rollout.response_len).metrics())
    return batch, host

  # Batch shapes by abstract evaluation: no throw-away rollout just to learn them.
  example = {**host_prompts(0)[1], "valid": np.ones(rows, np.int32)}
  _, exp_shape, metrics_shape, _ = jax.eval_shape(collect, state.params, example, rollout_key, state.scalars["kl_coef"])
  batch_shape = {"experience": exp_shape, "kl": None if fused else metrics_shape["rollout/kl"],
                 "ptx": {**host_ptx(0)[0], "valid": np.zeros(1, np.int32)} if cfg.ptx_coef else None}
  update = ppo.make_ppo_update(lm_graphdef, value_graphdef, policy_tx, value_tx, pcfg, value_mode, ctx.mesh,
                               ctx.rules)
  step_fn = _real_ptx_rows(ppo.make_ppo_step(update, cfg, rows), cfg.ptx_batch_size)
  batch_shardings = {"experience": ctx.device_batch_shardings(exp_shape),
                     "kl": ctx.device_batch_shardings(batch_shape["kl"]),
                     "ptx": ctx.batch_shardings(batch_shape["ptx"])}
  step = state_lib.compile_step(step_fn, shardings, batch_shardings, None, ctx.mesh)

  evaluator = evaluation.PolicyEvaluator(ctx)
  baseline_gold = evaluation.load_gold(ctx, cfg.reference)

  def evaluate(state, step_number):
    result = evaluator.evaluate(state.params["policy"], reference=reference, reward=scorer,
                                baseline_gold=baseline_gold)
    if step_number == cfg.iterations:
      evaluation.save_gold(ctx, instance.name, result.gold)
    return result.metrics

  state, last_eval = run_loop(ctx, instance.name, state, shardings, step, make_batch, cfg.iterations, cfg,
                              evaluate=evaluate, per_step_metrics=("rollout/",) if fused else ())
  ctx.save_params(instance.name, state.params["policy"], {"kl_coef": float(state.scalars["kl_coef"])})
  return {**last_eval, "ppo/kl_coef": float(state.scalars["kl_coef"])}
