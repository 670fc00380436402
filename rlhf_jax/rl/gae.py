"""Per-token rewards and generalised advantage estimation (pure, jit-able).

Tensors are per response token, [B, R], with a right-padded `response_mask`
(1 for real tokens). Each response is one episode that ends after its last
real token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def per_token_rewards(
    score: jax.Array,
    kl_per_token: jax.Array,
    response_mask: jax.Array,
    beta: ArrayLike,
) -> jax.Array:
  """Reward per response token: KL penalty everywhere, score at the end.

  Args:
    score: [B] sequence-level reward (e.g. normalised reward-model output).
    kl_per_token: [B, R] per-token KL estimate to the reference policy.
    response_mask: [B, R], right-padded, 1 for real tokens.
    beta: scalar KL coefficient.

  Returns:
    [B, R] float32: -beta * kl at every real token, plus `score` at the last
    real token; 0 at padding (rows without real tokens get no score).
  """
  mask = response_mask.astype(jnp.float32)
  rewards = -beta * kl_per_token.astype(jnp.float32) * mask
  last = mask.sum(axis=-1).astype(jnp.int32) - 1
  # one_hot of -1 is all zeros, so empty responses receive no score.
  at_last = jax.nn.one_hot(last, mask.shape[-1], dtype=jnp.float32)
  return rewards + score.astype(jnp.float32)[:, None] * at_last


def gae_advantages(
    rewards: jax.Array,
    values: jax.Array,
    response_mask: jax.Array,
    gamma: ArrayLike,
    lam: ArrayLike,
) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation over response tokens.

  delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam *
  A_{t+1}, with V and A taken as 0 after the last real token.

  Args:
    rewards: [B, R] per-token rewards.
    values: [B, R] value estimates V_t of the state before token t.
    response_mask: [B, R], right-padded, 1 for real tokens.
    gamma: discount.
    lam: GAE lambda.

  Returns:
    (advantages, returns), both [B, R] float32 with returns = advantages +
    values; both 0 at padding.
  """
  mask = response_mask.astype(jnp.float32)
  rewards = rewards.astype(jnp.float32) * mask
  values = values.astype(jnp.float32) * mask

  def step(carry, inputs):
    next_value, next_adv = carry
    r, v, m = inputs
    delta = r + gamma * next_value - v
    adv = (delta + gamma * lam * next_adv) * m
    return (v, adv), adv

  batch = rewards.shape[0]
  init = (jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.float32))
  # Scan runs over time, so put the token axis first.
  _, adv_t = jax.lax.scan(step, init, (rewards.T, values.T, mask.T), reverse=True)
  advantages = adv_t.T
  return advantages, (advantages + values) * mask
