"""DPO arms next to the InstructGPT pipeline on the default task (the quickstart's sizes).

  rlhf-jax --config=configs/dpo.py --workdir=/tmp/dpo
  rlhf-jax --config=configs/dpo.py --workdir=/tmp/dpo --config.stages=tokenizer,pretrain,sft,label,dpo,eval \
      --config.dpo.reward= --config.eval.reward=                       # offline DPO only, no reward model

Instances: ``dpo`` (offline, on the label instance's K = 8 rankings; the reward model only reports
``eval/rm_reward``), ``dpo_online`` (2 samples per prompt of the current policy each step, ranked by the
reward model) and ``ppo`` for comparison. ``--config.dpo.loss=ipo`` gives IPO, ``--config.dpo_online.ranker=labeler``
ranks online samples with the task's simulated labelers instead of the RM.
"""

from rlhf_jax import defaults


def get_config(arg=None):
  del arg
  c = defaults.base_config()
  c.dpo = defaults.stage("dpo", reward="reward")
  c.dpo_online = defaults.stage("dpo", online=True, comparisons=(), reward="reward", ranker="rm")
  c.stages = "tokenizer,pretrain,sft,label,reward,dpo,dpo_online,ppo,eval"
  return c
