"""Pure RL maths for PPO on language models: KL, whitening, GAE, PPO losses."""

from rlhf_jax.rl.gae import gae_advantages, per_token_rewards
from rlhf_jax.rl.kl import (
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalty,
    sequence_kl,
    update_kl_coef,
)
from rlhf_jax.rl.ppo_losses import (
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
)
from rlhf_jax.rl.whitening import masked_mean, masked_var, masked_whiten

__all__ = [
    "clipped_policy_loss",
    "clipped_value_loss",
    "entropy_from_logits",
    "explained_variance",
    "gae_advantages",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalty",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "per_token_rewards",
    "sequence_kl",
    "update_kl_coef",
]
