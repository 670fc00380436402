"""rlhf_jax.losses against plain-loop numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses

# Every test goes through jit: it checks the functions trace, and one compiled
# program per shape is much faster on CPU than op-by-op dispatch.
token_log_probs = jax.jit(losses.token_log_probs)
next_token_loss = jax.jit(losses.next_token_loss)
ranking_loss = jax.jit(losses.ranking_loss)
direct_score_loss = jax.jit(losses.direct_score_loss, static_argnames="kind")
reward_normalisation = jax.jit(losses.reward_normalisation, static_argnames="bias_only")


def _ref_log_softmax(row):
  m = max(row)
  lse = m + math.log(sum(math.exp(v - m) for v in row))
  return [v - lse for v in row]


def _ref_token_log_probs(logits, tokens):
  b_size, t_size, _ = logits.shape
  out = np.zeros((b_size, t_size))
  for b in range(b_size):
    for t in range(1, t_size):
      out[b, t] = _ref_log_softmax([float(v) for v in logits[b, t - 1]])[tokens[b, t]]
  return out


def _random_sequences(rng, b=3, t=6, v=11):
  logits = rng.normal(size=(b, t, v)).astype(np.float32) * 3
  tokens = rng.integers(0, v, size=(b, t)).astype(np.int32)
  loss_mask = (rng.random((b, t)) < 0.6).astype(np.float32)
  loss_mask[:, 0] = 0
  return logits, tokens, loss_mask


def test_token_log_probs_matches_numpy():
  logits, tokens, _ = _random_sequences(np.random.default_rng(0))
  got = token_log_probs(jnp.asarray(logits), jnp.asarray(tokens))
  assert got.shape == tokens.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _ref_token_log_probs(logits, tokens), atol=1e-5)


def test_token_log_probs_bf16_computes_in_float32():
  logits, tokens, _ = _random_sequences(np.random.default_rng(1), v=50)
  logits_bf16 = jnp.asarray(logits, jnp.bfloat16)
  got = token_log_probs(logits_bf16, jnp.asarray(tokens))
  assert got.dtype == jnp.float32
  upcast = np.asarray(logits_bf16.astype(jnp.float32))
  np.testing.assert_allclose(got, _ref_token_log_probs(upcast, tokens), atol=1e-5)


def test_next_token_loss_matches_numpy():
  logits, tokens, loss_mask = _random_sequences(np.random.default_rng(2))
  ref_lp = _ref_token_log_probs(logits, tokens)
  total, count = 0.0, 0
  for b in range(tokens.shape[0]):
    for t in range(tokens.shape[1]):
      if loss_mask[b, t]:
        total -= ref_lp[b, t]
        count += 1
  loss, n = next_token_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(loss_mask))
  assert int(n) == count
  np.testing.assert_allclose(loss, total / count, rtol=1e-5)


def test_next_token_loss_ignores_non_targets():
  rng = np.random.default_rng(3)
  logits, tokens, loss_mask = _random_sequences(rng)
  base, _ = next_token_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(loss_mask))
  logits2, tokens2 = logits.copy(), tokens.copy()
  b_size, t_size, v = logits.shape
  for b in range(b_size):
    logits2[b, t_size - 1] = rng.normal(size=v) * 10  # predicts nothing
    for t in range(1, t_size):
      if not loss_mask[b, t]:
        logits2[b, t - 1] = rng.normal(size=v) * 10
        tokens2[b, t] = rng.integers(0, v)
  assert not np.array_equal(logits, logits2)
  changed, _ = next_token_loss(jnp.asarray(logits2), jnp.asarray(tokens2), jnp.asarray(loss_mask))
  np.testing.assert_allclose(changed, base, rtol=1e-6)


def test_next_token_loss_zero_targets_is_safe():
  logits, tokens, loss_mask = _random_sequences(np.random.default_rng(4))
  loss, n = next_token_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.zeros_like(loss_mask))
  assert float(n) == 0 and float(loss) == 0 and np.isfinite(float(loss))


def _ref_ranking(rewards, ranks, mask, margin):
  """Per-prompt mean over pairs, then mean over prompts with pairs."""
  per_prompt = []
  for b in range(rewards.shape[0]):
    real = [k for k in range(rewards.shape[1]) if mask[b, k]]
    pair_losses, correct, gaps = [], [], []
    for w in real:
      for l in real:
        if ranks[b, w] < ranks[b, l]:
          m = margin[b, w, l]
          d = float(rewards[b, w]) - float(rewards[b, l])
          pair_losses.append(-math.log(1.0 / (1.0 + math.exp(-(d - m)))))
          correct.append(1.0 if d > 0 else 0.5 if d == 0 else 0.0)
          gaps.append(d)
    if pair_losses:
      per_prompt.append((np.mean(pair_losses), np.mean(correct), np.mean(gaps), len(pair_losses)))
  if not per_prompt:
    return 0.0, 0.0, 0.0, 0
  cols = list(zip(*per_prompt))
  return float(np.mean(cols[0])), float(np.mean(cols[1])), float(np.mean(cols[2])), sum(cols[3])


def _random_ranking_batch(rng, b, k, ties):
  rewards = rng.normal(size=(b, k)).astype(np.float32) * 2
  if ties:
    ranks = rng.integers(0, 3, size=(b, k)).astype(np.int32)
  else:
    ranks = np.stack([rng.permutation(k) for _ in range(b)]).astype(np.int32)
  k_b = rng.integers(1, k + 1, size=b)  # K_b = 1 gives a prompt with no pairs
  k_b[0] = k
  mask = (np.arange(k)[None, :] < k_b[:, None]).astype(np.float32)
  # Padding must be ignored whatever it holds.
  rewards = np.where(mask > 0, rewards, 100.0).astype(np.float32)
  ranks = np.where(mask > 0, ranks, -1).astype(np.int32)
  return rewards, ranks, mask


@pytest.mark.parametrize("k", range(2, 10))
def test_ranking_loss_matches_numpy_with_padding(k):
  rng = np.random.default_rng(10 + k)
  b = 5
  rewards, ranks, mask = _random_ranking_batch(rng, b, k, ties=False)
  for margin in (0.0, 0.5):
    loss, metrics = ranking_loss(rewards, ranks, mask, margin)
    ref = _ref_ranking(rewards, ranks, mask, np.full((b, k, k), margin))
    np.testing.assert_allclose(loss, ref[0], rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], ref[1], rtol=1e-5)
    np.testing.assert_allclose(metrics["reward_gap"], ref[2], rtol=1e-5, atol=1e-6)
    k_b = mask.sum(1).astype(int)
    assert int(metrics["num_pairs"]) == ref[3] == sum(math.comb(int(n), 2) for n in k_b)


@pytest.mark.parametrize("k", [3, 6, 9])
def test_ranking_loss_ties_and_array_margins(k):
  rng = np.random.default_rng(100 + k)
  b = 6
  rewards, ranks, mask = _random_ranking_batch(rng, b, k, ties=True)
  per_prompt = rng.random(b).astype(np.float32)
  per_pair = rng.random((b, k, k)).astype(np.float32)
  for margin, full in ((per_prompt, np.broadcast_to(per_prompt[:, None, None], (b, k, k))),
                       (per_pair, per_pair)):
    loss, metrics = ranking_loss(rewards, ranks, mask, margin)
    ref = _ref_ranking(rewards, ranks, mask, full)
    np.testing.assert_allclose(loss, ref[0], rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], ref[1], rtol=1e-5)
    np.testing.assert_allclose(metrics["reward_gap"], ref[2], rtol=1e-5, atol=1e-6)
    assert int(metrics["num_pairs"]) == ref[3]


def test_ranking_loss_each_prompt_counts_equally():
  # Prompt 0 has one pair, prompt 1 has C(4, 2) = 6; each contributes half.
  rewards = np.array([[1.0, 0.0, 0, 0], [0.0, 0.0, 0.0, 0.0]], np.float32)
  ranks = np.array([[0, 1, 0, 0], [0, 1, 2, 3]], np.int32)
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], np.float32)
  loss, metrics = ranking_loss(jnp.asarray(rewards), jnp.asarray(ranks), jnp.asarray(mask))
  expected = 0.5 * -math.log(1 / (1 + math.exp(-1.0))) + 0.5 * math.log(2.0)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["accuracy"], 0.5 * 1.0 + 0.5 * 0.5, rtol=1e-6)  # prompt 1's pairs are all ties


def test_ranking_loss_no_pairs_is_safe():
  rewards = jnp.ones((2, 3))
  ranks = jnp.zeros((2, 3), jnp.int32)  # all tied
  loss, metrics = ranking_loss(rewards, ranks, jnp.ones((2, 3)))
  assert float(loss) == 0 and float(metrics["num_pairs"]) == 0


def test_direct_score_loss():
  rng = np.random.default_rng(5)
  r = rng.normal(size=7).astype(np.float32)
  s = rng.random(7).astype(np.float32)
  ref_sig = sum((1 / (1 + math.exp(-float(ri))) - float(si)) ** 2 for ri, si in zip(r, s)) / 7
  ref_mse = sum((float(ri) - float(si)) ** 2 for ri, si in zip(r, s)) / 7
  np.testing.assert_allclose(direct_score_loss(r, s, "sigmoid_mse"), ref_sig, rtol=1e-5)
  np.testing.assert_allclose(direct_score_loss(r, s, "mse"), ref_mse, rtol=1e-5)
  with pytest.raises(ValueError):
    direct_score_loss(jnp.asarray(r), jnp.asarray(s), "hinge")


def test_reward_normalisation():
  rng = np.random.default_rng(6)
  r = (rng.normal(size=257) * 3.5 + 2.0).astype(np.float32)
  gain, bias = reward_normalisation(jnp.asarray(r))
  z = [float(gain) * float(v) + float(bias) for v in r]
  mean = sum(z) / len(z)
  std = math.sqrt(sum((v - mean) ** 2 for v in z) / len(z))
  assert abs(mean) < 1e-5 and abs(std - 1) < 1e-5
  gain, bias = reward_normalisation(jnp.asarray(r), bias_only=True)
  assert float(gain) == 1.0
  z = [float(v) + float(bias) for v in r]
  assert abs(sum(z) / len(z)) < 1e-5


def test_ranking_loss_gradient_is_finite():
  rewards, ranks, mask = _random_ranking_batch(np.random.default_rng(8), 3, 4, ties=False)
  grad = jax.grad(lambda r: ranking_loss(r, ranks, mask)[0])(rewards)
  assert np.all(np.isfinite(grad))
  # Padded responses get no gradient.
  assert np.all(np.asarray(grad)[np.asarray(mask) == 0] == 0)
