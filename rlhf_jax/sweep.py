"""Hyperparameter sweeps on Optuna: every trial an ordinary, resumable run; shared upstream stages run once.

A config file may define ``get_sweep(arg)`` returning a mapping:

  sampler:   "grid" | "random" | "tpe"
  params:    {dotted config key: [values]} (grid, or categorical) or {key: {"low", "high", "log"}}
  metric:    "INSTANCE:METRIC" read from the trial's summary.json, e.g. "eval:ppo/eval/gold_reward"
  direction: "maximize" | "minimize"
  n_trials:  trials for random/tpe (grid: every point)

Trials run as ``python -m rlhf_jax --config=SPEC --workdir=DIR/trials/KEY --config.k=v ...`` in a
subprocess, in a workdir named by its parameters, so a trial retried after a crash resumes where it
stopped. Stage instances that no swept key reaches (not the instance whose section holds the key,
nor anything downstream of it) run once in ``DIR/shared`` and are copied (hard links) into each
trial, so a KL sweep trains SFT and the RM once. The study lives in SQLite under DIR unless
``storage`` names another database (PostgreSQL, MySQL: workers on several machines share it);
heartbeats mark the trials of a crashed worker failed and re-queue them with the same parameters,
and a finished trial is never run again.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence

from ml_collections import ConfigDict

from rlhf_jax.config_io import ConfigError, load_config
from rlhf_jax.stages import graph

SAMPLERS = ("grid", "random", "tpe")
HEARTBEAT_S = 5
GRACE_S = 15
STUDY_NAME = "sweep"


def load_sweep(spec: str) -> dict[str, Any]:
  """The ``get_sweep(arg)`` of config file ``path.py[:arg]``, checked."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(f"_rlhf_jax_sweep_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ConfigError(f"{path} has no get_sweep(arg) function: nothing to sweep")
  sweep = dict(module.get_sweep(arg or None))
  if sweep.get("sampler", "grid") not in SAMPLERS:
    raise ConfigError(f"{path}: get_sweep sampler must be one of {SAMPLERS}, got {sweep.get('sampler')!r}")
  if not sweep.get("params"):
    raise ConfigError(f"{path}: get_sweep has no params")
  if ":" not in sweep.get("metric", ""):
    raise ConfigError(f"{path}: get_sweep metric must be 'INSTANCE:METRIC', got {sweep.get('metric')!r}")
  sweep.setdefault("sampler", "grid")
  sweep.setdefault("direction", "maximize")
  config = load_config(spec)
  for key in sweep["params"]:
    node = config
    for part in key.split("."):
      if not isinstance(node, ConfigDict) or part not in node:
        raise ConfigError(f"{path}: get_sweep param {key!r} is not a config key")
      node = node[part]
  return sweep


