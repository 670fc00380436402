"""One scorer interface for rollouts: a learned reward model or the task's hidden gold score.

A scorer maps a rollout (and its prompt and response texts) to one score per
row, [B] float32. ``RewardModelScorer`` reads tokens on the device and returns a
device array (so PPO never leaves the device); ``GoldScorer`` reads the texts on
the host. Label, reward normalisation, PPO, eval and every later algorithm
score through this interface.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Protocol, Sequence

import jax
import numpy as np
from flax import nnx

from rlhf_jax.rollout import Rollout

Array = jax.Array


def reward_scores(graphdef: nnx.GraphDef, params, tokens: Array, mask: Array,
                  dropout_key: Array | None = None, shared_prefix: tuple[int, int] | None = None) -> Array:
  """Scores [B] float32 of a ``ScalarModel`` on full sequences tokens, mask [B, T] (read at the last real
  token); ``shared_prefix``: see ``Trunk``."""
  return nnx.merge(graphdef, params)(tokens, mask, dropout_key, shared_prefix)


class Scorer(Protocol):
  """``scorer(rollout, prompts, responses) -> scores [B]``."""

  name: str

  def __call__(self, rollout: Rollout, prompts: Sequence[str] | None = None,
               responses: Sequence[str] | None = None) -> Array | np.ndarray:
    ...


@functools.lru_cache(maxsize=16)
def _score_fn(graphdef: nnx.GraphDef) -> Callable[[Any, Rollout], Array]:
  """Jitted ``score(params, rollout) -> [B]``, one per model shape in a process (shared by every scorer)."""
  return jax.jit(lambda p, r: reward_scores(graphdef, p, r.tokens, r.mask, shared_prefix=r.shared_prefix))


class RewardModelScorer:
  """A frozen reward model; jitted once per rollout shape; texts are not needed."""

  name = "rm"

  def __init__(self, graphdef: nnx.GraphDef, params):
    self.graphdef = graphdef
    self.params = params
    self._score = _score_fn(graphdef)

  def __call__(self, rollout: Rollout, prompts: Sequence[str] | None = None,
               responses: Sequence[str] | None = None) -> Array:
    del prompts, responses
    return self._score(self.params, rollout)


class GoldScorer:
  """The task's hidden gold score (monitoring and evaluation only; nothing trains on it)."""

  name = "gold"

  def __init__(self, task):
    self.task = task

  def __call__(self, rollout: Rollout | None, prompts: Sequence[str] | None = None,
               responses: Sequence[str] | None = None) -> np.ndarray:
    del rollout
    if prompts is None or responses is None:
      raise ValueError("the gold scorer reads prompt and response texts")
    return np.asarray(self.task.gold_scores(list(prompts), list(responses)), np.float32)
