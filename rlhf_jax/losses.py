"""Supervised and reward-model losses (pure, jit-able).

Sequence convention: `tokens` [B, T] int32 and `loss_mask` [B, T] float32,
where loss_mask[:, t] = 1 means tokens[:, t] is a target predicted from
tokens[:, :t], i.e. by logits[:, t - 1]. loss_mask[:, 0] is always 0.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def token_log_probs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Log-probability of each token given the tokens before it.

  Args:
    logits: [B, T, V], any float dtype; logits[:, t] is the distribution of
      tokens[:, t + 1].
    tokens: [B, T] int.

  Returns:
    [B, T] float32 in nats; entry t is log p(tokens[t] | tokens[:t]); entry 0
    (no context) is 0.
  """
  # Upcast before normalising: bf16 log_softmax loses ~2 digits per token.
  logits = logits.astype(jnp.float32)
  # Shift the [B, T] targets and results rather than slicing the [B, T, V] logits (a full copy, forward and
  # backward); the last column's normaliser is computed and dropped.
  targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  # picked - logsumexp == log_softmax gathered, without an extra [B, T, V] array.
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  logp = picked - jax.nn.logsumexp(logits, axis=-1)
  return jnp.pad(logp[:, :-1], ((0, 0), (1, 0)))


def next_token_loss(
    logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Mean next-token cross-entropy over target tokens.

  Args:
    logits: [B, T, V].
    tokens: [B, T] int.
    loss_mask: [B, T]; 1 where tokens[:, t] is a target.

  Returns:
    (loss, num_targets): mean negative log-likelihood in nats per target token
    (0 when there are no targets), and the float32 number of target tokens.
  """
  loss_mask = loss_mask.astype(jnp.float32)
  nll = -token_log_probs(logits, tokens) * loss_mask
  num_targets = loss_mask.sum()
  return nll.sum() / jnp.maximum(num_targets, 1.0), num_targets


def tie_half_correct(margin: jax.Array) -> jax.Array:
  """Per-pair accuracy of a preferred-minus-dispreferred ``margin``: 1 above 0, 0.5 at exactly 0 (the pair is
  not ordered: a coin flip), 0 below; float32, same shape."""
  return jnp.where(margin > 0, 1.0, jnp.where(margin == 0, 0.5, 0.0)).astype(jnp.float32)


def ranking_loss(
    rewards: jax.Array,
    ranks: jax.Array,
    response_mask: jax.Array,
    margin: ArrayLike = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """InstructGPT K-wise ranking loss for a reward model.

  For each prompt b, every pair (w, l) of its real responses with
  ranks[b, w] < ranks[b, l] (w better) contributes
  -log sigmoid(r_w - r_l - margin). Pairs are weighted 1 / (number of pairs of
  that prompt), which is 1 / C(K_b, 2) without ties, so every prompt counts
  equally; the loss is the mean over prompts that have at least one pair.
  Equal ranks (ties) and padded responses form no pair.

  Args:
    rewards: [B, K] scalar rewards.
    ranks: [B, K] int, 0 = best.
    response_mask: [B, K], 1 for real responses.
    margin: scalar, [B] (per prompt) or [B, K, K] (margin[b, w, l] per pair).

  Returns:
    (loss, metrics) with metrics `accuracy` (weighted fraction of pairs with
    r_w > r_l; a pair with r_w == r_l counts half, a coin flip, so an untrained
    model reads 0.5 rather than 0), `reward_gap` (weighted mean r_w - r_l) and `num_pairs` (total
    pairs in the batch).
  """
  rewards = rewards.astype(jnp.float32)
  margin = jnp.asarray(margin, jnp.float32)
  if margin.ndim == 1:
    margin = margin[:, None, None]
  real = response_mask.astype(bool)
  # pair[b, w, l]: w is strictly better than l, both real.
  pair = (ranks[:, :, None] < ranks[:, None, :]) & real[:, :, None] & real[:, None, :]
  pair = pair.astype(jnp.float32)
  pairs_per_prompt = pair.sum(axis=(1, 2))
  has_pairs = (pairs_per_prompt > 0).astype(jnp.float32)
  weight = pair * (has_pairs / jnp.maximum(pairs_per_prompt, 1.0))[:, None, None]
  num_prompts = jnp.maximum(has_pairs.sum(), 1.0)

  gap = rewards[:, :, None] - rewards[:, None, :]
  pair_loss = -jax.nn.log_sigmoid(gap - margin)

  def weighted_mean(x):
    return (x * weight).sum() / num_prompts

  metrics = {
      "accuracy": weighted_mean(tie_half_correct(gap)),
      "reward_gap": weighted_mean(gap),
      "num_pairs": pairs_per_prompt.sum(),
  }
  return weighted_mean(pair_loss), metrics


def direct_score_loss(
    rewards: jax.Array,
    scores: jax.Array,
    kind: Literal["sigmoid_mse", "mse"] = "sigmoid_mse",
    weights: jax.Array | None = None,
) -> jax.Array:
  """Regression of rewards onto labelled scores, mean over the batch.

  Args:
    rewards: [B] reward-model outputs (logits for `sigmoid_mse`).
    scores: [B] labelled scores (in [0, 1] for `sigmoid_mse`).
    kind: `sigmoid_mse` regresses sigmoid(r) to the score, `mse` regresses r.
      Static under jit.
    weights: [B] (optional) 1 on real examples, 0 on empty slots (packed batches): the mean is over the
      real examples only.

  Returns:
    Scalar mean squared error.
  """
  rewards = rewards.astype(jnp.float32)
  if kind == "sigmoid_mse":
    pred = jax.nn.sigmoid(rewards)
  elif kind == "mse":
    pred = rewards
  else:
    raise ValueError(f"unknown direct score loss kind: {kind!r}")
  error = (pred - scores.astype(jnp.float32)) ** 2
  if weights is None:
    return jnp.mean(error)
  weights = weights.astype(jnp.float32)
  return jnp.sum(error * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def reward_normalisation(
    rewards: jax.Array, bias_only: bool = False
) -> tuple[jax.Array, jax.Array]:
  """Gain and bias that standardise rewards of reference samples.

  Args:
    rewards: [N] rewards of reference samples (e.g. SFT policy outputs).
    bias_only: if True, gain is 1 and only the mean is removed. Static.

  Returns:
    (gain, bias) scalars such that gain * r + bias has mean 0 and (population)
    std 1 on `rewards` (std untouched when bias_only).
  """
  rewards = rewards.astype(jnp.float32)
  mean = rewards.mean()
  if bias_only:
    gain = jnp.ones((), jnp.float32)
  else:
    gain = jax.lax.rsqrt(rewards.var() + 1e-8)
  return gain, -gain * mean
