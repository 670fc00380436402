"""What every built-in task shares: options, splits, caching and labelling.

A task supplies four pieces (prompt generation, pretraining documents, a
simulated demonstrator and a gold score); this base class turns them into
the public API used by the stages.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from rlhf_jax.tasks import labeler, seeding

SPLITS = ("train", "test")
# Held-out pretraining documents and demonstrations, as a fraction of train.
TEST_FRACTION = 8


@dataclasses.dataclass(frozen=True)
class TaskOptions:
  """Options every task accepts. Sizes are counts for the train split.

  The test split has ``num_test_prompts`` prompts and 1/8 as many
  pretraining documents and demonstrations as train (at least one).
  """

  num_train_prompts: int = 1024
  num_test_prompts: int = 128
  num_pretraining_docs: int = 4096
  num_demonstrations: int = 1024
  # Plackett-Luce temperature of the simulated labeler (0: exact gold order).
  labeler_temperature: float = 0.1  # tasks set their own, see their options
  # How good the demonstrations are: 1 is near-optimal, 0 makes every
  # mistake the demonstrator knows as often as it can.
  demo_quality: float = 0.5

  def __post_init__(self):
    for field in ("num_train_prompts", "num_test_prompts",
                  "num_pretraining_docs", "num_demonstrations"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"option {field} must be a positive int, got {value!r}")
    if not self.labeler_temperature >= 0:
      raise ValueError(
          f"option labeler_temperature must be >= 0, got {self.labeler_temperature}")
    if not 0 <= self.demo_quality <= 1:
      raise ValueError(f"option demo_quality must be in [0, 1], got {self.demo_quality}")


def check_split(split: str) -> None:
  """Raises ValueError unless ``split`` is 'train' or 'test'."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


class Task(abc.ABC):
  """A prompt distribution with hidden gold reward and simulated people."""

  name: ClassVar[str]
  Options: ClassVar[type[TaskOptions]] = TaskOptions

  def __init__(self, seed: int = 0, options: TaskOptions | None = None):
    if not isinstance(seed, int | np.integer) or seed < 0:
      raise ValueError(f"task seed must be a non-negative int, got {seed!r}")
    self.seed = int(seed)
    self.opts = options if options is not None else self.Options()
    self._cache: dict[tuple[str, str], list[Any]] = {}

  # -- what each task provides --------------------------------------------

  @abc.abstractmethod
  def _make_prompts(self, split: str, count: int) -> list[str]:
    """``count`` distinct prompts of ``split``; never shared across splits."""

  @abc.abstractmethod
  def _make_pretraining_doc(self, rng: np.random.Generator) -> str:
    """One pretraining document."""

  @abc.abstractmethod
  def _demonstrate(self, prompt: str, rng: np.random.Generator) -> str:
    """The simulated demonstrator's (imperfect) response to ``prompt``."""

  @abc.abstractmethod
  def _optimal(self, prompt: str, rng: np.random.Generator) -> str:
    """A response with (near) maximal gold score."""

  @abc.abstractmethod
  def gold_score(self, prompt: str, response: str) -> float:
    """The hidden gold reward of ``response`` to ``prompt``."""

  # -- public API ----------------------------------------------------------

  @property
  def options(self) -> dict[str, Any]:
    """The resolved options, for logging alongside the config."""
    return dataclasses.asdict(self.opts)

  def prompts(self, split: str) -> list[str]:
    """The distinct prompts of ``split``; train and test share none."""
    check_split(split)
    count = (self.opts.num_train_prompts if split == "train"
             else self.opts.num_test_prompts)
    return list(self._cached("prompts", split, lambda: self._make_prompts(split, count)))

  def pretraining_text(self, split: str) -> list[str]:
    """Documents in the task's language that do not teach the instruction mapping."""
    check_split(split)

    def make():
      rng = seeding.stream(self.seed, f"{self.name}/pretraining/{split}")
      return [self._make_pretraining_doc(rng)
              for _ in range(self._split_size(self.opts.num_pretraining_docs, split))]

    return list(self._cached("pretraining", split, make))

  def demonstrations(self, split: str) -> list[dict[str, str]]:
    """Demonstrator responses ``{"prompt", "response"}``, cycling over ``prompts(split)``."""
    check_split(split)

    def make():
      prompts = self.prompts(split)
      rng = seeding.stream(self.seed, f"{self.name}/demonstrations/{split}")
      count = self._split_size(self.opts.num_demonstrations, split)
      return [{"prompt": p, "response": self._demonstrate(p, rng)}
              for p in (prompts[i % len(prompts)] for i in range(count))]

    return [dict(d) for d in self._cached("demonstrations", split, make)]

  def demonstrate(self, prompt: str, seed: int = 0) -> str:
    """A fresh demonstrator response to any prompt of this task."""
    return self._demonstrate(prompt, self._prompt_stream("demonstrate", prompt, seed))

  def optimal_response(self, prompt: str, seed: int = 0) -> str:
    """A response with (near) maximal gold score: the ceiling for a policy."""
    return self._optimal(prompt, self._prompt_stream("optimal", prompt, seed))

  def gold_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """``gold_score`` of each (prompt, response) pair, as a float32 array."""
    if len(prompts) != len(responses):
      raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return np.array([self.gold_score(p, r) for p, r in zip(prompts, responses)],
                    dtype=np.float32)

  def rank(self, prompt: str, responses: Sequence[str], seed: int) -> list[int]:
    """A simulated labeler's ranking of ``responses`` (indices, best first)."""
    scores = self.gold_scores([prompt] * len(responses), responses)
    return labeler.sample_ranking(
        scores, self.opts.labeler_temperature, self._prompt_stream("rank", prompt, seed))

  def labeler_agreement(
      self, groups: Sequence[tuple[str, Sequence[str]]], seed: int = 0
  ) -> float:
    """Pairwise agreement of ``rank`` with the gold order over (prompt, responses) groups.

    Group g is ranked with seed ``seed + g``; pairs with tied gold are skipped.
    """
    scores, rankings = [], []
    for g, (prompt, responses) in enumerate(groups):
      scores.append(self.gold_scores([prompt] * len(responses), responses))
      rankings.append(self.rank(prompt, responses, seed + g))
    return labeler.pairwise_agreement(scores, rankings)

  # -- helpers -------------------------------------------------------------

  def _cached(self, kind: str, split: str, make) -> list[Any]:
    key = (kind, split)
    if key not in self._cache:
      self._cache[key] = make()
    return self._cache[key]

  def _prompt_stream(self, purpose: str, prompt: str, seed: int) -> np.random.Generator:
    # Keyed by the prompt too, so that one seed reused across prompts does not
    # give every group the same noise.
    return seeding.stream(self.seed, f"{self.name}/{purpose}", seed,
                          seeding.stable_hash(prompt))

  @staticmethod
  def _split_size(train_size: int, split: str) -> int:
    return train_size if split == "train" else max(1, train_size // TEST_FRACTION)

  def __repr__(self) -> str:
    opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
    return f"{type(self).__name__}(seed={self.seed}, {opts})"
