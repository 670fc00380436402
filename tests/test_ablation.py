"""The ablation script's arms: each is matched to the PPO arm's samples or FLOPs; --arms picks them."""

import pathlib

import pytest

from experiment_scripts import load_script
from rlhf_jax.config_io import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
ablation = load_script("ablation_rl_vs_rft")


@pytest.fixture(scope="module")
def base():
  return load_config(f"{ROOT}/configs/quickstart.py")


def samples(arm):
  if arm.kind == "ppo":
    return arm.iterations * arm.prompts_per_iteration * arm.samples_per_prompt
  if arm.kind == "dpo":
    return arm.steps * arm.batch_size * arm.samples_per_prompt if arm.online else 0
  return arm.rounds * arm.prompts_per_round * arm.samples_per_prompt


def test_arms_match_ppo_on_samples(base):
  c = ablation.arm_config(base, 0, "quick", "samples")
  budget = samples(c.ppo)
  assert c.stages.split(",")[5:-2] == list(ablation.ARMS)
  for name in ("ppo_ptx", "rloo", "grpo", "dpo_online", "rft_bon", "rft_rest"):
    assert abs(samples(c[name]) - budget) <= 0.05 * budget, name
  assert c.rloo.advantage == "rloo" and c.grpo.advantage == "grpo" and c.rloo.samples_per_prompt == 4
  assert c.rloo.iterations == c.ppo.iterations and c.rloo.kl_coef == c.ppo.kl_coef
  assert c.dpo.comparisons == ("label",) and not c.dpo.online and c.dpo_online.online
  assert set(c.eval.policies) == {"sft", *ablation.ARMS}


def test_arms_match_ppo_on_flops(base):
  c = ablation.arm_config(base, 0, "quick", "flops")
  budget = ablation.ppo_budget(c, "flops")
  # Critic-free arms skip the value model: cheaper samples, so more of them at the same FLOPs.
  for name in ("rloo", "grpo"):
    flops = samples(c[name]) * ablation.ppo_flops_per_sample(c, c[name])
    step = c[name].iterations * c[name].samples_per_prompt * ablation.ppo_flops_per_sample(c, c[name])
    assert abs(flops - budget) <= step, name
    assert samples(c[name]) > samples(c.ppo)
  online = c.dpo_online.steps * ablation.dpo_flops_per_step(c, c.dpo_online, 4)
  assert abs(online - budget) <= ablation.dpo_flops_per_step(c, c.dpo_online, 4)
  # Offline DPO: the FLOPs budget, at most DPO_MAX_EPOCHS passes over the comparisons.
  epoch = -(-(c.label.num_prompts - min(c.reward.eval_comparisons, c.label.num_prompts // 5)) // c.dpo.batch_size)
  assert c.dpo.steps <= ablation.DPO_MAX_EPOCHS * epoch
  assert c.dpo.steps * ablation.dpo_flops_per_step(c, c.dpo, c.label.k) <= budget
  # With the reference's log-probs precomputed a step is cheaper, and the one pass before training is paid
  # from the same budget.
  steps = c.dpo.steps
  c.dpo.precompute_reference = True
  ablation.match_dpo(c, c.dpo, "flops")
  k, p, n = c.label.k, c.data.prompt_len, c.data.response_len
  reference_pass = epoch * ablation.dpo_lib.reference_counts(ablation.model_of(c), c.dpo.batch_size * k, p + n, p,
                                                             k).flops
  per_step = ablation.dpo_flops_per_step(c, c.dpo, k)
  in_step = c.dpo.copy_and_resolve_references()
  in_step.precompute_reference = False
  assert per_step == pytest.approx(0.75 * ablation.dpo_flops_per_step(c, in_step, k), rel=0.05)
  assert c.dpo.steps >= steps and c.dpo.steps <= ablation.DPO_MAX_EPOCHS * epoch
  assert reference_pass + c.dpo.steps * per_step <= budget


def test_arms_are_chosen_and_checked(base):
  c = ablation.arm_config(base, 1, "quick", "samples", arms=("ppo", "grpo"))
  assert c.stages == "tokenizer,pretrain,sft,label,reward,ppo,grpo,bon,eval"
  assert "rloo" not in c and "dpo" not in c and c.eval.policies == ("sft", "ppo", "grpo") and c.seed == 1
  with pytest.raises(ValueError, match="unknown arms \\['vtrace'\\]"):
    ablation.arm_config(base, 0, "quick", "samples", arms=("ppo", "vtrace"))
