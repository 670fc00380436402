"""KL estimators from sampled-token log-probs, and KL-coefficient controllers.

Estimators take log-probs of tokens sampled from the policy: `logp` under the
policy and `logp_ref` under the reference model. With ratio = p_ref / p they
are Schulman's k1 = -log ratio, k2 = 0.5 (log ratio)^2 and
k3 = ratio - 1 - log ratio; k1 and k3 are unbiased for KL(policy || ref), k3
is also non-negative.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

KLKind = Literal["k1", "k2", "k3"]


def kl_k1(logp: jax.Array, logp_ref: jax.Array) -> jax.Array:
  """Per-token log-ratio logp - logp_ref (nats), same shape as inputs."""
  return logp - logp_ref


def kl_k2(logp: jax.Array, logp_ref: jax.Array) -> jax.Array:
  """Per-token 0.5 * (logp - logp_ref)^2 (nats), same shape as inputs."""
  return 0.5 * (logp - logp_ref) ** 2


def kl_k3(logp: jax.Array, logp_ref: jax.Array) -> jax.Array:
  """Per-token exp(logp_ref - logp) - 1 - (logp_ref - logp) >= 0 (nats)."""
  log_ratio = logp_ref - logp
  # expm1 keeps precision when the two policies are close.
  return jnp.expm1(log_ratio) - log_ratio


def kl_penalty(logp: jax.Array, logp_ref: jax.Array, kind: KLKind = "k1") -> jax.Array:
  """Per-token KL estimate of the chosen kind ("k1" | "k2" | "k3"; static)."""
  estimators = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
  if kind not in estimators:
    raise ValueError(f"unknown KL estimator: {kind!r}")
  return estimators[kind](logp, logp_ref)


def sequence_kl(
    logp: jax.Array, logp_ref: jax.Array, response_mask: jax.Array
) -> jax.Array:
  """Summed log-ratio over real response tokens.

  Args:
    logp, logp_ref: [B, R] log-probs of the sampled response tokens.
    response_mask: [B, R], 1 for real tokens.

  Returns:
    [B] sample estimate of KL(policy || ref) per sequence, in nats.
  """
  return ((logp - logp_ref) * response_mask.astype(logp.dtype)).sum(axis=-1)


def update_kl_coef(
    beta: ArrayLike,
    observed_kl: ArrayLike,
    n_steps: ArrayLike,
    *,
    kind: Literal["fixed", "adaptive"],
    target: float | None = None,
    horizon: float | None = None,
) -> jax.Array:
  """One step of a KL-coefficient controller.

  `fixed` returns beta unchanged. `adaptive` is the proportional controller of
  Ziegler et al. (2019): e = clip(observed_kl / target - 1, -0.2, 0.2) and
  beta <- max(beta * (1 + e * n_steps / horizon), 0).

  Args:
    beta: scalar current coefficient (lives in the train state).
    observed_kl: scalar observed KL, nats per sequence (mean of `sequence_kl`).
    n_steps: samples (episodes) consumed since the last update.
    kind: "fixed" or "adaptive"; static.
    target: target KL in nats per sequence (adaptive only).
    horizon: samples over which to close the error (adaptive only).

  Returns:
    Scalar float32 new beta.
  """
  beta = jnp.asarray(beta, jnp.float32)
  if kind == "fixed":
    return beta
  if kind != "adaptive":
    raise ValueError(f"unknown KL controller: {kind!r}")
  if target is None or horizon is None:
    raise ValueError("adaptive KL controller needs target and horizon")
  error = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
  # A large step (n_steps > 5 * horizon) could push the coefficient below zero, rewarding divergence.
  return jnp.maximum(beta * (1.0 + error * jnp.asarray(n_steps, jnp.float32) / horizon), 0.0)
