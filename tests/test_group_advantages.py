"""RLOO and GRPO advantages against plain numpy references on hand-made groups."""

import numpy as np
import jax.numpy as jnp
import pytest

from rlhf_jax.rl.group_advantages import group_sizes, grpo_advantages, rloo_advantages

# Three prompts, rows interleaved: group 7 has 3 samples, group 2 has 2 (all-equal rewards), group 5 has 2.
GROUP = np.array([7, 2, 7, 5, 2, 7, 5])
REWARDS = np.array([1.0, 0.5, 3.0, -1.0, 0.5, 2.0, 4.0], np.float32)


def numpy_rloo(rewards, group):
  out = np.zeros_like(rewards)
  for i, (r, g) in enumerate(zip(rewards, group)):
    others = [rewards[j] for j in range(len(rewards)) if group[j] == g and j != i]
    out[i] = r - np.mean(others) if others else 0.0
  return out


def numpy_grpo(rewards, group, scale=True):
  out = np.zeros_like(rewards)
  zero = np.zeros(len(rewards), bool)
  for g in set(group.tolist()):
    rows = group == g
    r = rewards[rows]
    std = r.std()  # population std
    zero[rows] = std == 0
    out[rows] = 0.0 if std == 0 else (r - r.mean()) / ((std + 1e-6) if scale else 1.0)
  return out, zero


def test_rloo_is_leave_one_out():
  adv = np.asarray(rloo_advantages(jnp.asarray(REWARDS), jnp.asarray(GROUP)))
  np.testing.assert_allclose(adv, numpy_rloo(REWARDS, GROUP), rtol=1e-6, atol=1e-6)
  # Row 0: 1 - mean(3, 2) = -1.5; the equal pair gets 0; each group's advantages sum to 0.
  assert adv[0] == pytest.approx(-1.5)
  np.testing.assert_allclose(adv[[1, 4]], 0.0)
  for g in (7, 2, 5):
    assert abs(adv[GROUP == g].sum()) < 1e-5
  # k / (k - 1) times the centred reward.
  np.testing.assert_allclose(adv[GROUP == 7], 1.5 * (REWARDS[GROUP == 7] - REWARDS[GROUP == 7].mean()), rtol=1e-6)


def test_rloo_single_sample_group_has_zero_advantage():
  adv = rloo_advantages(jnp.array([3.0, 1.0, 2.0]), jnp.array([0, 1, 1]))
  np.testing.assert_allclose(adv, [0.0, -1.0, 1.0])


@pytest.mark.parametrize("scale", [True, False])
def test_grpo_z_scores_within_groups(scale):
  adv, zero = grpo_advantages(jnp.asarray(REWARDS), jnp.asarray(GROUP), scale_by_std=scale)
  expected, expected_zero = numpy_grpo(REWARDS, GROUP, scale)
  np.testing.assert_allclose(np.asarray(adv), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(zero), expected_zero)
  assert np.asarray(zero).tolist() == [False, True, False, False, True, False, False]
  if scale:  # unit population std within each group with spread
    for g in (7, 5):
      assert np.asarray(adv)[GROUP == g].std() == pytest.approx(1.0, abs=1e-4)


def test_grpo_all_equal_rewards_everywhere():
  rewards = jnp.full((6,), 0.3)
  adv, zero = grpo_advantages(rewards, jnp.array([0, 0, 1, 1, 2, 2]))
  np.testing.assert_array_equal(adv, 0.0)
  assert bool(zero.all())
  np.testing.assert_array_equal(rloo_advantages(rewards, jnp.array([0, 0, 1, 1, 2, 2])), 0.0)


def test_group_sizes():
  np.testing.assert_array_equal(group_sizes(jnp.asarray(GROUP)), [3, 2, 3, 2, 2, 3, 2])
