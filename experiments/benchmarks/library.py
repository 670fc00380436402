"""The library functions the benchmarks drive, imported from wherever the library keeps them now.

The algorithm steps are moving from ``rlhf_jax.stages`` / ``rlhf_jax.rl`` into
``rlhf_jax.algorithms``; the first module that has a name wins, so the suite
keeps timing the library's current code path.
"""

from __future__ import annotations

import importlib
import os
from typing import Any


def find(name: str, *modules: str) -> Any:
  """``getattr(module, name)`` for the first of ``modules`` that imports and has ``name``."""
  root = os.path.dirname(importlib.import_module("rlhf_jax").__file__)
  errors = []
  for module in modules:
    try:
      mod = importlib.import_module(module)
      # An editable install can resolve a submodule from another checkout than ``rlhf_jax`` itself.
      if not os.path.abspath(mod.__file__).startswith(os.path.abspath(root)):
        raise ImportError(f"{mod.__file__} is outside {root}")
      return getattr(mod, name)
    except (ImportError, AttributeError) as e:
      errors.append(f"{module}: {e}")
  raise ImportError(f"{name} not found in any of {modules}: {errors}")


def make_lm_step():
  return find("make_lm_step", "rlhf_jax.algorithms.sft", "rlhf_jax.algorithms.lm", "rlhf_jax.stages.lm")


def make_reward_step():
  return find("make_reward_step", "rlhf_jax.algorithms.reward", "rlhf_jax.stages.reward")


def ppo(name: str):
  """``PPOConfig``, ``make_experience_fn``, ``make_experience_inputs_fn``, ``make_ppo_update`` or
  ``value_head_params``."""
  return find(name, "rlhf_jax.algorithms.ppo", "rlhf_jax.rl.ppo")


def rollout_api() -> bool:
  """True when the library has ``rlhf_jax.rollout`` (experience built from a ``Rollout`` and a scorer's score);
  False for the older API (experience from a ``Sample``, the reward model run inside it)."""
  try:
    find("make_rollout_fn", "rlhf_jax.rollout")
    find("make_experience_fn", "rlhf_jax.algorithms.ppo")
    return True
  except ImportError:
    return False