def grid_points(params: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Every point of a grid (lists of values per key), in order."""
  points = [{}]
  for key, values in params.items():
    if not isinstance(values, (list, tuple)):
      raise ConfigError(f"grid sweep param {key!r} needs a list of values, got {values!r}")
    points = [{**p, key: v} for p in points for v in values]
  return points


def affected_instances(config: ConfigDict, keys: Sequence[str]) -> set[str]:
  """Instances a change of ``keys`` reaches: those whose section holds a key, and everything downstream.

  A key outside every instance section (seed, model, data, ...) reaches every instance.
  """
  instances = graph.instances(config)
  roots = {k.split(".", 1)[0] for k in keys}
  if roots - set(instances):
    return set(instances)
  reached = set(roots)
  changed = True
  while changed:
    changed = False
    for name, inst in instances.items():
      # An eval instance with no explicit policies evaluates whatever finished: always downstream.
      implicit = inst.kind.name == "eval" and not inst.section.policies
      if name not in reached and (implicit or any(set(v) & reached for v in inst.dependencies().values())):
        reached.add(name)
        changed = True
  return reached


def upstream_stages(config: ConfigDict, keys: Sequence[str]) -> list[str]:
  """The listed instances (in ``config.stages`` order) that no swept key reaches."""
  affected = affected_instances(config, keys)
  return [inst.name for inst in graph.parse_stages(config) if inst.name not in affected]


def trial_key(params: Mapping[str, Any]) -> str:
  """A stable, readable directory name for a parameter set."""
  text = json.dumps(params, sort_keys=True, default=str)
  readable = "_".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(params.items()))
  safe = "".join(c if c.isalnum() or c in "._=-" else "-" for c in readable)[:80]
  return f"{safe}_{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def override_args(params: Mapping[str, Any]) -> list[str]:
  return [f"--config.{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in params.items()]


class Sweep:
  """One sweep directory: its study, the shared upstream workdir and the trials."""

  def __init__(self, spec: str, workdir: str, storage: str | None = None, extra_args: Sequence[str] = ()):
    self.spec, self.workdir, self.extra_args = spec, os.path.abspath(workdir), list(extra_args)
    self.sweep = load_sweep(spec)
    os.makedirs(self.workdir, exist_ok=True)
    self.storage_url = storage or f"sqlite:///{os.path.join(self.workdir, 'study.db')}"
    self.config = load_config(spec)
    self.upstream = upstream_stages(self.config, list(self.sweep["params"]))

  # --- study -------------------------------------------------------------------

  def storage(self):
    import optuna
    # A trial of a dead worker goes back to the queue with the same parameters (and resumes its workdir).
    return optuna.storages.RDBStorage(
        self.storage_url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))

  def sampler(self):
    import optuna
    kind, params = self.sweep["sampler"], self.sweep["params"]
    if kind == "grid":
      return optuna.samplers.GridSampler({k: list(v) for k, v in params.items()}, seed=0)
    if kind == "random":
      return optuna.samplers.RandomSampler(seed=0)
    return optuna.samplers.TPESampler(seed=0)

  def study(self):
    import warnings
    import optuna
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna.create_study(study_name=STUDY_NAME, storage=self.storage(), sampler=self.sampler(),
                               direction=self.sweep["direction"], load_if_exists=True)

  def n_trials(self) -> int:
    if self.sweep["sampler"] == "grid":
      return len(grid_points(self.sweep["params"]))
    return int(self.sweep.get("n_trials", 8))

  def suggest(self, trial) -> dict[str, Any]:
    params = {}
    for key, space in self.sweep["params"].items():
      if isinstance(space, (list, tuple)):
        params[key] = trial.suggest_categorical(key, list(space))
      elif isinstance(space.get("low"), int) and isinstance(space.get("high"), int):
        params[key] = trial.suggest_int(key, space["low"], space["high"], log=space.get("log", False))
      else:
        params[key] = trial.suggest_float(key, space["low"], space["high"], log=space.get("log", False))
    return params

  # --- running -------------------------------------------------------------------

  def _cli(self, workdir: str, args: Sequence[str], env: Mapping[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "rlhf_jax", f"--config={self.spec}", f"--workdir={workdir}",
           *self.extra_args, *args]
    log = os.path.join(workdir + ".log")
    with open(log, "a") as f:
      proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if proc.returncode:
      raise RuntimeError(f"run failed (exit {proc.returncode}): {' '.join(cmd)}; {log} ends with:\n"
                         + log_tail(log))

  def prepare_shared(self, env: Mapping[str, str] | None = None) -> str:
    """Runs the upstream instances once in DIR/shared (one worker at a time; the others wait)."""
    shared = os.path.join(self.workdir, "shared")
    if not self.upstream:
      return shared
    with open(os.path.join(self.workdir, "shared.lock"), "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if not all(graph.finished(shared, n) for n in self.upstream):
        self._cli(shared, [f"--config.stages={','.join(self.upstream)}"], env)
    return shared

  def trial_workdir(self, params: Mapping[str, Any]) -> str:
    """DIR/trials/KEY, created from the shared upstream workdir (hard links; copies of the files runs append to)."""
    path = os.path.join(self.workdir, "trials", trial_key(params))
    if os.path.isdir(path) or not self.upstream:
      return path
    shared = os.path.join(self.workdir, "shared")
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in os.listdir(shared):
      src, dst = os.path.join(shared, name), os.path.join(tmp, name)
      if name in self.upstream or name == "data":
        shutil.copytree(src, dst, copy_function=os.link)
      elif os.path.isfile(src) and name in ("config.json", "metrics.jsonl", "summary.json"):
        shutil.copy2(src, dst)
    os.replace(tmp, path)
    return path

  def objective(self, trial, env: Mapping[str, str] | None = None) -> float:
    import optuna
    params = self.suggest(trial)
    # A re-queued point can also be drawn again by the grid sampler, and two workers can draw the same
    # point at once: the later trial gives way (pruned, before any work) to the earlier one.
    for other in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                               optuna.trial.TrialState.RUNNING)):
      if other.number < trial.number and other.params == params:
        raise optuna.TrialPruned(f"same parameters as trial {other.number}")
    self.prepare_shared(env)
    workdir = self.trial_workdir(params)
    trial.set_user_attr("workdir", workdir)
    # One process per trial workdir: a trial re-queued while its first run still lives (its heartbeat
    # looked stale on a starved machine) waits here, then finds the run finished.
    with open(workdir + ".lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      self._cli(workdir, override_args(params), env)
    with open(os.path.join(workdir, "summary.json")) as f:
      summary = json.load(f)
    instance, metric = self.sweep["metric"].split(":", 1)
    if metric not in summary.get(instance, {}):
      raise RuntimeError(f"metric {self.sweep['metric']} is not in {workdir}/summary.json")
    value = float(summary[instance][metric])
    trial.set_user_attr("summary", {k: v for k, v in summary.get(instance, {}).items()
                                    if isinstance(v, (int, float)) and ("/eval/" in k or k.startswith("eval/"))})
    return value

  def recover(self) -> None:
    """Before workers start: fails trials left RUNNING by a dead worker (stale heartbeat) so they are
    re-queued, and queues again every grid point whose trials all failed (the grid sampler counts a
    failed point as visited): a re-run of the sweep retries it, resuming its workdir."""
    import optuna
    study = self.study()
    running = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    if running:
      time.sleep(GRACE_S + 1)
      optuna.storages.fail_stale_trials(study)
      # No worker runs yet, so a trial still RUNNING is dead too: one killed before its first heartbeat is
      # never stale. Left RUNNING, it would make a re-queued trial of its point give way to it (objective).
      # Told through a study without the sweep's sampler: the grid sampler's after_trial reads the trial's
      # grid id, which a worker killed between creating the trial and sampling it never wrote.
      plain = optuna.load_study(study_name=STUDY_NAME, storage=self.storage(),
                                sampler=optuna.samplers.RandomSampler())
      for t in plain.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        plain.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    if self.sweep["sampler"] != "grid":
      return
    sampler = study.sampler

    def given_point(t) -> dict:
      # A queued trial holds its parameters as "fixed_params" until a worker takes it. A worker killed after
      # the trial got its point (queued, or the grid sampler's grid id) but before the objective suggested it
      # leaves no params; the sampler counts a grid id as visited, so only a re-queue runs that point again.
      if t.params or "fixed_params" in t.system_attrs:
        return t.params or t.system_attrs["fixed_params"]
      # The grid order (shuffled by the sampler's seed) is only on the sampler; an Optuna without these
      # attributes leaves such a point unqueued, as before, rather than stopping the re-run.
      names, grids = getattr(sampler, "_param_names", None), getattr(sampler, "_all_grids", None)
      if "grid_id" in t.system_attrs and names is not None and grids is not None:
        return dict(zip(names, grids[t.system_attrs["grid_id"]]))
      return {}

    live = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
    covered = [given_point(t) for t in study.get_trials(deepcopy=False, states=live)]
    failed = [given_point(t) for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))]
    for point in grid_points(self.sweep["params"]):
      if point in failed and point not in covered:
        study.enqueue_trial(point)

  def failures(self) -> list[str]:
    """Why each failed trial failed: its parameters and its log's last lines."""
    import optuna
    out = []
    for t in self.study().get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
      log = os.path.join(self.workdir, "trials", trial_key(t.params) + ".log")
      out.append(f"trial {t.number} {t.params} failed; {log} ends with:\n{log_tail(log)}")
    return out

  def work(self, env: Mapping[str, str] | None = None) -> None:
    """One worker: takes trials until the study has ``n_trials`` finished ones."""
    import optuna
    from optuna.study import MaxTrialsCallback
    study = self.study()
    for _ in range(3):
      try:
        study.optimize(lambda t: self.objective(t, env), callbacks=[
            MaxTrialsCallback(self.n_trials(), states=(optuna.trial.TrialState.COMPLETE,))],
            catch=(RuntimeError,), n_trials=self.n_trials() * 4)
        return
      except ValueError as e:
        # A live trial whose heartbeat looked stale on a starved machine was failed and re-queued by
        # another worker; its finished workdir makes the retry immediate, so carry on.
        if "Cannot tell" not in str(e):
          raise

  def remaining(self) -> int:
    import optuna
    done = [t for t in self.study().get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    return max(self.n_trials() - len(done), 0)

  # --- results -------------------------------------------------------------------

  def write_results(self) -> list[dict[str, Any]]:
    """DIR/sweep.csv (every trial) and DIR/sweep.md (finished trials, best first); returns the rows."""
    import optuna
    trials = self.study().get_trials(deepcopy=False)
    keys = list(self.sweep["params"])
    rows = []
    for t in trials:
      row = {"trial": t.number, "state": t.state.name, **{k: t.params.get(k) for k in keys},
             "value": t.value, "workdir": t.user_attrs.get("workdir", "")}
      row.update({k: v for k, v in t.user_attrs.get("summary", {}).items()})
      rows.append(row)
    columns = ["trial", "state", *keys, "value", *sorted({k for r in rows for k in r} - {"trial", "state", "value",
                                                                                        "workdir", *keys}), "workdir"]
    with open(os.path.join(self.workdir, "sweep.csv"), "w", newline="") as f:
      writer = csv.DictWriter(f, columns)
      writer.writeheader()
      writer.writerows(rows)
    done = [r for r in rows if r["state"] == optuna.trial.TrialState.COMPLETE.name]
    done.sort(key=lambda r: r["value"], reverse=self.sweep["direction"] == "maximize")
    metrics = [c for c in columns if c.endswith(("gold_reward", "rm_reward", "/kl", "win_rate_vs_sft"))
               and self.sweep["metric"].split(":", 1)[1].split("/eval/")[0] in c]
    head = ["trial", *keys, self.sweep["metric"], *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in done:
      cells = [str(r["trial"]), *[str(r[k]) for k in keys], _fmt(r["value"]), *[_fmt(r.get(m)) for m in metrics]]
      lines.append("| " + " | ".join(cells) + " |")
    with open(os.path.join(self.workdir, "sweep.md"), "w") as f:
      f.write(f"# Sweep of {self.spec} ({self.sweep['sampler']}, {self.sweep['direction']} {self.sweep['metric']})\n\n"
              + "\n".join(lines) + "\n")
    return rows


def log_tail(path: str, lines: int = 15) -> str:
  """The last ``lines`` lines of a text file ("" if it does not exist)."""
  try:
    with open(path, errors="replace") as f:
      return "".join(f.readlines()[-lines:])
  except OSError:
    return ""


def _fmt(value) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  return f"{value:.4g}" if isinstance(value, float) else str(value)


def worker_env(worker: int, parallel: int) -> dict[str, str]:
  """Whole accelerators per worker: with k visible GPUs, worker i gets its own k // parallel of them."""
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    gpus = [line for line in out.splitlines() if line.startswith("GPU ")]
  except (OSError, subprocess.SubprocessError):
    gpus = []
  if not gpus:
    return {}
  per = len(gpus) // parallel
  if per < 1:
    raise ConfigError(f"--parallel={parallel} workers but only {len(gpus)} GPUs: two trials would share one")
  return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(worker * per, (worker + 1) * per))}
