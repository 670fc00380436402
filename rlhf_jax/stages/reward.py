"""reward stage: a reward model on K-wise rankings (InstructGPT) or on direct scores.

The RM is the policy trunk plus a scalar head, initialised from the SFT (or
pretrained) trunk. Ranking loss: all C(K,2) pairs of one prompt in one batch
element, one forward pass per response. After training the RM is normalised
with a gain and bias (folded into its head) so that the reference policy's
responses score mean 0 and std 1 (``reward.normalize``: gain_bias, bias or none).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rlhf_jax import losses, state as state_lib
from rlhf_jax.data import batching
from rlhf_jax.generate import make_sampler
from rlhf_jax.models import reward_head_std
from rlhf_jax.stages import evaluation
from rlhf_jax.stages.context import INIT_STREAM, StageContext, StageError
from rlhf_jax.stages.loop import run_loop, truncation_metrics
from rlhf_jax.state import TrainState, step_key
from rlhf_jax.tasks import pairwise_agreement

NORMALIZE_STREAM = 47


def comparison_rewards(graphdef, params, batch, dropout_key=None) -> jax.Array:
  """RM scores [B, K] of a comparison batch (tokens [B, K, T]); one forward pass per response."""
  b, k, t = batch["tokens"].shape
  model = nnx.merge(graphdef, params)
  return model(batch["tokens"].reshape(b * k, t), batch["mask"].reshape(b * k, t), dropout_key).reshape(b, k)


def make_reward_step(graphdef, optimizer, loss_kind: str, margin: float, use_dropout: bool = False):
  """``step(state, batch, frozen) -> (state, metrics)`` for ``state.params["reward"]``."""

  def objective(params, batch, key):
    if loss_kind == "ranking":
      rewards = comparison_rewards(graphdef, params, batch, key)
      loss, aux = losses.ranking_loss(rewards, batch["ranks"], batch["response_mask"], margin)
      return loss, {"train/loss": loss, "train/accuracy": aux["accuracy"], "train/reward_gap": aux["reward_gap"]}
    rewards = nnx.merge(graphdef, params)(batch["tokens"], batch["mask"], key)
    kind = "sigmoid_mse" if loss_kind == "direct_sigmoid" else "mse"
    loss = losses.direct_score_loss(rewards, batch["score"], kind)
    return loss, {"train/loss": loss}

  def step(state: TrainState, batch, frozen):
    del frozen
    key = step_key(state) if use_dropout else None
    (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params["reward"], batch, key)
    updates, opt_state = optimizer.update(grads, state.opt_state["reward"], state.params["reward"])
    metrics["train/grad_norm"] = optax.global_norm(grads)
    return state.replace(step=state.step + 1, params={"reward": optax.apply_updates(state.params["reward"], updates)},
                         opt_state={"reward": opt_state}), metrics

  return step


def init_reward_params(ctx: StageContext) -> dict:
  """Scalar model params: the trunk from ``reward.init_from`` (or random), a fresh head."""
  cfg = ctx.config.reward
  std = cfg.head_std if cfg.head_std >= 0 else reward_head_std(ctx.model_config)
  _, params, _ = ctx.init_model("scalar", ctx.key(INIT_STREAM + 1), head_std=std)
  if cfg.init_from:
    lm_params, _ = ctx.load_params(cfg.init_from, "lm")
    params["trunk"] = lm_params["trunk"]
  return params


def fold_normalisation(params: dict, gain: float, bias: float) -> dict:
  """Head params such that the model outputs ``gain * r + bias``."""
  return {**params, "head": params["head"] * gain, "head_bias": params["head_bias"] * gain + bias}


def run(ctx: StageContext) -> dict[str, float]:
  cfg = ctx.config.reward
  data = ctx.config.data
  tok = ctx.tokenizer
  if cfg.loss not in ("ranking", "direct_sigmoid", "direct_mse"):
    raise StageError(f"reward.loss must be ranking, direct_sigmoid or direct_mse, got {cfg.loss!r}")
  kind = "comparisons" if cfg.loss == "ranking" else "scored"
  train, test = ctx.records(kind, "train"), ctx.records(kind, "test")
  max_k = max(len(r["responses"]) for r in list(train) + list(test)) if kind == "comparisons" else 1
  graphdef = ctx.graphdef("scalar")
  params = init_reward_params(ctx)
  tx = state_lib.make_optimizer(cfg.optimizer, cfg.steps)
  state, shardings = state_lib.create_train_state({"reward": params}, {"reward": tx},
                                                  {"reward": ctx.param_shardings("scalar")}, ctx.mesh,
                                                  seed=ctx.config.seed)
  loader = ctx.loader(train, cfg.batch_size)

  def to_batch(rows):
    if kind == "comparisons":
      return batching.comparison_batch(tok, [r["prompt"] for r in rows], [r["responses"] for r in rows],
                                       [r["ranking"] for r in rows], data.prompt_len, data.response_len, max_k)
    return batching.scored_batch(tok, [r["prompt"] for r in rows], [r["response"] for r in rows],
                                 [r["score"] for r in rows], data.prompt_len, data.response_len)

  def host_batch(step):
    return to_batch([train[int(i)] for i in loader.indices_for_step(step)])

  def make_batch(step, state):
    del state
    batch, stats = host_batch(step)
    return ctx.put(batch), truncation_metrics(stats)

  step = state_lib.compile_step(make_reward_step(graphdef, tx, cfg.loss, cfg.margin), shardings,
                                ctx.batch_shardings(host_batch(0)[0]), None, ctx.mesh)
  score_test = make_test_scorer(ctx, graphdef, test, to_batch, kind)
  state, last_eval = run_loop(ctx, "reward", state, shardings, step, make_batch, cfg.steps, cfg,
                              evaluate=lambda s, _: score_test(s.params["reward"]))
  params = state.params["reward"]
  gain, bias = normalisation(ctx, graphdef, params)
  params = fold_normalisation(params, gain, bias)
  ctx.save_params("reward", params, {"gain": gain, "bias": bias})
  return {**last_eval, "reward/gain": gain, "reward/bias": bias}


def make_test_scorer(ctx, graphdef, test, to_batch, kind):
  """``f(params) -> eval metrics`` on held-out data: pairwise accuracy against labels and against gold."""
  rows = [test[i] for i in range(len(test))]
  batch, _ = to_batch(rows)
  batch = ctx.put(batch)
  if kind == "comparisons":
    score = jax.jit(lambda p, b: comparison_rewards(graphdef, p, b))
    gold = [ctx.task.gold_scores([r["prompt"]] * len(r["responses"]), r["responses"]) for r in rows]
    labeler_vs_gold = pairwise_agreement(gold, [r["ranking"] for r in rows])

    def evaluate(params):
      rewards = np.asarray(score(params, batch))
      rm_rankings = [list(np.argsort(-rewards[i, :len(r["responses"])], kind="stable")) for i, r in enumerate(rows)]
      _, aux = losses.ranking_loss(jnp.asarray(rewards), batch["ranks"], batch["response_mask"])
      return {"eval/rm_accuracy": float(aux["accuracy"]),
              "eval/rm_gold_accuracy": float(pairwise_agreement(gold, rm_rankings)),
              "eval/labeler_gold_agreement": float(labeler_vs_gold)}
    return evaluate
  score = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b["tokens"], b["mask"]))

  def evaluate(params):
    rewards = np.asarray(score(params, batch))
    target = np.asarray(batch["score"])
    return {"eval/rm_score_corr": float(np.corrcoef(rewards, target)[0, 1])}
  return evaluate


def normalisation(ctx: StageContext, graphdef, params) -> tuple[float, float]:
  """(gain, bias) making the reference (SFT) policy's responses score mean 0, std 1 on train prompts."""
  cfg = ctx.config.reward
  if cfg.normalize == "none":
    return 1.0, 0.0
  if cfg.normalize not in ("gain_bias", "bias"):
    raise StageError(f"reward.normalize must be gain_bias, bias or none, got {cfg.normalize!r}")
  reference, _ = ctx.load_params("sft", "lm")
  prompts = [r["prompt"] for r in ctx.records("prompts", "train")][: cfg.normalize_samples]
  batch, _ = batching.prompt_batch(ctx.tokenizer, prompts, ctx.config.data.prompt_len)
  batch = ctx.put(batch)
  sampler = make_sampler(ctx.graphdef("lm"), evaluation.sampling_config(ctx, ctx.config.label))
  sample = sampler(reference, batch["tokens"], batch["mask"],
                   ctx.key(NORMALIZE_STREAM))
  tokens = jnp.concatenate([batch["tokens"], sample.tokens], axis=1)
  mask = jnp.concatenate([batch["mask"], sample.mask], axis=1)
  rewards = evaluation.make_reward_fn(graphdef)(params, tokens, mask)
  gain, bias = losses.reward_normalisation(rewards, bias_only=cfg.normalize == "bias")
  return float(gain), float(bias)
