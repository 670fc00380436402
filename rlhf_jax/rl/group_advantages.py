"""Critic-free advantages from k samples per prompt: RLOO and GRPO (pure, jit-able).

Rows of a batch belong to groups (the prompt they were sampled for, ``Rollout.group``);
group ids are arbitrary ints and rows of a group need not be adjacent.

* RLOO (Ahmadian et al. 2024, after Kool et al. 2019): the baseline of sample i is the
  mean reward of the other k - 1 samples of its prompt: A_i = r_i - mean_{j != i} r_j
  = k / (k - 1) * (r_i - mean_j r_j).
* GRPO (Shao et al. 2024): A_i = (r_i - mean_j r_j) / (std_j r_j + eps), the group's
  population std (``scale_by_std=False`` keeps only the mean, as Dr. GRPO does). A group whose
  rewards are all equal carries no signal; ``zero_variance`` flags its rows so a caller can drop them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GROUP_ESTIMATORS = ("rloo", "grpo")


def _same_group(group: jax.Array) -> jax.Array:
  """[B, B] float: 1 where rows i and j share a group."""
  return (group[:, None] == group[None, :]).astype(jnp.float32)


def group_sizes(group: jax.Array) -> jax.Array:
  """[B] float: number of rows in each row's group (itself included)."""
  return _same_group(group).sum(axis=1)


def group_mean(values: jax.Array, group: jax.Array) -> jax.Array:
  """[B]: the mean of ``values`` [B] over each row's group."""
  same = _same_group(group)
  return same @ values.astype(jnp.float32) / same.sum(axis=1)


def rloo_advantages(rewards: jax.Array, group: jax.Array) -> jax.Array:
  """Leave-one-out advantages [B] of sequence rewards [B]; 0 for a row alone in its group."""
  rewards = rewards.astype(jnp.float32)
  n = group_sizes(group)
  others = (_same_group(group) @ rewards - rewards) / jnp.maximum(n - 1.0, 1.0)
  return jnp.where(n > 1, rewards - others, 0.0)


def grpo_advantages(rewards: jax.Array, group: jax.Array, scale_by_std: bool = True,
                    eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
  """Group-normalised advantages [B] and a [B] bool ``zero_variance`` (all rewards of the group equal).

  Rows of a zero-variance group get advantage exactly 0.
  """
  rewards = rewards.astype(jnp.float32)
  mean = group_mean(rewards, group)
  centred = rewards - mean
  var = group_mean(centred * centred, group)
  std = jnp.sqrt(var)
  # Equal rewards can leave a rounding residue in the mean: compare the spread to the rewards' scale.
  zero_variance = std <= 1e-6 * jnp.maximum(jnp.abs(mean), 1.0)
  advantages = centred / (std + eps) if scale_by_std else centred
  return jnp.where(zero_variance, 0.0, advantages), zero_variance
