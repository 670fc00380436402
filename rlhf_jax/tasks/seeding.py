"""Deterministic random streams for task data.

Every stream is keyed by (seed, purpose, *index). Purposes are hashed with
CRC-32 rather than Python's ``hash()``, which is salted per process and would
make the data differ between runs.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def stable_hash(text: str) -> int:
  """A process-independent 32-bit hash of ``text``."""
  return zlib.crc32(text.encode("utf-8"))


def stream(seed: int, purpose: str, *index: int) -> np.random.Generator:
  """The random generator for ``purpose`` (and optional integer ``index``)."""
  if seed < 0 or any(i < 0 for i in index):
    raise ValueError(f"seed and indices must be non-negative, got {seed}, {index}")
  return np.random.default_rng([seed, stable_hash(purpose), *index])


def pick(rng: np.random.Generator, items: Sequence[T]) -> T:
  """One uniformly chosen element of ``items``."""
  # rng.random() is about twice as fast as rng.integers() for scalars, and
  # data generation draws ~100k of these.
  return items[int(rng.random() * len(items))]
