"""The command line: absl/ml_collections flags, help, errors, and the `sample` subcommand."""

import json
import pathlib
import subprocess
import sys

import pytest

from rlhf_jax import main as cli
from rlhf_jax.config_io import apply_overrides, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = f"--config={ROOT}/configs/quickstart.py"
TINY = [("stages", "tokenizer,pretrain,sft"), ("pretrain.steps", "4"), ("pretrain.batch_size", "8"),
        ("pretrain.log_every", "2"), ("sft.steps", "2"), ("sft.batch_size", "8"), ("sft.log_every", "1"),
        ("evaluation.num_prompts", "8"), ("evaluation.lm_loss_batches", "1")]


def run_main(capsys, *argv):
  """``main(argv)`` -> (exit code, stdout, stderr)."""
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def test_help_exits_0_and_lists_flags_and_commands(capsys):
  code, out, _ = run_main(capsys, "--help")
  assert code == 0
  assert "--config" in out and "--workdir" in out and "--flagfile" in out and "sample" in out


def test_help_with_config_lists_its_keys(capsys):
  code, out, _ = run_main(capsys, QUICKSTART, "--help")
  assert code == 0 and "--config.pretrain.steps=" in out and "--config.seed=0" in out


def test_python_m_help():
  proc = subprocess.run([sys.executable, "-m", "rlhf_jax", "--help"], capture_output=True, text=True, cwd=ROOT,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "--config" in proc.stdout and "--workdir" in proc.stdout


def test_misspelt_key_exits_2_with_close_match(capsys, tmp_path):
  code, out, err = run_main(capsys, QUICKSTART, f"--workdir={tmp_path}", "--config.pretrain.stepz=3")
  assert code == 2 and not out
  assert err.count("\n") == 1 and err.startswith("rlhf-jax: error: ")
  assert "'pretrain.stepz'" in err and "did you mean pretrain.steps" in err
  code, _, err = run_main(capsys, QUICKSTART, f"--workdir={tmp_path}", "--config.pretrain.optimiser.lr=1")
  assert code == 2 and "'pretrain.optimiser'" in err and "pretrain.optimizer.lr" in err


@pytest.mark.parametrize("override, message", [
    ("--config.seed=abc", "--config.seed=abc"),
    ("--config.ppo.kl_adaptive=maybe", "--config.ppo.kl_adaptive"),
    ("--config.model=abc", "names a group"),
    ("--config.model={'d_model': 8}", "names a group"),
])
def test_bad_value_exits_2_naming_the_flag(capsys, tmp_path, override, message):
  code, _, err = run_main(capsys, QUICKSTART, f"--workdir={tmp_path}", override)
  assert code == 2 and message in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    ([f"--config={ROOT}/configs/nope.py", "--workdir=w"], "config file not found"),
    ([f"--config={ROOT}/configs/lm.py:bogus", "--workdir=w"], "unknown model preset 'bogus'"),
    ([QUICKSTART], "--workdir required"),
    ([QUICKSTART, "--workdr=w"], "Did you mean: workdir"),
    ([QUICKSTART, "--workdir=w", "stray"], "unexpected argument"),
    (["smaple"], "did you mean sample"),
])
def test_usage_errors_exit_2(capsys, argv, message):
  code, _, err = run_main(capsys, *argv)
  assert code == 2 and message in err and err.count("\n") == 1


def test_overrides_parse_by_type_and_config_is_locked(tmp_path):
  config, workdir = cli.parse_run_args([QUICKSTART, f"--workdir={tmp_path}", "--config.stages=pretrain,sft",
                                        "--config.seed=7", "--config.pretrain.optimizer.lr=0.01",
                                        "--config.ppo.kl_adaptive=true", "--config.model.flavour=llama"])
  assert workdir == str(tmp_path)
  assert config.stages == "pretrain,sft" and config.seed == 7 and config.pretrain.optimizer.lr == 0.01
  assert config.ppo.kl_adaptive is True and config.model.flavour == "llama"
  with pytest.raises(AttributeError):
    config.new_key = 1


