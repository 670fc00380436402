"""The multi-device probe scripts (sharded_train_check.py, data_parallel_check.py): how a test runs one, and
the PPO experience both build."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np

import run_once
from fake_devices import cpu_env
from rlhf_jax import sharding
from rlhf_jax.algorithms import ppo
from rlhf_jax.rollout import make_rollout_fn
from rlhf_jax.scoring import RewardModelScorer


def run_probe(script: str, devices: int) -> dict:
  """Runs ``tests/<script>`` on ``devices`` fake CPU devices in a subprocess -> the JSON it prints; once per
  test run (``run_once``), however many workers ask."""
  def compute(_) -> dict:
    proc = subprocess.run([sys.executable, str(pathlib.Path(__file__).parent / script)], env=cpu_env(devices),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)

  return run_once.once(f"probe_{pathlib.Path(script).stem}_{devices}", compute)


def shared_prompt_experience(policy_graphdef, policy, value_graphdef, value, pcfg: ppo.PPOConfig, mesh,
                             rows: int, k: int) -> ppo.Experience:
  """Experience of ``rows`` sampled rows, ``k`` per random 8-token prompt (``share_prompts``), scored by the
  value model as an RM, on ``mesh`` (default rules)."""
  prompt = np.repeat(np.random.default_rng(0).integers(4, 64, (rows // k, 8)).astype(np.int32), k, axis=0)
  batch = sharding.put_batch({"tokens": prompt, "mask": np.ones_like(prompt),
                              "group": np.repeat(np.arange(rows // k, dtype=np.int32), k)}, mesh,
                             sharding.DEFAULT_RULES)
  rollout = make_rollout_fn(policy_graphdef, pcfg.sampling, k)(policy, batch["tokens"], batch["mask"],
                                                               batch["group"], jax.random.key(0))
  rollout = ppo.share_prompts(rollout, pcfg, k)
  exp, _ = ppo.make_experience_fn(policy_graphdef, value_graphdef, pcfg)(
      policy, policy, value, rollout, RewardModelScorer(value_graphdef, value)(rollout), 0.1)
  return exp
