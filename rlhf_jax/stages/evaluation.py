"""Policy evaluation on held-out prompts: gold reward, RM reward, KL to a reference, win rate, LM loss.

Every policy is sampled on the same held-out prompts with the same key, so
win rates are paired per prompt. The settings (``config.evaluation``) are
shared by every evaluation of a run (in-loop and the eval stage) so their
numbers are comparable. The gold score is the task's hidden one and is read
here only, never by a training path.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable

import jax
import numpy as np
from etils import epath
from flax import nnx
from ml_collections import ConfigDict

from rlhf_jax.algorithms.lm import make_lm_eval
from rlhf_jax.atomic_file import write_atomic
from rlhf_jax.config_groups import sampling_config
from rlhf_jax.data import batching, bucketing
from rlhf_jax.data.loader import BatchLoader
from rlhf_jax.generate import SamplingConfig
from rlhf_jax.rollout import Rollout, make_rollout_fn, response_log_probs, response_texts
from rlhf_jax.scoring import GoldScorer, RewardModelScorer
from rlhf_jax.stages.context import StageContext


def evaluation_config() -> ConfigDict:
  """``config.evaluation``: how every policy of a run is evaluated (in-loop and by eval instances)."""
  return ConfigDict(dict(num_prompts=128, sampling=sampling_config(), lm_loss_batches=4, batch_size=64))


@functools.lru_cache(maxsize=16)
def log_ratio_fn(graphdef: nnx.GraphDef, sampling: SamplingConfig) -> Callable:
  """Jitted ``log_ratio(params, reference, rollout) -> [B]``: each row's summed log-ratio log pi - log pi_ref
  over its response tokens (the sequence KL sample); one per model shape and sampler in a process (every
  stage's evaluation, and rft's rounds, reuse it)."""
  return jax.jit(lambda p, ref, r: (response_log_probs(graphdef, p, r, sampling)[0]
                                    - response_log_probs(graphdef, ref, r, sampling)[0]).sum(axis=1))


class PolicyEvaluator:
  """Samples a policy on held-out prompts and scores what it wrote."""

  def __init__(self, ctx: StageContext):
    self.ctx = ctx
    cfg = ctx.config.evaluation
    prompts = [r["prompt"] for r in ctx.records("prompts", "test")]
    self.prompts = prompts[: cfg.num_prompts]
    batch, _ = batching.prompt_batch(ctx.tokenizer, self.prompts, ctx.config.data.prompt_len)
    batch = bucketing.trim_prompts(batch, ctx.config.data.min_bucket_len)
    # Padded to fit the mesh; every metric reads the real rows (``valid``) only.
    self.prompt = ctx.put({**batch, "group": np.arange(len(self.prompts), dtype=np.int32)}, with_valid=True)
    self.group = self.prompt["group"]
    self.valid = ctx.host(self.prompt["valid"]).astype(bool)
    self.sampling = ctx.sampling(cfg)
    graphdef = ctx.graphdef("lm")
    self.rollout_fn = make_rollout_fn(graphdef, self.sampling, layout=ctx.decode_layout)
    self.kl_fn = log_ratio_fn(graphdef, self.sampling)
    self.key = ctx.key("eval")
    self.lm_eval = make_lm_eval(graphdef)
    self.gold = GoldScorer(ctx.task)

  def rollout(self, params) -> tuple[Rollout, list[str]]:
    """The policy's held-out rollout (same prompts and key for every policy; padded rows included) and the
    decoded responses of the real rows."""
    rollout = self.rollout_fn(params, self.prompt["tokens"], self.prompt["mask"], self.group, self.key)
    return rollout, [r for r, v in zip(response_texts(self.ctx.tokenizer, rollout), self.valid) if v]

  def lm_loss(self, params) -> float:
    """Mean next-token loss on held-out pretraining text (the alignment tax)."""
    ctx = self.ctx
    texts = ctx.records("pretraining", "test")
    size = ctx.config.evaluation.batch_size
    loader = BatchLoader(len(texts), min(size, len(texts)), seed=0, shuffle=False)
    total, count = 0.0, 0.0
    for step in range(min(ctx.config.evaluation.lm_loss_batches, loader.steps_per_epoch)):
      batch, _ = batching.lm_batch(ctx.tokenizer, [texts[int(i)]["text"] for i in loader.indices_for_step(step)],
                                   ctx.config.data.seq_len)
      s, n = self.lm_eval(params, ctx.put(bucketing.trim_texts(batch, ctx.config.data.min_bucket_len)))
      total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)

  def evaluate(self, params, reference=None, reward: RewardModelScorer | None = None,
               baseline_gold: np.ndarray | None = None, with_lm_loss: bool = True) -> "Evaluation":
    """Eval metrics of a policy and its per-prompt responses and scores.

    reference: params of the reference policy (for ``eval/kl``, the same log-prob definition as
    training's KL); reward: the reward-model scorer; baseline_gold: per-prompt gold scores of the
    baseline policy (for ``eval/win_rate_vs_sft``).
    """
    rollout, responses = self.rollout(params)
    real = lambda x: self.ctx.real_rows(x, self.valid)  # noqa: E731
    gold = self.gold(None, self.prompts, responses)
    metrics = {"eval/gold_reward": float(gold.mean()),
               "eval/response_length": float(real(rollout.response_mask).sum(1).mean())}
    rm = None
    if reference is not None:
      metrics["eval/kl"] = float(real(self.kl_fn(params, reference, rollout)).mean())
    if reward is not None:
      rm = real(reward(rollout))
      metrics["eval/rm_reward"] = float(rm.mean())
    if baseline_gold is not None:
      wins = (gold > baseline_gold) + 0.5 * (gold == baseline_gold)
      metrics["eval/win_rate_vs_sft"] = float(wins.mean())
    if with_lm_loss:
      metrics["eval/lm_loss"] = self.lm_loss(params)
    return Evaluation(metrics, responses, gold, rm)


@dataclasses.dataclass
class Evaluation:
  """One policy's evaluation: metrics, responses, per-prompt gold scores [P] and RM scores [P] (or None)."""

  metrics: dict[str, float]
  responses: list[str]
  gold: np.ndarray
  rm: np.ndarray | None


def save_gold(ctx: StageContext, instance: str, gold: np.ndarray) -> None:
  """Keeps a policy's per-prompt held-out gold scores (the baseline for win rates)."""
  if ctx.is_primary:
    write_atomic(os.path.join(ctx.stage_dir(instance), "eval_gold.json"), json.dumps([float(g) for g in gold]))


def load_gold(ctx: StageContext, instance: str) -> np.ndarray | None:
  path = epath.Path(ctx.stage_dir(instance), "eval_gold.json")
  if not path.is_file():
    return None
  return np.asarray(json.loads(path.read_text()), np.float32)


def reward_scorer(ctx: StageContext, instance: str) -> RewardModelScorer:
  """The scorer of a trained (normalised) reward-model instance."""
  params, _ = ctx.load_params(instance, "scalar")
  return RewardModelScorer(ctx.graphdef("scalar"), params)


def maybe_reward_scorer(ctx: StageContext, instance: str) -> Any:
  """``reward_scorer`` if ``instance`` is set and has finished, else None."""
  if instance and epath.Path(ctx.stage_dir(instance), "params").is_dir():
    return reward_scorer(ctx, instance)
  return None
