"""The stage runner end to end through the CLI: workdir contract, resume after kill -9, bad input."""

import json
import os
import shutil
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config.pretrain.steps=30", "--config.pretrain.batch_size=16", "--config.pretrain.log_every=5",
        "--config.sft.steps=10", "--config.sft.batch_size=16", "--config.sft.log_every=5",
        "--config.label.num_prompts=40", "--config.reward.steps=10", "--config.reward.batch_size=8",
        "--config.reward.log_every=5", "--config.reward.normalize_samples=32", "--config.evaluation.num_prompts=16",
        "--config.evaluation.lm_loss_batches=1", "--config.ppo.iterations=4", "--config.ppo.prompts_per_iteration=8",
        "--config.ppo.log_every=1", "--config.ppo.eval_every=2", "--config.ppo.checkpoint_every=2"]


def cli(workdir, *args, check=True):
  cmd = [sys.executable, "-m", "rlhf_jax", f"--config={ROOT}/configs/quickstart.py", f"--workdir={workdir}",
         *TINY, *args]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
  if check:
    assert proc.returncode == 0, proc.stderr[-5000:]
  return proc


def rows(workdir, stage):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["stage"] == stage]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """A workdir with every stage before PPO finished."""
  workdir = tmp_path_factory.mktemp("run") / "prepared"
  cli(workdir, "--config.stages=tokenizer,pretrain,sft,label,reward")
  return workdir


