"""The quickstart pipeline with a sweep of the PPO KL coefficient (tokenizer .. reward run once).

  python experiments/sweep.py --config=configs/sweep_kl.py --workdir=/tmp/sweep_kl --parallel=2
"""

from rlhf_jax import defaults


def get_config(arg=None):
  del arg
  config = defaults.base_config()
  config.ppo.eval_every = 0  # the eval stage compares the arms; no in-loop evals
  config.eval.policies = ("sft", "ppo")
  return config


def get_sweep(arg=None):
  del arg
  return dict(sampler="grid", params={"ppo.kl_coef": [0.0, 0.02, 0.05, 0.1, 0.2]},
              metric="eval:ppo/eval/gold_reward", direction="maximize")
