"""reward stage: a reward model on K-wise rankings (InstructGPT) or on direct scores.

Inputs: ``init_from`` (a policy's trunk with a fresh head, or a reward instance
to continue), ``comparisons`` (label instances; an iterated round trains on old
+ new comparisons), ``reference`` (the policy whose samples define the
normalisation: after training, a gain and bias folded into the head make them
score mean 0, std 1; ``normalize``: gain_bias, bias or none).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np

from rlhf_jax import compute, losses, state as state_lib
from rlhf_jax.algorithms.reward import (LOSSES, NORMALIZATIONS, comparison_rewards, fold_normalisation,
                                        make_reward_step)
from rlhf_jax.data import batching, bucketing, packing
from rlhf_jax.models import hf as hf_models, reward_head_std
from rlhf_jax.rollout import make_rollout_fn
from rlhf_jax.scoring import RewardModelScorer, reward_scores
from rlhf_jax.stages.context import StageContext, StageError
from rlhf_jax.stages.graph import KINDS, REWARD
from rlhf_jax.stages.loop import run_loop, step_counts, truncation_metrics
from rlhf_jax.tasks import pairwise_agreement, score_agreement


def init_reward_params(ctx: StageContext, instance) -> dict:
  """Scalar-model params: continue a reward instance, or a policy's trunk with a fresh head, or random.

  ``init_from`` "hf:PATH": a sequence-classification checkpoint is continued; a causal LM gives its trunk."""
  cfg = instance.section
  source = cfg.init_from
  external = hf_models.hf_path(source)
  continues = hf_models.is_reward_checkpoint(external) if external else (
      bool(source) and KINDS[ctx.config[source].kind].produces == REWARD)
  if continues:
    return ctx.load_params(source, "scalar")[0]
  std = cfg.head_std if cfg.head_std >= 0 else reward_head_std(ctx.model_config)
  _, params, _ = ctx.init_model("scalar", ctx.key("init/reward", instance.name), head_std=std)
  if source:
    params["trunk"] = ctx.load_params(source, "lm")[0]["trunk"]
  return params


def run(ctx: StageContext, instance) -> dict[str, float]:
  cfg = instance.section
  data = ctx.config.data
  tok = ctx.tokenizer
  if cfg.loss not in LOSSES:
    raise StageError(f"{instance.name}.loss must be one of {LOSSES}, got {cfg.loss!r}")
  if cfg.normalize not in NORMALIZATIONS:
    raise StageError(f"{instance.name}.normalize must be one of {NORMALIZATIONS}, got {cfg.normalize!r}")
  kind = "comparisons" if cfg.loss == "ranking" else "scored"
  if kind == "comparisons":
    train, test = ctx.comparisons(cfg.comparisons, "train"), ctx.comparisons(cfg.comparisons, "test")
  else:
    train, test = ctx.records(kind, "train"), ctx.records(kind, "test")
  max_k = max(len(train[i]["responses"]) for i in range(len(train))) if kind == "comparisons" else 1
  if kind == "comparisons":
    max_k = max([max_k] + [len(test[i]["responses"]) for i in range(len(test))])
  graphdef = ctx.graphdef("scalar")
  params = init_reward_params(ctx, instance)
  tx = state_lib.make_optimizer(cfg.optimizer, cfg.steps)
  state, shardings = state_lib.create_train_state({"reward": params}, {"reward": tx},
                                                  {"reward": ctx.param_shardings("scalar")}, ctx.mesh,
                                                  seed=ctx.config.seed)
  loader = ctx.loader(train, cfg.batch_size)

  def to_batch(rows):
    if kind == "comparisons":
      batch, stats = batching.comparison_batch(tok, [r["prompt"] for r in rows], [r["responses"] for r in rows],
                                               [r["ranking"] for r in rows], data.prompt_len, data.response_len,
                                               max_k)
    else:
      batch, stats = batching.scored_batch(tok, [r["prompt"] for r in rows], [r["response"] for r in rows],
                                           [r["score"] for r in rows], data.prompt_len, data.response_len)
    return bucketing.trim_pairs(batch, data.prompt_len, data.min_bucket_len), stats

  def host_batch(step):
    batch, stats = to_batch([train[int(i)] for i in loader.indices_for_step(step)])
    if cfg.pack_width:
      try:
        return packing.comparison_training_rows(batch, cfg.pack_width, tok.pad_id, data.min_bucket_len), stats
      except ValueError as e:
        raise StageError(f"{instance.name}.pack_width: {e}") from e
    return batch, stats

  def make_batch(step, state):
    del state
    batch, stats = host_batch(step)
    if kind == "comparisons" and not cfg.pack_width:  # an example's prompt is computed once when shared
      shared = batching.comparison_shared_prefix(batch)
      fill = packing.comparison_fill(batch, shared[0] if shared else 0)
    else:
      fill = packing.fill(batch)
    return ctx.put(batch), {**truncation_metrics(stats), "data/fill": fill,
                            **step_counts(ctx.model_config, batch, lm_head=False).metrics()}

  step_fn = make_reward_step(graphdef, tx, cfg.loss, cfg.margin, use_dropout=ctx.config.model.dropout > 0,
                             mesh=ctx.mesh, rules=ctx.rules)
  step = state_lib.compile_step(step_fn, shardings, ctx.batch_shardings(host_batch(0)[0]), None, ctx.mesh)
  score_test = make_test_scorer(ctx, graphdef, test, to_batch, kind)
  state, last_eval = run_loop(ctx, instance.name, state, shardings, step, make_batch, cfg.steps, cfg,
                              evaluate=lambda s, _: score_test(s.params["reward"]))
  params = state.params["reward"]
  gain, bias, counts = normalisation(ctx, instance, graphdef, params)
  params = fold_normalisation(params, gain, bias)
  ctx.save_params(instance.name, params, {"gain": gain, "bias": bias})
  totals = {k: last_eval.get(k, 0.0) + v for k, v in counts.metrics().items()}
  return {**last_eval, **totals, "reward/gain": gain, "reward/bias": bias}


# Host-side uses of the loss maths, each one compiled program (eagerly every jnp op compiles its own).
_ranking_accuracy = jax.jit(lambda rewards, ranks, mask: losses.ranking_loss(rewards, ranks, mask)[1]["accuracy"])
_reward_normalisation = jax.jit(losses.reward_normalisation, static_argnames="bias_only")


# One per model shape in a process: the reward instances of an iterated run share their compiled programs.
@functools.lru_cache(maxsize=16)
def _comparison_scorer(graphdef) -> Callable:
  return jax.jit(lambda p, b: comparison_rewards(graphdef, p, b))


@functools.lru_cache(maxsize=16)
def _response_scorer(graphdef) -> Callable:
  return jax.jit(lambda p, b: reward_scores(graphdef, p, b["tokens"], b["mask"]))


def make_test_scorer(ctx, graphdef, test, to_batch, kind):
  """``f(params) -> eval metrics`` on held-out data: pairwise accuracy against labels and against gold.

  The held-out rows are padded to fit the mesh; every metric reads the real rows only."""
  rows = [test[i] for i in range(len(test))]
  host, _ = to_batch(rows)
  batch = ctx.put(host, with_valid=True)
  valid = batch.pop("valid")
  if kind == "comparisons":
    score = _comparison_scorer(graphdef)
    gold = [ctx.task.gold_scores([r["prompt"]] * len(r["responses"]), r["responses"]) for r in rows]
    labeler_vs_gold = pairwise_agreement(gold, [r["ranking"] for r in rows])

    def evaluate(params):
      rewards = ctx.real_rows(score(params, batch), valid)
      predicted = [rewards[i, :len(r["responses"])] for i, r in enumerate(rows)]
      return {"eval/rm_accuracy": float(_ranking_accuracy(rewards, host["ranks"], host["response_mask"])),
              "eval/rm_gold_accuracy": score_agreement(gold, predicted),
              "eval/labeler_gold_agreement": float(labeler_vs_gold)}
    return evaluate
  score = _response_scorer(graphdef)

  def evaluate(params):
    rewards = ctx.real_rows(score(params, batch), valid)
    return {"eval/rm_score_corr": float(np.corrcoef(rewards, host["score"])[0, 1])}
  return evaluate


def normalisation(ctx: StageContext, instance, graphdef, params) -> tuple[float, float, compute.Counts]:
  """(gain, bias) making the reference policy's responses score mean 0, std 1 on train prompts, and the
  compute of sampling and scoring them."""
  cfg = instance.section
  if cfg.normalize == "none":
    return 1.0, 0.0, compute.Counts()
  reference, _ = ctx.load_params(cfg.reference, "lm")
  prompts = [r["prompt"] for r in ctx.records("prompts", "train")][: cfg.normalize_samples]
  batch, _ = batching.prompt_batch(ctx.tokenizer, prompts, ctx.config.data.prompt_len)
  batch = bucketing.trim_prompts(batch, ctx.config.data.min_bucket_len)
  batch = ctx.put({**batch, "group": np.arange(len(prompts), dtype=np.int32)}, with_valid=True)
  # The reference policy's samples as the label stage draws them.
  labels = [ctx.config[n] for n in (cfg.comparisons or ()) if n in ctx.config and "sampling" in ctx.config[n]]
  sampling = ctx.sampling(labels[0]) if labels else ctx.sampling(ctx.config.evaluation)
  rollout_fn = make_rollout_fn(ctx.graphdef("lm"), sampling, layout=ctx.decode_layout)
  rollout = rollout_fn(reference, batch["tokens"], batch["mask"], batch["group"], ctx.key("reward/normalize", instance.name))
  rewards = ctx.real_rows(RewardModelScorer(graphdef, params)(rollout), batch["valid"])
  gain, bias = _reward_normalisation(rewards, bias_only=cfg.normalize == "bias")
  real = ctx.host(batch["valid"]).astype(bool)
  counts = compute.rollout_counts(ctx.model_config, len(real), rollout.prompt_len,
                                  ctx.host(rollout.response_mask).sum(axis=1)[real], rollout.response_len,
                                  samples=int(real.sum()))
  counts.flops += compute.sequence_flops(ctx.model_config, len(real), rollout.prompt_len + rollout.response_len,
                                         lm_head=False)
  return float(gain), float(bias), counts