@pytest.mark.parametrize("typed, want", [
    ("sft,ppo", ("sft", "ppo")), ("(sft, ppo)", ("sft", "ppo")), ("[sft,ppo]", ("sft", "ppo")),
    ("('sft','ppo')", ("sft", "ppo")), ("sft", ("sft",)), ("()", ()), ("(1,2,4)", (1, 2, 4)), ("1,x", (1, "x")),
])
def test_tuple_overrides_read_unquoted_names(tmp_path, typed, want):
  """ml_collections alone reads ``sft,ppo`` or ``(sft,ppo)`` as the one name 'sft,ppo'."""
  config, _ = cli.parse_run_args([QUICKSTART, f"--workdir={tmp_path}", f"--config.eval.policies={typed}"])
  assert config.eval.policies == want


def test_nested_tuple_override_must_be_quoted(capsys, tmp_path):
  code, _, err = run_main(capsys, QUICKSTART, f"--workdir={tmp_path}", "--config.eval.policies=((a,b),c)")
  assert code == 2 and "a nested tuple must be a quoted Python literal" in err


def test_flagfile_and_config_arg(tmp_path):
  (tmp_path / "flags").write_text(f"{QUICKSTART}\n--workdir={tmp_path}/w\n--config.seed=5\n")
  config, workdir = cli.parse_run_args([f"--flagfile={tmp_path}/flags", "--config.sft.steps=9"])
  assert config.seed == 5 and config.sft.steps == 9 and workdir == f"{tmp_path}/w"
  # get_config(arg) without a default loads with and without :ARG.
  (tmp_path / "c.py").write_text("import ml_collections\n\ndef get_config(arg):\n"
                                 "  return ml_collections.ConfigDict({'size': arg or 'base'})\n")
  assert cli.parse_run_args([f"--config={tmp_path}/c.py", "--workdir=w"])[0].size == "base"
  assert cli.parse_run_args([f"--config={tmp_path}/c.py:big", "--workdir=w"])[0].size == "big"


def test_tfds_build_prints_nothing(tmp_path, capfd):
  from rlhf_jax.data import tfds_datasets
  tfds_datasets.build_dataset({"train": [{"prompt": "a"}], "test": [{"prompt": "b"}]}, "prompts", tmp_path,
                              "prompts")
  out, _ = capfd.readouterr()
  assert "Downloading and preparing" not in out and "downloaded and prepared" not in out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A finished tokenizer, pretrain, sft run at a few steps."""
  from rlhf_jax import pipeline
  workdir = tmp_path_factory.mktemp("cli") / "run"
  pipeline.run(apply_overrides(load_config(f"{ROOT}/configs/quickstart.py"), TINY), str(workdir))
  return workdir


def test_sample_prints_prompts_and_responses(capsys, workdir):
  argv = ["sample", f"--workdir={workdir}", "--policy=sft", "--prompt=the soup was", "--prompt=our hotel",
          "--num_samples=3", "--max_new_tokens=6", "--seed=1"]
  code, out, _ = run_main(capsys, *argv, "--json")
  assert code == 0
  rows = [json.loads(line) for line in out.splitlines()]
  assert [r["prompt"] for r in rows] == ["the soup was", "our hotel"]
  assert all(r["policy"] == "sft" and len(r["responses"]) == 3 for r in rows)
  assert all(isinstance(t, str) for r in rows for t in r["responses"])
  assert run_main(capsys, *argv, "--json")[1] == out  # same seed, same samples
  code, text, _ = run_main(capsys, *argv)
  assert code == 0 and "prompt: the soup was" in text and "  [3] " in text


def test_sample_missing_policy_lists_instances(capsys, workdir):
  code, _, err = run_main(capsys, "sample", f"--workdir={workdir}", "--policy=ppo", "--prompt=hi")
  assert code == 2 and "'ppo'" in err and "instances with params: pretrain, sft" in err
  code, _, err = run_main(capsys, "sample", f"--workdir={workdir}", "--policy=sft")
  assert code == 2 and "--prompt required" in err
