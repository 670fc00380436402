"""Simulated labelers: noisy rankings of scored responses, and their agreement.

A labeler ranks K responses by sampling a Plackett-Luce ordering from the
gold scores: pick the best by ``softmax(score / temperature)``, remove it,
repeat. That equals sorting ``score / temperature + Gumbel noise``, which is
how it is computed. Temperature 0 gives the exact gold order (ties broken by
position).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def sample_ranking(
    scores: np.ndarray, temperature: float, rng: np.random.Generator
) -> list[int]:
  """Indices of ``scores`` ordered best first, Plackett-Luce at ``temperature``."""
  scores = np.asarray(scores, dtype=np.float64)
  if temperature < 0:
    raise ValueError(f"labeler temperature must be >= 0, got {temperature}")
  # Draw the noise even at temperature 0 so a stream's later draws do not
  # depend on the temperature.
  noise = rng.gumbel(size=scores.shape)
  keys = scores if temperature == 0 else scores / temperature + noise
  return [int(i) for i in np.argsort(-keys, kind="stable")]


def pairwise_agreement(
    scores: Sequence[np.ndarray], rankings: Sequence[Sequence[int]]
) -> float:
  """Fraction of response pairs that a ranking orders as the gold scores do.

  ``scores[g]`` are the gold scores of group g and ``rankings[g]`` its ranking
  (indices, best first). Pairs with equal gold score carry no preference and
  are skipped. Returns NaN when no pair has a preference.
  """
  agree = total = 0
  for group_scores, ranking in zip(scores, rankings, strict=True):
    group_scores = np.asarray(group_scores, dtype=np.float64)
    position = np.empty(len(ranking), dtype=np.int64)
    position[np.asarray(ranking, dtype=np.int64)] = np.arange(len(ranking))
    # Pair (i, j) agrees when the better-scored one is ranked first.
    diff = group_scores[:, None] - group_scores[None, :]
    ahead = position[:, None] < position[None, :]
    upper = np.triu(np.ones_like(ahead), k=1)
    strict = upper & (diff != 0)
    agree += int(np.sum(strict & ((diff > 0) == ahead)))
    total += int(np.sum(strict))
  return agree / total if total else float("nan")


def score_agreement(reference: Sequence[np.ndarray], predicted: Sequence[np.ndarray]) -> float:
  """Fraction of response pairs that ``predicted`` scores order as ``reference`` scores do, group by group.

  A pair with equal reference scores carries no preference and is skipped; a pair the prediction scores
  equally is not ordered and counts half (a coin flip), as in the reward model's training accuracy. A
  ranking (indices, best first) is compared by passing ``ranking_scores(ranking)``. NaN when no pair has a
  preference.
  """
  agree = total = 0.0
  for ref, pred in zip(reference, predicted, strict=True):
    ref_order = np.sign(np.subtract.outer(np.asarray(ref, np.float64), np.asarray(ref, np.float64)))
    pred_order = np.sign(np.subtract.outer(np.asarray(pred, np.float64), np.asarray(pred, np.float64)))
    pairs = np.triu(np.ones_like(ref_order, dtype=bool), k=1) & (ref_order != 0)
    agree += np.sum(pairs & (pred_order == ref_order)) + 0.5 * np.sum(pairs & (pred_order == 0))
    total += np.sum(pairs)
  return float(agree / total) if total else float("nan")


def ranking_scores(ranking: Sequence[int]) -> np.ndarray:
  """Scores [K] that order responses as ``ranking`` (indices, best first) does: K-1 for the best, 0 for the worst."""
  scores = np.empty(len(ranking), dtype=np.float64)
  scores[np.asarray(ranking, dtype=np.int64)] = np.arange(len(ranking))[::-1]
  return scores
