"""Policy evaluation on held-out prompts: gold reward, RM reward, KL to a reference, win rate, LM loss.

Every policy is sampled on the same held-out prompts with the same key, so
win rates are paired per prompt. The gold score is the task's hidden one and
is read here only, never by a training path.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import losses
from rlhf_jax.atomic_file import write_atomic
from rlhf_jax.data import batching
from rlhf_jax.data.loader import BatchLoader
from rlhf_jax.generate import Sample, SamplingConfig, make_sampler
from rlhf_jax.models import Decoder
from rlhf_jax.stages.context import StageContext
from rlhf_jax.stages.lm import make_lm_eval

EVAL_STREAM = 7919  # fixed key stream for evaluation samples


def sampling_config(ctx: StageContext, section) -> SamplingConfig:
  """A ``SamplingConfig`` from a config section's ``sampling`` group and the tokenizer's ids."""
  s = section.sampling
  return SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                        greedy=s.greedy, stop_at_eos=s.stop_at_eos, eos_id=ctx.tokenizer.eos_id,
                        pad_id=ctx.tokenizer.pad_id)


def decode_responses(ctx: StageContext, sample: Sample) -> list[str]:
  """Response texts of a sample (EOS and padding dropped)."""
  tokens, mask = np.asarray(sample.tokens), np.asarray(sample.mask)
  return [ctx.tokenizer.decode([int(t) for t, m in zip(row, row_mask) if m]) for row, row_mask in zip(tokens, mask)]


def make_sequence_log_probs(graphdef: nnx.GraphDef, prompt_len: int):
  """Jitted ``f(params, tokens, mask) -> [B, N]`` model log-probs (temperature 1) of the response part."""

  @jax.jit
  def sequence_log_probs(params, tokens, mask):
    model: Decoder = nnx.merge(graphdef, params)
    logits, _ = model(tokens, mask)
    return losses.token_log_probs(logits, tokens)[:, prompt_len:] * mask[:, prompt_len:]

  return sequence_log_probs


def make_reward_fn(graphdef: nnx.GraphDef):
  """Jitted ``f(params, tokens, mask) -> [B]`` reward-model scores."""
  return jax.jit(lambda params, tokens, mask: nnx.merge(graphdef, params)(tokens, mask))


class PolicyEvaluator:
  """Samples a policy on held-out prompts and scores what it wrote."""

  def __init__(self, ctx: StageContext):
    self.ctx = ctx
    cfg = ctx.config
    prompts = [r["prompt"] for r in ctx.records("prompts", "test")]
    self.prompts = prompts[: cfg.eval.num_prompts]
    batch, _ = batching.prompt_batch(ctx.tokenizer, self.prompts, cfg.data.prompt_len)
    self.prompt = ctx.put(batch)
    self.sampling = sampling_config(ctx, cfg.eval)
    graphdef = ctx.graphdef("lm")
    self.graphdef = graphdef
    self.sample = make_sampler(graphdef, self.sampling)
    self.log_probs = make_sequence_log_probs(graphdef, cfg.data.prompt_len)
    self.key = ctx.key(EVAL_STREAM)
    self.lm_eval = make_lm_eval(graphdef)

  def generate(self, params) -> tuple[Sample, list[str], jax.Array, jax.Array]:
    sample = self.sample(params, self.prompt["tokens"], self.prompt["mask"], self.key)
    tokens = jnp.concatenate([self.prompt["tokens"], sample.tokens], axis=1)
    mask = jnp.concatenate([self.prompt["mask"], sample.mask], axis=1)
    return sample, decode_responses(self.ctx, sample), tokens, mask

  def lm_loss(self, params) -> float:
    """Mean next-token loss on held-out pretraining text (the alignment tax)."""
    ctx = self.ctx
    texts = ctx.records("pretraining", "test")
    size = ctx.config.eval.batch_size
    loader = BatchLoader(len(texts), min(size, len(texts)), seed=0, shuffle=False)
    total, count = 0.0, 0.0
    for step in range(min(ctx.config.eval.lm_loss_batches, loader.steps_per_epoch)):
      batch, _ = batching.lm_batch(ctx.tokenizer, [texts[int(i)]["text"] for i in loader.indices_for_step(step)],
                                   ctx.config.data.seq_len)
      s, n = self.lm_eval(params, ctx.put(batch))
      total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)

  def evaluate(self, params, reference=None, reward=None, baseline_gold: np.ndarray | None = None,
               with_lm_loss: bool = True) -> tuple[dict[str, float], np.ndarray]:
    """Eval metrics of a policy -> (metrics, per-prompt gold scores).

    reference: params of the reference policy (for ``eval/kl``); reward: ``(score_fn, params)`` of the
    reward model; baseline_gold: per-prompt gold scores of the SFT policy (for ``eval/win_rate_vs_sft``).
    """
    sample, responses, tokens, mask = self.generate(params)
    gold = self.ctx.task.gold_scores(self.prompts, responses)
    metrics = {"eval/gold_reward": float(gold.mean()),
               "eval/response_length": float(np.asarray(sample.mask).sum(1).mean())}
    if reference is not None:
      kl = (self.log_probs(params, tokens, mask) - self.log_probs(reference, tokens, mask)).sum(1)
      metrics["eval/kl"] = float(kl.mean())
    if reward is not None:
      score_fn, reward_params = reward
      metrics["eval/rm_reward"] = float(score_fn(reward_params, tokens, mask).mean())
    if baseline_gold is not None:
      wins = (gold > baseline_gold) + 0.5 * (gold == baseline_gold)
      metrics["eval/win_rate_vs_sft"] = float(wins.mean())
    if with_lm_loss:
      metrics["eval/lm_loss"] = self.lm_loss(params)
    return metrics, gold


def save_gold(ctx: StageContext, stage: str, gold: np.ndarray) -> None:
  """Keeps a policy's per-prompt held-out gold scores (the baseline for win rates)."""
  if ctx.is_primary:
    write_atomic(os.path.join(ctx.stage_dir(stage), "eval_gold.json"), json.dumps([float(g) for g in gold]))


def load_gold(ctx: StageContext, stage: str) -> np.ndarray | None:
  path = os.path.join(ctx.stage_dir(stage), "eval_gold.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return np.asarray(json.load(f), np.float32)


def reward_model(ctx: StageContext) -> tuple[Any, dict] | None:
  """``(score_fn, params)`` of the trained, normalised reward model, if the reward stage has run."""
  if not os.path.isdir(os.path.join(ctx.stage_dir("reward"), "params")):
    return None
  params, _ = ctx.load_params("reward", "scalar")
  return make_reward_fn(ctx.graphdef("scalar")), params
