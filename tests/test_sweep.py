"""Sweeps: grid expansion, which stages are shared, and a crash mid-sweep with parallel workers on SQLite."""

import contextlib
import json
import os
import pathlib
import signal
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest

from rlhf_jax import sweep
from rlhf_jax.config_io import ConfigError, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY_SWEEP = f'''
import importlib.util
_spec = importlib.util.spec_from_file_location("sweep_kl", "{ROOT}/configs/sweep_kl.py")
_kl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_kl)


def get_config(arg=None):
  c = _kl.get_config(arg)
  c.pretrain.update(dict(steps=6, batch_size=8, log_every=3))
  c.sft.update(dict(steps=4, batch_size=8, log_every=2))
  c.label.update(dict(num_prompts=8, k=2))
  c.reward.update(dict(steps=4, batch_size=4, log_every=2, normalize_samples=8))
  c.evaluation.update(dict(num_prompts=8, lm_loss_batches=1))
  c.ppo.update(dict(iterations=3, prompts_per_iteration=4, log_every=1, checkpoint_every=1))
  return c


def get_sweep(arg=None):
  return dict(sampler="grid", params={{"ppo.kl_coef": [0.0, 0.1, 0.3]}}, metric="eval:ppo/eval/gold_reward")
'''


def test_grid_and_shared_upstream():
  s = sweep.load_sweep(f"{ROOT}/configs/sweep_kl.py")
  assert [p["ppo.kl_coef"] for p in sweep.grid_points(s["params"])] == [0.0, 0.02, 0.05, 0.1, 0.2]
  assert sweep.grid_points({"a.b": [1, 2], "c": ["x", "y"]}) == [
      {"a.b": 1, "c": "x"}, {"a.b": 1, "c": "y"}, {"a.b": 2, "c": "x"}, {"a.b": 2, "c": "y"}]
  config = load_config(f"{ROOT}/configs/sweep_kl.py")
  assert sweep.upstream_stages(config, ["ppo.kl_coef"]) == ["tokenizer", "pretrain", "sft", "label", "reward"]
  assert sweep.upstream_stages(config, ["reward.steps"]) == ["tokenizer", "pretrain", "sft", "label"]
  assert sweep.upstream_stages(config, ["model.d_model"]) == []
  assert sweep.trial_key({"ppo.kl_coef": 0.1}) != sweep.trial_key({"ppo.kl_coef": 0.2})


def test_bad_sweeps_are_named(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text("from rlhf_jax import defaults\n"
                  "def get_config(arg=None):\n  return defaults.base_config()\n"
                  "def get_sweep(arg=None):\n  return dict(params={'ppo.kl_coeff': [0.1]}, metric='eval:x')\n")
  with pytest.raises(ConfigError, match="'ppo.kl_coeff' is not a config key"):
    sweep.load_sweep(str(path))
  with pytest.raises(ConfigError, match="no get_sweep"):
    sweep.load_sweep(f"{ROOT}/configs/quickstart.py")


def _any_completed(workdir) -> bool:
  """Reads the sweep's SQLite file read-only: opening it through Optuna while the coordinator is still
  creating the schema races it on the version row (IntegrityError)."""
  db = workdir / "study.db"
  if not db.exists():
    return False
  try:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
      return conn.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0] > 0
  except sqlite3.OperationalError:  # the schema is not written yet
    return False


def _completed(workdir):
  study = optuna.load_study(study_name=sweep.STUDY_NAME, storage=f"sqlite:///{workdir}/study.db")
  return [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]


