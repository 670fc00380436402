"""Stage graphs: instances, named inputs and their validation; the iterated-rounds config."""

import pathlib

import pytest

from rlhf_jax import defaults
from rlhf_jax.config_io import ConfigError, load_config
from rlhf_jax.stages import graph

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_default_chain_is_the_instructgpt_pipeline():
  chain = graph.parse_stages(defaults.base_config())
  assert [i.name for i in chain] == list(defaults.DEFAULT_STAGES)
  ppo = chain[-2]
  assert ppo.kind.name == "ppo" and ppo.dependencies() == {"policy": ("sft",), "reference": ("sft",),
                                                           "reward": ("reward",)}
  assert chain[4].dependencies() == {"init_from": ("sft",), "comparisons": ("label",), "reference": ("sft",)}


def test_two_ppo_arms_from_one_sft_and_rm():
  c = defaults.base_config()
  c.ppo_low_kl = defaults.stage("ppo", kl_coef=0.02)
  c.stages = "tokenizer,pretrain,sft,label,reward,ppo,ppo_low_kl,eval"
  chain = graph.parse_stages(c)
  assert chain[6].name == "ppo_low_kl" and chain[6].section.kl_coef == 0.02 and chain[5].section.kl_coef == 0.1


@pytest.mark.parametrize("key, value, message", [
    ("reward", "rewrd", "config.ppo.reward = 'rewrd' names no reward instance; known: ['reward']"),
    ("policy", "reward", "config.ppo.policy = 'reward' names no policy instance"),
    ("reference", "", "config.ppo.reference is empty"),
])
def test_bad_inputs_are_named(key, value, message):
  c = defaults.base_config()
  c.ppo[key] = value
  with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
    graph.parse_stages(c)


def test_unknown_kind_and_unknown_stage_are_named():
  c = defaults.base_config()
  c.stages = "tokenizer,pretrain,finetune"
  with pytest.raises(ConfigError, match="unknown stage.*finetune"):
    graph.parse_stages(c)
  c = defaults.base_config()
  c.eval.kind = "evaluate"
  with pytest.raises(ConfigError, match="config.eval.kind is 'evaluate'"):
    graph.parse_stages(c)


def test_inputs_must_run_first_or_be_finished(tmp_path):
  c = defaults.base_config()
  c.stages = "tokenizer,ppo"
  chain = graph.parse_stages(c)
  with pytest.raises(ConfigError, match="stage 'ppo' needs 'sft' \\(config.ppo.policy\\)"):
    graph.check_order(chain, str(tmp_path))
  for name in ("sft", "reward"):
    (tmp_path / name).mkdir()
    (tmp_path / name / "DONE.json").write_text("{}")
  graph.check_order(chain, str(tmp_path))


def test_a_reward_instance_may_continue_another():
  c = defaults.base_config()
  c.reward_2 = defaults.stage("reward", init_from="reward", comparisons=("label",))
  graph.parse_stages(c)
  c.reward_2.init_from = "label"
  with pytest.raises(ConfigError, match="names no policy or reward instance"):
    graph.parse_stages(c)


@pytest.mark.parametrize("rounds", [1, 3])
def test_iterated_config_rounds(rounds):
  c = load_config(f"{ROOT}/configs/iterated.py:{rounds}")
  names = [i.name for i in graph.parse_stages(c)]
  assert names[:3] == ["tokenizer", "pretrain", "sft"] and names[-1] == "eval"
  assert names[-2] == f"label_{rounds + 1}"
  assert sum(n.startswith("ppo_") for n in names) == rounds
  last = c[f"ppo_{rounds}"]
  assert last.reference == "sft" and last.reward == f"reward_{rounds}"
  assert last.policy == ("sft" if rounds == 1 else f"ppo_{rounds - 1}")
  assert tuple(c[f"reward_{rounds}"].comparisons) == tuple(f"label_{i}" for i in range(1, rounds + 1))
  assert c[f"label_{rounds + 1}"].reward == f"reward_{rounds}"
  assert "ppo" not in c and "reward" not in c


def test_stage_helper_rejects_unknown_keys():
  with pytest.raises(ValueError, match="has no key 'kl'"):
    defaults.stage("ppo", kl=0.1)


def test_rounds_table_reads_each_round_from_the_summary():
  from experiment_scripts import load_script
  module = load_script("rounds_table")
  summary = {"eval": {"sft/eval/gold_reward": 0.6, "ppo_1/eval/gold_reward": 0.8, "ppo_1/eval/kl": 4.0,
                      "ppo_1/eval/win_rate_vs_sft": 0.7},
             "ppo_1": {}, "reward_1": {"eval/rm_accuracy": 0.74},
             "label_2": {"label/rm_accuracy": 0.58, "label/rm_gold_accuracy": 0.62,
                         "label/labeler_gold_agreement": 0.74}}
  lines = module.rounds_table(summary).splitlines()
  assert len(lines) == 4
  assert lines[3] == "| 1 | ppo_1 | 0.800 | 4.00 | 0.700 | 0.740 | 0.580 / 0.620 | 0.740 |"
