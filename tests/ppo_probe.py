"""PPO experience for the multi-device probe scripts (sharded_train_check.py, data_parallel_check.py)."""

import jax
import numpy as np

from rlhf_jax import sharding
from rlhf_jax.algorithms import ppo
from rlhf_jax.rollout import make_rollout_fn
from rlhf_jax.scoring import RewardModelScorer


def shared_prompt_experience(policy_graphdef, policy, value_graphdef, value, pcfg: ppo.PPOConfig, mesh,
                             rows: int, k: int) -> ppo.Experience:
  """Experience of ``rows`` sampled rows, ``k`` per random 8-token prompt (``share_prompts``), scored by the
  value model as an RM, on ``mesh`` (default rules)."""
  prompt = np.repeat(np.random.default_rng(0).integers(4, 64, (rows // k, 8)).astype(np.int32), k, axis=0)
  batch = sharding.put_batch({"tokens": prompt, "mask": np.ones_like(prompt),
                              "group": np.repeat(np.arange(rows // k, dtype=np.int32), k)}, mesh,
                             sharding.DEFAULT_RULES)
  rollout = make_rollout_fn(policy_graphdef, pcfg.sampling, k)(policy, batch["tokens"], batch["mask"],
                                                               batch["group"], jax.random.key(0))
  rollout = ppo.share_prompts(rollout, pcfg, k)
  exp, _ = ppo.make_experience_fn(policy_graphdef, value_graphdef, pcfg)(
      policy, policy, value, rollout, RewardModelScorer(value_graphdef, value)(rollout), 0.1)
  return exp
