"""Deterministic, resumable batch order over a random-access source.

Step s of a run is a pure function of (seed, s): epoch e = s // steps_per_epoch
is ordered by ``np.random.default_rng([seed, e]).permutation(n)``, global batch
b of that epoch is the contiguous slice ``order[b * B:(b + 1) * B]``, and
process p of P takes the p-th contiguous 1/P of that global batch. Restarting
at step s therefore reproduces exactly the batches of an uninterrupted run,
and no state beyond the step number needs checkpointing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized
from typing import Any

import numpy as np


class BatchLoader:
  """Index (and record) batches for step numbers; see the module docstring.

  Args:
    source: a random-access source (`len` and integer `__getitem__`), or just
      its length if only indices are needed.
    batch_size: global batch size B, over all processes; divisible by
      `process_count`.
    seed: data-order seed.
    shuffle: if False every epoch is in source order.
    process_index, process_count: this process and the number of processes
      (`jax.process_index()`, `jax.process_count()`).
    drop_remainder: drop the last n % B examples of each epoch's order (a
      different set each shuffled epoch). If False the last batch of an epoch
      is short, and processes get `np.array_split` pieces of it, which may
      differ in size by one.
  """

  def __init__(
      self,
      source: int | Sequence[Any],
      batch_size: int,
      seed: int,
      shuffle: bool = True,
      process_index: int = 0,
      process_count: int = 1,
      drop_remainder: bool = True,
  ):
    if isinstance(source, (int, np.integer)):
      self._source, self.num_examples = None, int(source)
    elif isinstance(source, Sized):
      self._source, self.num_examples = source, len(source)
    else:
      raise TypeError(f"source must be an int or a sized sequence, got "
                      f"{type(source).__name__}")
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in "
                       f"[0, {process_count})")
    if batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} is not divisible by "
                       f"process_count {process_count}")
    if self.num_examples == 0 or (drop_remainder
                                  and self.num_examples < batch_size):
      raise ValueError(f"{self.num_examples} examples cannot fill a batch of "
                       f"{batch_size} (drop_remainder={drop_remainder})")
    self.batch_size = batch_size
    self.seed = seed
    self.shuffle = shuffle
    self.process_index = process_index
    self.process_count = process_count
    self.drop_remainder = drop_remainder
    self._cached_order: tuple[int, np.ndarray | None] = (-1, None)

  @property
  def steps_per_epoch(self) -> int:
    """Global batches per pass over the data."""
    if self.drop_remainder:
      return self.num_examples // self.batch_size
    return -(-self.num_examples // self.batch_size)

  @property
  def local_batch_size(self) -> int:
    """Examples this process gets per full step (batch_size / process_count)."""
    return self.batch_size // self.process_count

  def epoch_order(self, epoch: int) -> np.ndarray:
    """[num_examples] int64, read-only: the example order of `epoch`."""
    if self._cached_order[0] != epoch:
      if self.shuffle:
        order = np.random.default_rng([self.seed, epoch]).permutation(
            self.num_examples)
      else:
        order = np.arange(self.num_examples)
      order.flags.writeable = False
      self._cached_order = (epoch, order)
    return self._cached_order[1]

  def global_indices_for_step(self, step: int) -> np.ndarray:
    """[B] int64 (shorter for a final partial batch): all processes' indices."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    epoch, b = divmod(step, self.steps_per_epoch)
    return self.epoch_order(epoch)[b * self.batch_size:(b + 1) *
                                   self.batch_size]

  def indices_for_step(self, step: int) -> np.ndarray:
    """[B / process_count] int64: this process's source indices at `step`."""
    batch = self.global_indices_for_step(step)
    return np.array_split(batch, self.process_count)[self.process_index]

  def batch_at(self, step: int) -> list[Any]:
    """This process's records at `step` (needs a source, not just a length)."""
    if self._source is None:
      raise ValueError("BatchLoader was built from a length; no records")
    return [self._source[int(i)] for i in self.indices_for_step(step)]

  def iterate(self, start_step: int = 0,
              stop_step: int | None = None) -> Iterator[list[Any]]:
    """Yields `batch_at(s)` for s = start_step, ... (forever if no stop)."""
    step = start_step
    while stop_step is None or step < stop_step:
      yield self.batch_at(step)
      step += 1
