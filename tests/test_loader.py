"""BatchLoader: determinism, exact resume, disjoint per-host slices."""

import numpy as np
import pytest

from rlhf_jax.data import loader


def test_epochs_are_permutations_and_drop_remainder():
  bl = loader.BatchLoader(10, batch_size=3, seed=0)
  assert bl.steps_per_epoch == 3
  for epoch in range(3):
    seen = np.concatenate([bl.indices_for_step(epoch * 3 + b)
                           for b in range(3)])
    assert len(set(seen.tolist())) == 9  # 9 distinct of 10; one dropped
    order = np.random.default_rng([0, epoch]).permutation(10)
    np.testing.assert_array_equal(seen, order[:9])
  assert not np.array_equal(bl.epoch_order(0), bl.epoch_order(1))


def test_deterministic_and_seed_dependent():
  a = loader.BatchLoader(100, 8, seed=1)
  b = loader.BatchLoader(100, 8, seed=1)
  c = loader.BatchLoader(100, 8, seed=2)
  steps = [0, 5, 12, 13, 40, 1000]
  for s in steps:
    np.testing.assert_array_equal(a.indices_for_step(s), b.indices_for_step(s))
  assert any(not np.array_equal(a.indices_for_step(s), c.indices_for_step(s))
             for s in steps)


def test_resume_matches_uninterrupted_run():
  source = [{"id": i} for i in range(23)]
  uninterrupted = list(loader.BatchLoader(source, 4, seed=7).iterate(0, 30))
  # "Restart" at step 11 with a fresh loader (fresh process, no state).
  resumed = list(loader.BatchLoader(source, 4, seed=7).iterate(11, 30))
  assert resumed == uninterrupted[11:]
  assert len(uninterrupted[29]) == 4


def test_per_host_slices_are_disjoint_and_cover_global_batch():
  n, batch, hosts = 50, 8, 4
  loaders = [loader.BatchLoader(n, batch, seed=3, process_index=p,
                                process_count=hosts) for p in range(hosts)]
  for step in (0, 1, 6, 7, 100):
    parts = [bl.indices_for_step(step) for bl in loaders]
    assert all(len(p) == loaders[0].local_batch_size == 2 for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts),
                                  loaders[0].global_indices_for_step(step))
    assert len(set(np.concatenate(parts).tolist())) == batch


def test_no_shuffle_and_keep_remainder():
  bl = loader.BatchLoader(7, 3, seed=0, shuffle=False, drop_remainder=False)
  assert bl.steps_per_epoch == 3
  assert [bl.indices_for_step(s).tolist() for s in range(4)] == [
      [0, 1, 2], [3, 4, 5], [6], [0, 1, 2]]


def test_batch_at_and_errors():
  bl = loader.BatchLoader(["a", "b", "c", "d"], 2, seed=0, shuffle=False)
  assert bl.batch_at(1) == ["c", "d"]
  with pytest.raises(ValueError, match="length"):
    loader.BatchLoader(4, 2, seed=0).batch_at(0)
  with pytest.raises(ValueError, match="divisible"):
    loader.BatchLoader(10, 3, seed=0, process_count=2)
  with pytest.raises(ValueError, match="cannot fill"):
    loader.BatchLoader(3, 4, seed=0)
  with pytest.raises(ValueError, match="process_index"):
    loader.BatchLoader(10, 2, seed=0, process_index=2, process_count=2)
