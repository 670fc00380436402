"""Config files, overrides and their errors."""

import json
import pathlib

import pytest

from rlhf_jax import defaults, pipeline
from rlhf_jax.config_io import ConfigError, apply_overrides, config_to_json, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", ["tiny", "small", "gpt2", "llama"])
def test_lm_presets_load(preset):
  config = load_config(f"{ROOT}/configs/lm.py:{preset}")
  assert config.model.num_layers == defaults.MODEL_PRESETS[preset]["num_layers"]


def test_overrides_parse_by_type():
  config = load_config(f"{ROOT}/configs/quickstart.py")
  apply_overrides(config, [("seed", "3"), ("pretrain.optimizer.lr", "0.01"), ("ppo.kl_adaptive", "true"),
                           ("stages", "pretrain,sft"), ("model.flavour", "llama")])
  assert config.seed == 3 and config.pretrain.optimizer.lr == 0.01 and config.ppo.kl_adaptive is True
  assert config.stages == "pretrain,sft" and config.model.flavour == "llama"
  assert json.loads(config_to_json(config))["seed"] == 3


def test_misspelt_key_is_named_with_suggestion():
  config = load_config(f"{ROOT}/configs/quickstart.py")
  with pytest.raises(ConfigError, match=r"unknown config key 'pretrain.optimiser'.*pretrain.optimizer"):
    apply_overrides(config, [("pretrain.optimiser.lr", "1")])
  with pytest.raises(ConfigError, match="expected a int"):
    apply_overrides(config, [("seed", "abc")])
  with pytest.raises(ConfigError, match="names a group"):
    apply_overrides(config, [("model", "x")])


def test_config_is_locked_and_missing_file_named(tmp_path):
  config = load_config(f"{ROOT}/configs/quickstart.py")
  with pytest.raises(AttributeError):
    config.new_key = 1
  with pytest.raises(ConfigError, match="config file not found"):
    load_config(str(tmp_path / "nope.py"))


def test_a_workdir_from_before_a_new_key_resumes_while_the_key_holds_its_default(tmp_path):
  """config.json written by an older version lacks keys added since; at their defaults they shaped nothing."""
  config = defaults.base_config()
  config.dpo = defaults.stage("dpo")
  old = json.loads(config_to_json(config))
  del old["dpo"]["precompute_reference"], old["data"]["min_bucket_len"], old["compilation_cache_dir"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  (tmp_path / "dpo").mkdir()  # a started instance: its section must match
  (tmp_path / "sft").mkdir()
  pipeline.check_or_write_config(config, str(tmp_path))  # new keys at their defaults: the same run
  assert json.loads((tmp_path / "config.json").read_text())["dpo"]["precompute_reference"] is False
  (tmp_path / "config.json").write_text(json.dumps(old))
  config.dpo.precompute_reference = True
  with pytest.raises(ConfigError, match=r"dpo.precompute_reference \(None -> True\)"):
    pipeline.check_or_write_config(config, str(tmp_path))
  config.dpo.precompute_reference = False
  config.data.min_bucket_len = 0
  with pytest.raises(ConfigError, match=r"data.min_bucket_len \(None -> 0\)"):
    pipeline.check_or_write_config(config, str(tmp_path))
