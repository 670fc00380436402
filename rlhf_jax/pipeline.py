"""Runs the stages a config lists, in order, in one workdir; resumes; records config and summary.

A stage is finished when ``WORKDIR/STAGE/DONE.json`` exists (written last,
atomically); finished stages are skipped on a re-run, an interrupted stage
resumes from its own last checkpoint. A workdir made by a different config is
refused (only ``stages`` may differ), so results stay traceable to one config.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable

from ml_collections import ConfigDict

from rlhf_jax import sharding
from rlhf_jax.atomic_file import write_atomic
from rlhf_jax.config_io import ConfigError, config_to_json
from rlhf_jax.defaults import ALL_STAGES
from rlhf_jax.metrics import MetricsWriter
from rlhf_jax.stages import context as context_lib


def stage_runners() -> dict[str, Callable[[context_lib.StageContext], dict]]:
  """Stage name -> ``run(ctx) -> final metrics``."""
  from rlhf_jax.stages import evaluate, label, ppo, pretrain, reward, sft, tokenizer
  return {"tokenizer": tokenizer.run, "pretrain": pretrain.run, "sft": sft.run, "label": label.run,
          "reward": reward.run, "ppo": ppo.run, "eval": evaluate.run}


def parse_stages(text: str) -> list[str]:
  """``"pretrain,sft"`` -> ``["pretrain", "sft"]``; unknown names raise ``ConfigError``."""
  stages = [s.strip() for s in text.split(",") if s.strip()]
  unknown = [s for s in stages if s not in ALL_STAGES]
  if unknown:
    raise ConfigError(f"config.stages names unknown stage(s) {unknown}; known: {list(ALL_STAGES)}")
  if not stages:
    raise ConfigError("config.stages is empty")
  return stages


# Keys that may change between runs in one workdir: which stages, and where they run
# (a checkpoint restores onto any mesh).
FREE_KEYS = ("stages", "mesh", "sharding", "distributed")


def check_or_write_config(config: ConfigDict, workdir: str) -> None:
  """Writes ``config.json``, or checks an existing one against this config.

  Besides ``FREE_KEYS``, only the sections of stages that have not started yet
  (no ``WORKDIR/STAGE``) may differ, so one SFT and RM can serve several PPO
  settings; anything that shaped finished work must match.
  """
  path = os.path.join(workdir, "config.json")
  resolved = json.loads(config_to_json(config))
  if os.path.exists(path):
    with open(path) as f:
      try:
        previous = json.load(f)
      except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); it was not written by rlhf-jax") from e
    free = set(FREE_KEYS) | {s for s in ALL_STAGES if not os.path.exists(os.path.join(workdir, s))}
    diffs = sorted(d for d in _diff(previous, resolved) if d.split(".", 1)[0].split(" ", 1)[0] not in free)
    if diffs:
      raise ConfigError(f"workdir {workdir} was made by a different config (differs at {', '.join(diffs[:8])}); "
                        "use a new --workdir, or the same config to resume")
  write_atomic(path, json.dumps(resolved, indent=2, sort_keys=True))


def _diff(a, b, prefix=""):
  if isinstance(a, dict) and isinstance(b, dict):
    for k in set(a) | set(b):
      yield from _diff(a.get(k), b.get(k), f"{prefix}{k}.")
  elif a != b:
    yield f"{prefix[:-1]} ({a!r} -> {b!r})"


def run(config: ConfigDict, workdir: str) -> dict:
  """Runs ``config.stages`` in ``workdir``; returns ``summary.json``'s content."""
  stages = parse_stages(config.stages)
  # Orbax and TFDS log routine notes (read-only restores, progress bars) at WARNING.
  logging.getLogger("absl").setLevel(logging.ERROR)
  sharding.maybe_initialize_distributed(config.distributed)
  import jax  # after distributed init
  primary = jax.process_index() == 0
  if primary:
    check_or_write_config(config, workdir)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  runners = stage_runners()
  with MetricsWriter(workdir, is_primary=primary) as metrics:
    ctx = context_lib.StageContext(config=config, workdir=workdir, mesh=mesh, metrics=metrics)
    for stage in stages:
      done = os.path.join(workdir, stage, "DONE.json")
      if os.path.exists(done):
        logging.info("stage %s already finished (%s): skipped", stage, done)
        print(f"[rlhf-jax] {stage}: already finished, skipped", flush=True)
        continue
      print(f"[rlhf-jax] {stage}: running", flush=True)
      start = time.time()
      final = runners[stage](ctx) or {}
      final = {**final, "time/stage_seconds": round(time.time() - start, 2)}
      metrics.write_summary(stage, final)
      if primary:
        write_atomic(done, json.dumps(final, indent=2, sort_keys=True))
      context_lib.sync(f"done-{stage}")
      print(f"[rlhf-jax] {stage}: done in {time.time() - start:.1f}s "
            + " ".join(f"{k}={v:.4g}" for k, v in final.items() if k.startswith("eval/")), flush=True)
  summary_path = os.path.join(workdir, "summary.json")
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      return json.load(f)
  return {}
