"""Iterated RLHF (InstructGPT steps 2-3 repeated) on the built-in default task.

  rlhf-jax --config=configs/iterated.py[:ROUNDS] --workdir=/tmp/iterated     (ROUNDS >= 1, default 2)

Round r: label_r ranks K samples of the current policy (sft in round 1, then
ppo_{r-1}); reward_r continues reward_{r-1} on the comparisons of every round
so far (round 1 starts from the SFT trunk); ppo_r continues the policy against
reward_r, always with the SFT policy as KL anchor. label_r also scores its
samples with reward_{r-1}, so ``label_r/label/rm_accuracy`` is how well the
previous round's RM ranks the current policy's samples; a last probe,
label_{ROUNDS+1}, measures the final RM on the final policy. eval compares
every policy on held-out prompts.
"""

from rlhf_jax import defaults


def get_config(arg=None):
  rounds = int(arg or 2)
  if rounds < 1:
    raise ValueError(f"configs/iterated.py needs ROUNDS >= 1, got {rounds}")
  config = defaults.base_config()
  for name in ("label", "reward", "ppo"):
    del config[name]
  chain = ["tokenizer", "pretrain", "sft"]
  policy = "sft"
  for r in range(1, rounds + 1):
    previous_rm = f"reward_{r - 1}" if r > 1 else ""
    config[f"label_{r}"] = defaults.stage("label", policy=policy, reward=previous_rm)
    config[f"reward_{r}"] = defaults.stage(
        "reward", init_from=previous_rm or "sft", comparisons=tuple(f"label_{i}" for i in range(1, r + 1)))
    if r > 1:
      # Continuing an RM: fewer steps over old + new comparisons.
      config[f"reward_{r}"].steps = 300
    config[f"ppo_{r}"] = defaults.stage("ppo", policy=policy, reference="sft", reward=f"reward_{r}")
    chain += [f"label_{r}", f"reward_{r}", f"ppo_{r}"]
    policy = f"ppo_{r}"
  probe = f"label_{rounds + 1}"
  config[probe] = defaults.stage("label", policy=policy, reward=f"reward_{rounds}", num_prompts=256)
  config.eval.reward = f"reward_{rounds}"
  config.stages = ",".join(chain + [probe, "eval"])
  return config
