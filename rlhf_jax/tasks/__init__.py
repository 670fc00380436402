"""Built-in tasks with hidden gold rewards and simulated labelers.

``get(name, seed, **options)`` returns a task; every task offers
``pretraining_text``, ``demonstrations``, ``prompts`` (splits "train" and
"test", with disjoint prompts), ``gold_score``/``gold_scores``, ``rank``
(a Plackett-Luce labeler) and ``labeler_agreement``. All data is a pure
function of the seed.
"""

from __future__ import annotations

import dataclasses

from rlhf_jax.tasks.arithmetic import ArithmeticTask
from rlhf_jax.tasks.base import SPLITS, Task, TaskOptions
from rlhf_jax.tasks.instruct import InstructTask
from rlhf_jax.tasks.labeler import pairwise_agreement, ranking_scores, sample_ranking, score_agreement

__all__ = ["ArithmeticTask", "InstructTask", "SPLITS", "Task", "TaskOptions",
           "get", "names", "pairwise_agreement", "ranking_scores", "sample_ranking", "score_agreement"]

# The first entry is the default task.
_TASKS: dict[str, type[Task]] = {
    InstructTask.name: InstructTask,
    ArithmeticTask.name: ArithmeticTask,
}


def names() -> list[str]:
  """Names of the built-in tasks, the default first."""
  return list(_TASKS)


def get(name: str, seed: int = 0, **options) -> Task:
  """The task ``name`` with data drawn from ``seed``.

  Raises ValueError for an unknown task and TypeError for an option the task
  does not have; invalid option values raise ValueError.
  """
  if name not in _TASKS:
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(_TASKS)}")
  cls = _TASKS[name]
  known = [f.name for f in dataclasses.fields(cls.Options)]
  unknown = sorted(set(options) - set(known))
  if unknown:
    raise TypeError(f"task {name!r} has no option {', '.join(map(repr, unknown))}; "
                    f"its options: {', '.join(known)}")
  return cls(seed, cls.Options(**options))