@pytest.fixture(scope="module")
def pipeline_workdir(prepared, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run") / "wd"
  shutil.copytree(prepared, workdir)
  cli(workdir, "--config.stages=tokenizer,pretrain,sft,label,reward,ppo,eval")
  return workdir


def kill_when_checkpointed(workdir, stage, step, args, base=None):
  """Starts the CLI, SIGKILLs it once STAGE has a checkpoint at >= step, and checks it died unfinished."""
  base = base or [f"--config={ROOT}/configs/quickstart.py", *TINY]
  cmd = [sys.executable, "-m", "rlhf_jax", f"--workdir={workdir}", *base, *args]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = workdir / stage / "checkpoints"
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if ckpts.is_dir() and any(p.name.isdigit() and int(p.name) >= step for p in ckpts.iterdir()):
      break
    time.sleep(0.01)
  assert proc.poll() is None, "the run finished before it could be killed"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (workdir / stage / "DONE.json").exists()


def test_workdir_contract(pipeline_workdir):
  wd = pipeline_workdir
  config = json.loads((wd / "config.json").read_text())
  assert config["pretrain"]["steps"] == 30 and config["seed"] == 0
  summary = json.loads((wd / "summary.json").read_text())
  assert {"tokenizer", "pretrain", "sft", "label", "reward", "eval"} <= set(summary)
  for name in ("eval/gold_reward", "eval/kl", "eval/lm_loss"):
    assert name in summary["sft"]
  assert 0.0 <= summary["reward"]["eval/rm_accuracy"] <= 1.0
  assert "sft/eval/win_rate_vs_sft" in summary["eval"] and "pretrain/eval/rm_reward" in summary["eval"]
  train_rows = [r for r in rows(wd, "pretrain") if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [5, 10, 15, 20, 25, 30]
  assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"]
  assert [r["step"] for r in rows(wd, "ppo") if "train/policy_loss" in r] == [1, 2, 3, 4]
  assert {"eval/gold_reward", "eval/rm_reward", "eval/kl", "eval/win_rate_vs_sft"} <= set(summary["ppo"])
  assert any(os.scandir(wd / "tensorboard"))
  assert (wd / "pretrain" / "checkpoints").is_dir() and (wd / "sft" / "params").is_dir()
  comparisons = (wd / "label" / "comparisons.jsonl").read_text().splitlines()
  assert len(comparisons) == 40 and len(json.loads(comparisons[0])["responses"]) == 8


def test_packed_reward_stage_trains_as_the_unpacked_one(prepared, tmp_path):
  """``reward.pack_width``: the same comparisons each step, packed (each prompt once, then its responses):
  the same losses up to float rounding, on fewer token slots."""
  workdir = tmp_path / "packed"
  shutil.copytree(prepared, workdir)
  shutil.rmtree(workdir / "reward")  # an unfinished instance's keys may change
  cli(workdir, "--config.stages=tokenizer,pretrain,sft,label,reward", "--config.reward.pack_width=256")
  plain = [r for r in rows(prepared, "reward") if "train/loss" in r]
  packed = [r for r in rows(workdir, "reward") if "train/loss" in r]
  assert [r["step"] for r in packed] == [r["step"] for r in plain] == [5, 10]
  for a, b in zip(plain, packed):
    for key in ("train/loss", "train/reward_gap", "train/grad_norm"):
      assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    # Pairs of identical responses tie exactly only when computed in the same layout.
    assert b["train/accuracy"] == pytest.approx(a["train/accuracy"], abs=0.02)
    assert b["data/fill"] > a["data/fill"] + 0.05
    assert b["train/lr"] == pytest.approx(a["train/lr"], rel=1e-6)
  # The rate each logged step applied, averaged since the last row: cosine decay over the stage's 10 steps.
  assert plain[0]["train/lr"] > plain[1]["train/lr"] > 0
  assert json.loads((workdir / "config.json").read_text())["reward"]["pack_width"] == 256
  shutil.rmtree(workdir / "reward")
  proc = cli(workdir, "--config.stages=tokenizer,pretrain,sft,label,reward", "--config.reward.pack_width=32",
             check=False)
  assert proc.returncode != 0 and "reward.pack_width: comparison example" in proc.stderr


def test_rerun_skips_finished_stages(pipeline_workdir):
  before = (pipeline_workdir / "metrics.jsonl").read_text()
  proc = cli(pipeline_workdir, "--config.stages=pretrain,sft")
  assert "pretrain: already finished" in proc.stdout and "sft: already finished" in proc.stdout
  assert (pipeline_workdir / "metrics.jsonl").read_text() == before


def test_bad_input_is_named_and_nothing_is_lost(prepared, pipeline_workdir, tmp_path):
  before = (pipeline_workdir / "config.json").read_text()
  proc = cli(pipeline_workdir, "--config.stages=pretrain", "--config.pretrain.steps=31", check=False)
  assert proc.returncode == 2 and "different config" in proc.stderr and "pretrain.steps" in proc.stderr
  assert (pipeline_workdir / "config.json").read_text() == before
  proc = cli(tmp_path / "a", "--config.stages=pretrain,finetune", check=False)
  assert proc.returncode == 2 and "unknown stage" in proc.stderr and "finetune" in proc.stderr
  proc = cli(tmp_path / "b", "--config.stages=sft", "--config.tokenizer.path=" + str(
      pipeline_workdir / "tokenizer" / "spm.model"), check=False)
  assert proc.returncode == 2 and "stage 'sft' needs 'pretrain' (config.sft.init_from)" in proc.stderr
  proc = cli(tmp_path / "c", "--config.pretrain.stepz=3", check=False)
  assert proc.returncode == 2 and "pretrain.stepz" in proc.stderr
  shutil.copytree(prepared, tmp_path / "d")
  proc = cli(tmp_path / "d", "--config.stages=ppo", "--config.ppo.ptx_coef=0.5", "--config.ppo.ptx_batch_size=3",
             "--config.ppo.minibatches=2", check=False)
  assert proc.returncode == 2 and "ppo.ptx_batch_size=3 does not split into ppo.minibatches=2" in proc.stderr


def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path):
  args = ["--config.stages=tokenizer,pretrain", "--config.pretrain.steps=60", "--config.pretrain.checkpoint_every=10",
          "--config.pretrain.log_every=5"]
  whole = tmp_path / "whole"
  cli(whole, *args)
  killed = tmp_path / "killed"
  kill_when_checkpointed(killed, "pretrain", 20, args)
  cli(killed, *args)
  a = [(r["step"], r.get("train/loss")) for r in rows(whole, "pretrain")]
  b = [(r["step"], r.get("train/loss")) for r in rows(killed, "pretrain")]
  assert a == b  # bit for bit on CPU: same batches, same keys, same programs
  sa = json.loads((whole / "summary.json").read_text())["pretrain"]
  sb = json.loads((killed / "summary.json").read_text())["pretrain"]
  assert sa["eval/lm_loss"] == sb["eval/lm_loss"]


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_ppo_kill_9_then_resume_matches_uninterrupted_run(prepared, tmp_path, advantage):
  # Adaptive KL so the resumed run must also restore the KL coefficient. GRPO: a state with no value model.
  args = ["--config.stages=ppo", "--config.ppo.iterations=16", "--config.ppo.checkpoint_every=4",
          "--config.ppo.eval_every=0", "--config.ppo.kl_adaptive=true", "--config.ppo.kl_target=0.5",
          "--config.ppo.kl_horizon=100", f"--config.ppo.advantage={advantage}"]
  if advantage == "grpo":
    args += ["--config.ppo.samples_per_prompt=2", "--config.ppo.prompts_per_iteration=4"]
  whole, killed = tmp_path / "whole", tmp_path / "killed"
  shutil.copytree(prepared, whole)
  shutil.copytree(prepared, killed)
  cli(whole, *args)
  kill_when_checkpointed(killed, "ppo", 4, args)
  cli(killed, *args)
  a, b = rows(whole, "ppo"), rows(killed, "ppo")
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for ra, rb in zip(a, b):
    for k in set(ra) - {"stage"}:
      assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (ra["step"], k)
  coefs = [r["train/kl_coef"] for r in a if "train/kl_coef" in r]
  assert len(set(coefs)) > 1  # the adaptive controller moved
  sa = json.loads((whole / "summary.json").read_text())["ppo"]
  sb = json.loads((killed / "summary.json").read_text())["ppo"]
  assert sa["ppo/kl_coef"] == pytest.approx(sb["ppo/kl_coef"], rel=1e-6)


# Two tiny rounds of configs/iterated.py.
ROUNDS = [f"--config={ROOT}/configs/iterated.py:2", "--config.pretrain.steps=30", "--config.pretrain.batch_size=16",
          "--config.sft.steps=10", "--config.sft.batch_size=16", "--config.evaluation.num_prompts=16",
          "--config.evaluation.lm_loss_batches=1"]
for _r in (1, 2):
  ROUNDS += [f"--config.label_{_r}.num_prompts=24", f"--config.reward_{_r}.steps=6", f"--config.reward_{_r}.batch_size=8",
             f"--config.reward_{_r}.normalize_samples=16", f"--config.ppo_{_r}.iterations=8",
             f"--config.ppo_{_r}.prompts_per_iteration=8", f"--config.ppo_{_r}.checkpoint_every=2",
             f"--config.ppo_{_r}.log_every=1", f"--config.ppo_{_r}.eval_every=0"]
ROUNDS += ["--config.label_3.num_prompts=16"]


def test_iterated_rounds_kill_9_in_round_2_resumes_identically(tmp_path):
  def run(workdir, *args):
    proc = subprocess.run([sys.executable, "-m", "rlhf_jax", f"--workdir={workdir}", *ROUNDS, *args],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc

  round_1 = tmp_path / "round_1"
  run(round_1, "--config.stages=tokenizer,pretrain,sft,label_1,reward_1,ppo_1")
  whole, killed = tmp_path / "whole", tmp_path / "killed"
  shutil.copytree(round_1, whole)
  shutil.copytree(round_1, killed)
  run(whole)
  kill_when_checkpointed(killed, "ppo_2", 4, [], base=ROUNDS)
  proc = run(killed)
  assert "ppo_1: already finished" in proc.stdout and "reward_2: already finished" in proc.stdout
  for stage in ("ppo_2", "label_3", "eval"):
    assert rows(whole, stage) == rows(killed, stage), stage
  summary = json.loads((whole / "summary.json").read_text())
  untimed = lambda d: {k: v for k, v in d.items() if not k.startswith("time/")}  # noqa: E731
  assert untimed(json.loads((killed / "summary.json").read_text())["eval"]) == untimed(summary["eval"])
  # Round 2 read both rounds' comparisons and continued round 1's models.
  assert {"ppo_1/eval/gold_reward", "ppo_2/eval/gold_reward", "sft/eval/gold_reward"} <= set(summary["eval"])
  assert "label/rm_accuracy" in summary["label_2"] and "label/rm_accuracy" in summary["label_3"]
  assert "label/rm_accuracy" not in summary["label_1"]
