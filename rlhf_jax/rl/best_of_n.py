"""Best-of-n: the policy that returns the reward model's best of n samples; its gold reward and KL.

scores: [P, M] reward-model scores of M samples per prompt (M a multiple of n);
disjoint groups of n consecutive samples each give one best-of-n draw, so all
M samples are used and the draws are independent.
"""

from __future__ import annotations

import numpy as np


def kl_bon_formula(n: int) -> float:
  """The analytic KL(best-of-n || base) = log n - (n - 1) / n (nats); an upper bound (Beirami et al. 2024)."""
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  return float(np.log(n) - (n - 1) / n)


def best_of_n_indices(scores: np.ndarray, n: int) -> np.ndarray:
  """[P, M // n] column indices of the best sample in each disjoint group of n (first on ties)."""
  scores = np.asarray(scores, np.float64)
  p, m = scores.shape
  if n < 1 or m % n:
    raise ValueError(f"samples per prompt ({m}) must be a multiple of n ({n})")
  groups = scores.reshape(p, m // n, n)
  return np.argmax(groups, axis=2) + np.arange(0, m, n)[None, :]


def best_of_n_values(scores: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
  """Mean over draws of ``values`` [P, M] at the best-of-n picks by ``scores`` -> [P]."""
  idx = best_of_n_indices(scores, n)
  return np.take_along_axis(np.asarray(values, np.float64), idx, axis=1).mean(axis=1)


def kl_bon_estimate(scores: np.ndarray, n: int) -> float:
  """KL(best-of-n || base) (nats) with the base policy replaced by each prompt's M samples, mean over prompts.

  The empirical base puts mass c_k / M on the k-th distinct score (ties: identical scores, e.g. the
  same response drawn twice, form one outcome); best-of-n of it picks outcome k with probability
  F_k^n - F_{k-1}^n (F the empirical CDF). Its exact KL is at most the formula's log n - (n-1)/n,
  reaching it only when all M scores differ and M >> n; duplicates (a peaked policy) make it
  smaller, which is what Beirami et al. point out about the formula.
  """
  scores = np.asarray(scores, np.float64)
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  total = 0.0
  for row in scores:
    _, counts = np.unique(row, return_counts=True)  # ascending scores
    q = counts / row.size
    cdf = np.cumsum(q)
    p = cdf ** n - np.concatenate([[0.0], cdf[:-1]]) ** n
    keep = p > 0
    total += float(np.sum(p[keep] * np.log(p[keep] / q[keep])))
  return total / len(scores)
