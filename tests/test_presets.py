"""Every task preset of configs/quickstart.py loads and runs its first stages (tokenizer, pretrain, sft) at a tiny size."""

import importlib.util
import json
import pathlib

import pytest

from rlhf_jax import defaults, pipeline, tasks
from rlhf_jax.config_io import config_to_json, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.py"


def _presets():
  spec = importlib.util.spec_from_file_location("quickstart_config", QUICKSTART)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return list(module.PRESETS)


def test_every_task_has_a_preset_and_no_argument_is_the_default_task():
  assert sorted(_presets()) == sorted(tasks.names())
  assert config_to_json(load_config(f"{QUICKSTART}")) == config_to_json(defaults.base_config())
  assert config_to_json(load_config(f"{QUICKSTART}:instruct")) == config_to_json(defaults.base_config())
  with pytest.raises(Exception, match="unknown quickstart preset"):
    load_config(f"{QUICKSTART}:nope")


@pytest.mark.parametrize("preset", _presets())
def test_preset_names_its_task_with_valid_options(preset):
  config = load_config(f"{QUICKSTART}:{preset}")
  assert config.task.name == preset
  options = {k: v for k, v in config.task.items() if k != "name" and v >= 0}
  task = tasks.get(preset, seed=0, **options)
  # Prompts and responses fit the sequence lengths the preset trains and samples at.
  assert config.data.prompt_len + config.data.response_len <= config.model.max_len
  for name in ("label", "ppo"):
    assert config[name].sampling.max_new_tokens <= config.data.response_len
  assert task.prompts("test")


@pytest.mark.parametrize("preset", _presets())
def test_preset_runs_its_first_stages(preset, tmp_path):
  config = load_config(f"{QUICKSTART}:{preset}")
  config.stages = "tokenizer,pretrain,sft"
  # Tiny: a few steps and little data; every other setting is the preset's own.
  config.pretrain.update(dict(steps=3, batch_size=8, log_every=1))
  config.sft.update(dict(steps=3, batch_size=8, log_every=1))
  config.evaluation.update(dict(num_prompts=8, lm_loss_batches=1))
  config.task.num_train_prompts = 64
  for key in ("num_pretraining_docs", "num_demonstrations"):
    if key in config.task:
      config.task[key] = 64
  summary = pipeline.run(config, str(tmp_path))
  assert summary["sft"]["compute/grad_steps"] == 3
  assert 0.0 <= summary["sft"]["eval/gold_reward"] <= 1.0
  recorded = json.loads((tmp_path / "config.json").read_text())
  assert recorded["task"]["name"] == preset