def test_crash_mid_sweep_then_resume_with_parallel_workers(tmp_path):
  config = tmp_path / "tiny_sweep.py"
  config.write_text(TINY_SWEEP)
  workdir = tmp_path / "sweep"
  cmd = [sys.executable, f"{ROOT}/experiments/sweep.py", f"--config={config}", f"--workdir={workdir}",
         "--parallel=2"]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if _any_completed(workdir):
      break
    time.sleep(1)
  assert proc.poll() is None, "the sweep finished before it could be killed"
  os.killpg(proc.pid, signal.SIGKILL)  # the coordinator and both workers, mid-trial
  proc.wait()
  first = {t.params["ppo.kl_coef"] for t in _completed(workdir)}
  assert 1 <= len(first) < 3
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  completed = _completed(workdir)
  assert sorted(t.params["ppo.kl_coef"] for t in completed) == [0.0, 0.1, 0.3]  # none lost, none twice
  for t in completed:
    trial = pathlib.Path(t.user_attrs["workdir"])
    rows = [json.loads(line) for line in (trial / "metrics.jsonl").read_text().splitlines()]
    ppo_steps = [r["step"] for r in rows if r["stage"] == "ppo" and "train/policy_loss" in r]
    assert ppo_steps == [1, 2, 3]  # a trial interrupted mid-PPO resumed; no step replayed twice
    # Upstream stages ran once, in the shared workdir, and were linked into every trial.
    assert os.path.samefile(trial / "sft" / "DONE.json", workdir / "shared" / "sft" / "DONE.json")
    assert t.value == json.loads((trial / "summary.json").read_text())["eval"]["ppo/eval/gold_reward"]
  shared_rows = [json.loads(line) for line in (workdir / "shared" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in shared_rows if r["stage"] == "pretrain" and "train/loss" in r] == [3, 6]
  table = (workdir / "sweep.md").read_text()
  assert table.count("\n| ") == 2 + 3 and "kl_coef" in table  # header, rule, 3 trials
  assert (workdir / "sweep.csv").exists()


def test_rerun_requeues_failed_grid_points_only(tmp_path):
  config = tmp_path / "tiny_sweep.py"
  config.write_text(TINY_SWEEP)
  s = sweep.Sweep(str(config), str(tmp_path / "sweep"))
  s.recover()  # a first run queues nothing: the grid sampler draws the points
  study = s.study()
  assert study.get_trials() == []
  dist = optuna.distributions.CategoricalDistribution([0.0, 0.1, 0.3])
  for value, state in ((0.0, optuna.trial.TrialState.FAIL), (0.1, optuna.trial.TrialState.FAIL),
                       (0.1, optuna.trial.TrialState.COMPLETE), (0.3, optuna.trial.TrialState.COMPLETE)):
    study.add_trial(optuna.trial.create_trial(params={"ppo.kl_coef": value}, distributions={"ppo.kl_coef": dist},
                                              state=state,
                                              value=1.0 if state == optuna.trial.TrialState.COMPLETE else None))
  s.recover()
  waiting = s.study().get_trials(states=(optuna.trial.TrialState.WAITING,))
  assert [t.system_attrs["fixed_params"] for t in waiting] == [{"ppo.kl_coef": 0.0}]  # failed and never finished; 0.1 finished later
  s.recover()
  assert len(s.study().get_trials(states=(optuna.trial.TrialState.WAITING,))) == 1  # queued once
  assert s.remaining() == 1


def test_rerun_fails_a_trial_killed_before_its_first_heartbeat(tmp_path, monkeypatch):
  """A worker killed between creating a trial and its first heartbeat leaves it RUNNING and never stale. A
  re-run fails it and queues its point again, so a retry does not give way to a dead trial."""
  monkeypatch.setattr(sweep.time, "sleep", lambda seconds: None)  # the grace period before stale checks
  config = tmp_path / "tiny_sweep.py"
  config.write_text(TINY_SWEEP)
  s = sweep.Sweep(str(config), str(tmp_path / "sweep"))
  study = s.study()
  dist = optuna.distributions.CategoricalDistribution([0.0, 0.1, 0.3])
  for value in (0.1, 0.3):
    study.add_trial(optuna.trial.create_trial(params={"ppo.kl_coef": value}, distributions={"ppo.kl_coef": dist},
                                              value=1.0))
  dead = study.ask()  # RUNNING, with no heartbeat recorded
  dead.suggest_categorical("ppo.kl_coef", [0.0, 0.1, 0.3])
  s.recover()
  states = {t.number: t.state for t in s.study().get_trials()}
  assert states[dead.number] == optuna.trial.TrialState.FAIL
  waiting = s.study().get_trials(states=(optuna.trial.TrialState.WAITING,))
  assert [t.system_attrs["fixed_params"] for t in waiting] == [{"ppo.kl_coef": dead.params["ppo.kl_coef"]}]


def _two_grid_points_done(tmp_path, monkeypatch):
  """The tiny sweep with two of its three points run to the end through the grid sampler -> (sweep, study,
  the two points); sleeps (the grace period before stale checks) skipped."""
  monkeypatch.setattr(sweep.time, "sleep", lambda seconds: None)
  config = tmp_path / "tiny_sweep.py"
  config.write_text(TINY_SWEEP)
  s = sweep.Sweep(str(config), str(tmp_path / "sweep"))
  study = s.study()
  done = []
  for _ in range(2):
    trial = study.ask()
    done.append(s.suggest(trial))
    study.tell(trial, 1.0)
  return s, study, done


def test_rerun_fails_a_trial_killed_before_the_grid_sampler_gave_it_a_point(tmp_path, monkeypatch):
  """A worker killed between creating a trial and sampling it leaves a RUNNING trial with no grid point. With
  one point left, failing it through the grid sampler raised KeyError('grid_id') and stopped the re-run."""
  s, study, _ = _two_grid_points_done(tmp_path, monkeypatch)
  dead = study._storage.create_new_trial(study._study_id)  # RUNNING, not yet sampled
  s.recover()
  assert s.study()._storage.get_trial(dead).state == optuna.trial.TrialState.FAIL
  assert s.remaining() == 1  # the third point is still to run


def test_rerun_queues_the_point_of_a_trial_killed_before_it_suggested_it(tmp_path, monkeypatch):
  """Killed after the grid sampler gave a trial its point (the grid id) but before the objective suggested
  it: the trial holds no params and the sampler counts the point as visited, so the re-run queues it."""
  s, study, done = _two_grid_points_done(tmp_path, monkeypatch)
  dead = study.ask()  # RUNNING with its grid id, no params
  s.recover()
  assert s.study().trials[dead.number].state == optuna.trial.TrialState.FAIL
  waiting = s.study().get_trials(states=(optuna.trial.TrialState.WAITING,))
  (point,) = [p for p in sweep.grid_points(s.sweep["params"]) if p not in done]
  assert [t.system_attrs["fixed_params"] for t in waiting] == [point]
