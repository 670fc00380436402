"""Which samples reward-filtered fine-tuning (RFT) keeps: pure selection rules on scores.

Every rule takes per-sample scores [S] and group ids [S] (samples of one prompt
share a group id) and returns the indices of the kept samples, sorted. Ties
are broken by the lower index, so a rule is a deterministic function of its
inputs.

  * ``best_of_n``: the best sample of each group (RAFT, Llama 2 rejection sampling).
  * ``threshold``: samples scoring at least a threshold (ReST's Improve step; the
    threshold rises per round, see ``rest_threshold``).
  * ``top_fraction``: the best ``fraction`` of the whole batch.
  * ``kl_aware``: the best of each group under ``score - beta * log_ratio``, where
    log_ratio is the sample's summed log pi/pi_ref: a reward-filtered analogue of
    the KL-penalised RL objective.
"""

from __future__ import annotations

import numpy as np

RULES = ("best_of_n", "threshold", "top_fraction", "kl_aware")


def best_of_n(scores: np.ndarray, group: np.ndarray) -> np.ndarray:
  """Index of the highest score in each group (first on ties), sorted; scores, group: [S]."""
  scores, group = np.asarray(scores, np.float64), np.asarray(group)
  order = np.lexsort((np.arange(len(scores)), -scores, group))  # by group, then score desc, then index
  first = np.ones(len(order), bool)
  first[1:] = group[order][1:] != group[order][:-1]
  return np.sort(order[first])


def threshold(scores: np.ndarray, value: float) -> np.ndarray:
  """Indices of samples with score >= value, sorted."""
  return np.flatnonzero(np.asarray(scores) >= value)


def top_fraction(scores: np.ndarray, fraction: float) -> np.ndarray:
  """Indices of the ceil(fraction * S) highest scores (first on ties), sorted."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"top fraction must be in (0, 1], got {fraction}")
  scores = np.asarray(scores, np.float64)
  keep = int(np.ceil(fraction * len(scores)))
  order = np.lexsort((np.arange(len(scores)), -scores))
  return np.sort(order[:keep])


def kl_aware(scores: np.ndarray, log_ratio: np.ndarray, group: np.ndarray, beta: float) -> np.ndarray:
  """Best of each group under ``score - beta * log_ratio``; log_ratio: [S] summed log pi - log pi_ref (nats)."""
  return best_of_n(np.asarray(scores, np.float64) - beta * np.asarray(log_ratio, np.float64), group)


def rest_threshold(round_index: int, start: float, step: float) -> float:
  """ReST's rising threshold: ``start + step * round_index`` (round_index from 0)."""
  return start + step * round_index
