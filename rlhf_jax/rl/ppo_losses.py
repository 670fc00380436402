"""PPO policy and value losses and diagnostics (pure, jit-able).

All tensors are per response token, [B, R], averaged over tokens where
`response_mask` is 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from rlhf_jax.rl.kl import kl_k2, kl_k3
from rlhf_jax.rl.whitening import masked_mean, masked_var


def clipped_policy_loss(
    logp_new: jax.Array,
    logp_old: jax.Array,
    advantages: jax.Array,
    response_mask: jax.Array,
    clip_eps: ArrayLike,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO clipped surrogate loss (to minimise).

  Per token, with ratio = exp(logp_new - logp_old):
  max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)), then a masked mean.

  Args:
    logp_new: [B, R] log-probs of sampled tokens under the current policy.
    logp_old: [B, R] log-probs under the policy that sampled them.
    advantages: [B, R] (treated as constants).
    response_mask: [B, R], 1 for real tokens.
    clip_eps: ratio clip range epsilon.

  Returns:
    (loss, metrics): `clip_frac` is the fraction of tokens where the clipped
    term is the active (larger) one; `approx_kl_k3` is the mean of
    k3 = ratio - 1 - log ratio and `approx_kl_k2` the mean of
    0.5 * (logp_new - logp_old)^2, both estimates of KL(old || new).
  """
  logp_new = logp_new.astype(jnp.float32)
  logp_old = logp_old.astype(jnp.float32)
  advantages = jax.lax.stop_gradient(advantages.astype(jnp.float32))
  ratio = jnp.exp(logp_new - logp_old)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = masked_mean(jnp.maximum(unclipped, clipped), response_mask)
  metrics = {
      "clip_frac": masked_mean((clipped > unclipped).astype(jnp.float32), response_mask),
      # Tokens were sampled from the old policy, so it is the estimators'
      # "policy" and the new policy their "reference".
      "approx_kl_k3": masked_mean(kl_k3(logp_old, logp_new), response_mask),
      "approx_kl_k2": masked_mean(kl_k2(logp_old, logp_new), response_mask),
  }
  return loss, metrics


def clipped_value_loss(
    values_new: jax.Array,
    values_old: jax.Array,
    returns: jax.Array,
    response_mask: jax.Array,
    clip_range: ArrayLike,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO clipped value loss.

  Per token: 0.5 * max((v - R)^2, (v_old + clip(v - v_old, -c, c) - R)^2),
  then a masked mean.

  Args:
    values_new: [B, R] current value predictions.
    values_old: [B, R] value predictions at sampling time.
    returns: [B, R] value targets (treated as constants).
    response_mask: [B, R], 1 for real tokens.
    clip_range: c, in reward units.

  Returns:
    (loss, metrics): `value_clip_frac` is the fraction of tokens where the
    clipped error is the active (larger) one.
  """
  values_new = values_new.astype(jnp.float32)
  values_old = values_old.astype(jnp.float32)
  returns = jax.lax.stop_gradient(returns.astype(jnp.float32))
  v_clipped = values_old + jnp.clip(values_new - values_old, -clip_range, clip_range)
  err = (values_new - returns) ** 2
  err_clipped = (v_clipped - returns) ** 2
  loss = 0.5 * masked_mean(jnp.maximum(err, err_clipped), response_mask)
  metrics = {
      "value_clip_frac": masked_mean((err_clipped > err).astype(jnp.float32), response_mask),
  }
  return loss, metrics


def entropy_from_logits(logits: jax.Array, response_mask: jax.Array) -> jax.Array:
  """Mean policy entropy over real response tokens.

  Args:
    logits: [B, R, V], logits[:, r] being the distribution response token r was
      sampled from; computed in float32.
    response_mask: [B, R], 1 for real tokens.

  Returns:
    Scalar entropy in nats per token.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  entropy = -(jnp.exp(logp) * logp).sum(axis=-1)
  return masked_mean(entropy, response_mask)


def explained_variance(
    values: jax.Array, returns: jax.Array, mask: jax.Array
) -> jax.Array:
  """1 - Var(returns - values) / Var(returns) over masked-in entries.

  Args:
    values, returns, mask: same shape, e.g. [B, R].

  Returns:
    Scalar; when Var(returns) is 0 it is 1 for a perfect fit and 0 otherwise
    (the scikit-learn convention).
  """
  values = values.astype(jnp.float32)
  returns = returns.astype(jnp.float32)
  var_returns = masked_var(returns, mask)
  var_residual = masked_var(returns - values, mask)
  ev = 1.0 - var_residual / jnp.where(var_returns > 0, var_returns, 1.0)
  degenerate = jnp.where(var_residual > 0, 0.0, 1.0)
  return jnp.where(var_returns > 0, ev, degenerate)
