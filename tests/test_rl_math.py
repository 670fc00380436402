"""rlhf_jax.rl maths against plain-loop numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import rl

# Every test goes through jit: it checks the functions trace, and one compiled
# program per shape is much faster on CPU than op-by-op dispatch.
kl_penalty = jax.jit(rl.kl_penalty, static_argnames="kind")
sequence_kl = jax.jit(rl.sequence_kl)
update_kl_coef = jax.jit(rl.update_kl_coef, static_argnames=("kind", "target", "horizon"))
masked_mean = jax.jit(rl.masked_mean)
masked_var = jax.jit(rl.masked_var, static_argnames="unbiased")
masked_whiten = jax.jit(rl.masked_whiten, static_argnames="shift_mean")
gae_advantages = jax.jit(rl.gae_advantages)
per_token_rewards = jax.jit(rl.per_token_rewards)
clipped_policy_loss = jax.jit(rl.clipped_policy_loss)
clipped_value_loss = jax.jit(rl.clipped_value_loss)
entropy_from_logits = jax.jit(rl.entropy_from_logits)
explained_variance = jax.jit(rl.explained_variance)


def _prefix_mask(rng, b, r):
  lengths = rng.integers(0, r + 1, size=b)
  lengths[0] = r
  mask = np.zeros((b, r), np.float32)
  for i, n in enumerate(lengths):
    mask[i, :n] = 1
  return mask


def _masked_entries(x, mask):
  return [float(v) for v, m in zip(np.ravel(x), np.ravel(mask)) if m]


def _ref_mean_var(values, ddof=0):
  n = len(values)
  mean = sum(values) / n
  return mean, sum((v - mean) ** 2 for v in values) / (n - ddof)


# ---------------------------------------------------------------- KL


def test_kl_estimators_match_formulas():
  rng = np.random.default_rng(0)
  logp = np.log(rng.random((3, 5))).astype(np.float32)
  logp_ref = np.log(rng.random((3, 5))).astype(np.float32)
  refs = {"k1": lambda a, b: a - b,
          "k2": lambda a, b: 0.5 * (a - b) ** 2,
          "k3": lambda a, b: math.exp(b - a) - 1 - (b - a)}
  fns = {"k1": rl.kl_k1, "k2": rl.kl_k2, "k3": rl.kl_k3}
  for kind, ref_fn in refs.items():
    ref = np.array([[ref_fn(float(a), float(b)) for a, b in zip(ra, rb)]
                    for ra, rb in zip(logp, logp_ref)])
    got = kl_penalty(jnp.asarray(logp), jnp.asarray(logp_ref), kind=kind)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fns[kind](logp, logp_ref), ref, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(rl.kl_k3(jnp.asarray(logp), jnp.asarray(logp_ref))) >= 0)
  with pytest.raises(ValueError):
    rl.kl_penalty(logp, logp_ref, kind="k4")


def test_k1_and_k3_unbiased_by_enumeration():
  rng = np.random.default_rng(1)
  for n in (2, 3, 5):
    p = rng.random(n) + 0.1
    p /= p.sum()
    q = rng.random(n) + 0.1
    q /= q.sum()
    exact = sum(p[i] * math.log(p[i] / q[i]) for i in range(n))
    logp, logq = jnp.log(jnp.asarray(p, jnp.float32)), jnp.log(jnp.asarray(q, jnp.float32))
    for kind in ("k1", "k3"):
      per_outcome = np.asarray(kl_penalty(logp, logq, kind=kind))
      expectation = sum(p[i] * per_outcome[i] for i in range(n))
      np.testing.assert_allclose(expectation, exact, rtol=1e-4, atol=1e-6)


def test_sequence_kl():
  rng = np.random.default_rng(2)
  logp, logp_ref = rng.normal(size=(2, 4, 6)).astype(np.float32)
  mask = _prefix_mask(rng, 4, 6)
  ref = [sum(float(logp[b, t] - logp_ref[b, t]) for t in range(6) if mask[b, t]) for b in range(4)]
  np.testing.assert_allclose(sequence_kl(logp, logp_ref, mask), ref, rtol=1e-5, atol=1e-6)


def test_adaptive_kl_controller_sequence():
  target, horizon, n_steps = 6.0, 10000.0, 512
  observed = [0.0, 3.0, 5.9, 6.0, 7.0, 50.0, 12.0, 6.5]
  beta_ref, beta = 0.1, jnp.float32(0.1)
  for kl in observed:
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    beta_ref = beta_ref * (1.0 + error * n_steps / horizon)
    beta = update_kl_coef(beta, kl, n_steps, kind="adaptive", target=target, horizon=horizon)
    np.testing.assert_allclose(beta, beta_ref, rtol=1e-6)
  assert beta.dtype == jnp.float32 and beta.shape == ()


def test_fixed_kl_controller():
  beta = jnp.float32(0.05)
  for kl in (0.0, 100.0):
    beta = update_kl_coef(beta, kl, 64, kind="fixed")
  assert float(beta) == pytest.approx(0.05)
  with pytest.raises(ValueError):
    rl.update_kl_coef(0.1, 1.0, 1, kind="adaptive")


# ---------------------------------------------------------------- whitening


def test_masked_mean_and_var():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(4, 7)).astype(np.float32) * 2 + 1
  mask = _prefix_mask(rng, 4, 7)
  entries = _masked_entries(x, mask)
  mean, var = _ref_mean_var(entries)
  _, var_unbiased = _ref_mean_var(entries, ddof=1)
  np.testing.assert_allclose(masked_mean(x, mask), mean, rtol=1e-5)
  np.testing.assert_allclose(masked_var(x, mask), var, rtol=1e-5)
  np.testing.assert_allclose(masked_var(x, mask, unbiased=True), var_unbiased, rtol=1e-5)
  row_means = [sum(float(x[b, t]) for t in range(7) if mask[b, t]) / max(mask[b].sum(), 1)
               for b in range(4)]
  np.testing.assert_allclose(jax.jit(rl.masked_mean, static_argnames="axis")(x, mask, axis=1),
                             row_means, rtol=1e-5, atol=1e-6)
  assert float(masked_mean(x, np.zeros_like(mask))) == 0.0


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(shift_mean):
  rng = np.random.default_rng(4)
  x = rng.normal(size=(5, 8)).astype(np.float32) * 3 + 2
  mask = _prefix_mask(rng, 5, 8)
  mean, var = _ref_mean_var(_masked_entries(x, mask))
  ref = np.zeros_like(x)
  for b in range(5):
    for t in range(8):
      if mask[b, t]:
        ref[b, t] = (x[b, t] - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
  got = masked_whiten(x, mask, shift_mean=shift_mean)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  out_mean, out_var = _ref_mean_var(_masked_entries(got, mask))
  assert out_mean == pytest.approx(0.0 if shift_mean else mean, abs=1e-5)
  assert out_var == pytest.approx(1.0, abs=1e-4)


# ---------------------------------------------------------------- GAE


def _ref_gae(rewards, values, mask, gamma, lam):
  b_size, r_size = rewards.shape
  adv = np.zeros((b_size, r_size))
  for b in range(b_size):
    length = int(mask[b].sum())
    next_adv = 0.0
    for t in reversed(range(length)):
      next_value = float(values[b, t + 1]) if t + 1 < length else 0.0
      delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
      next_adv = delta + gamma * lam * next_adv
      adv[b, t] = next_adv
  returns = np.where(mask > 0, adv + values, 0.0)
  return adv, returns


@pytest.mark.parametrize("gamma,lam", [(0.9, 0.8), (1.0, 0.95), (1.0, 1.0)])
def test_gae_matches_numpy_with_padded_tails(gamma, lam):
  rng = np.random.default_rng(5)
  rewards, values = rng.normal(size=(2, 6, 9)).astype(np.float32)
  mask = _prefix_mask(rng, 6, 9)
  # Garbage at padding must not leak into real positions.
  rewards_padded = np.where(mask > 0, rewards, 7.0).astype(np.float32)
  values_padded = np.where(mask > 0, values, -5.0).astype(np.float32)
  adv, ret = gae_advantages(rewards_padded, values_padded, mask, gamma, lam)
  ref_adv, ref_ret = _ref_gae(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(adv)[mask == 0] == 0)
  if gamma == lam == 1.0:
    # Undiscounted: return is the sum of rewards to go.
    for b in range(6):
      length = int(mask[b].sum())
      for t in range(length):
        to_go = sum(float(rewards[b, u]) for u in range(t, length))
        assert float(ret[b, t]) == pytest.approx(to_go, abs=1e-4)


def test_per_token_rewards():
  rng = np.random.default_rng(6)
  score = rng.normal(size=5).astype(np.float32)
  kl = rng.normal(size=(5, 7)).astype(np.float32)
  mask = _prefix_mask(rng, 5, 7)
  beta = 0.2
  ref = np.zeros((5, 7))
  for b in range(5):
    length = int(mask[b].sum())
    for t in range(length):
      ref[b, t] = -beta * kl[b, t]
    if length:
      ref[b, length - 1] += score[b]
  np.testing.assert_allclose(per_token_rewards(score, kl, mask, beta), ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- PPO losses


def _ref_policy_loss(logp_new, logp_old, adv, mask, eps):
  losses, clipped, k2, k3 = [], [], [], []
  for ln, lo, a, m in zip(*(np.ravel(v) for v in (logp_new, logp_old, adv, mask))):
    if not m:
      continue
    ratio = math.exp(float(ln) - float(lo))
    clipped_ratio = min(max(ratio, 1 - eps), 1 + eps)
    surrogate = min(ratio * a, clipped_ratio * a)  # pessimistic bound
    losses.append(-surrogate)
    clipped.append(1.0 if clipped_ratio * a < ratio * a else 0.0)
    k2.append(0.5 * (float(ln) - float(lo)) ** 2)
    k3.append(ratio - 1 - math.log(ratio))
  return tuple(sum(v) / len(v) for v in (losses, clipped, k2, k3))


@pytest.mark.parametrize("scale", [0.01, 1.0])
def test_clipped_policy_loss(scale):
  rng = np.random.default_rng(7)
  eps = 0.2
  logp_old = np.log(rng.random((4, 6))).astype(np.float32)
  logp_new = (logp_old + scale * rng.normal(size=(4, 6))).astype(np.float32)
  adv = rng.normal(size=(4, 6)).astype(np.float32)
  mask = _prefix_mask(rng, 4, 6)
  loss, metrics = clipped_policy_loss(logp_new, logp_old, adv, mask, eps)
  ref = _ref_policy_loss(logp_new, logp_old, adv, mask, eps)
  np.testing.assert_allclose(loss, ref[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["clip_frac"], ref[1], atol=1e-6)
  np.testing.assert_allclose(metrics["approx_kl_k2"], ref[2], rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(metrics["approx_kl_k3"], ref[3], rtol=1e-3, atol=1e-7)
  grad = jax.grad(lambda lp: clipped_policy_loss(lp, logp_old, adv, mask, eps)[0])(logp_new)
  ratio = np.exp(logp_new - logp_old)
  active_clip = np.where(adv >= 0, ratio > 1 + eps, ratio < 1 - eps)
  if scale == 0.01:  # all inside the trust region: plain ratio * A surrogate
    assert float(metrics["clip_frac"]) == 0
    n = mask.sum()
    np.testing.assert_allclose(grad, -adv * ratio * mask / n, rtol=1e-4, atol=1e-7)
  else:
    assert 0 < float(metrics["clip_frac"]) < 1
    # Clipped tokens carry no gradient.
    assert np.all(np.asarray(grad)[active_clip & (mask > 0)] == 0)
  assert np.all(np.asarray(grad)[mask == 0] == 0)


def _ref_value_loss(v_new, v_old, returns, mask, c):
  losses, clipped = [], []
  for vn, vo, r, m in zip(*(np.ravel(v) for v in (v_new, v_old, returns, mask))):
    if not m:
      continue
    vc = min(max(float(vn), float(vo) - c), float(vo) + c)
    e, ec = (float(vn) - r) ** 2, (vc - r) ** 2
    losses.append(0.5 * max(e, ec))
    clipped.append(1.0 if ec > e else 0.0)
  return sum(losses) / len(losses), sum(clipped) / len(clipped)


@pytest.mark.parametrize("scale", [0.01, 2.0])
def test_clipped_value_loss(scale):
  rng = np.random.default_rng(8)
  c = 0.2
  v_old = rng.normal(size=(4, 6)).astype(np.float32)
  v_new = (v_old + scale * rng.normal(size=(4, 6))).astype(np.float32)
  returns = rng.normal(size=(4, 6)).astype(np.float32)
  mask = _prefix_mask(rng, 4, 6)
  loss, metrics = clipped_value_loss(v_new, v_old, returns, mask, c)
  ref_loss, ref_frac = _ref_value_loss(v_new, v_old, returns, mask, c)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["value_clip_frac"], ref_frac, atol=1e-6)
  if scale == 0.01:  # within the clip range both errors coincide
    assert float(metrics["value_clip_frac"]) == 0
    plain = sum(0.5 * (float(a) - float(b)) ** 2 for a, b in
                zip(_masked_entries(v_new, mask), _masked_entries(returns, mask))) / mask.sum()
    np.testing.assert_allclose(loss, plain, rtol=1e-5)
  else:
    assert float(metrics["value_clip_frac"]) > 0


def test_entropy_from_logits():
  rng = np.random.default_rng(9)
  logits = rng.normal(size=(3, 5, 6)).astype(np.float32) * 2
  mask = _prefix_mask(rng, 3, 5)
  entropies = []
  for b in range(3):
    for t in range(5):
      if mask[b, t]:
        z = sum(math.exp(float(v)) for v in logits[b, t])
        probs = [math.exp(float(v)) / z for v in logits[b, t]]
        entropies.append(-sum(p * math.log(p) for p in probs))
  ref = sum(entropies) / len(entropies)
  np.testing.assert_allclose(entropy_from_logits(logits, mask), ref, rtol=1e-5)
  uniform = entropy_from_logits(jnp.zeros((2, 3, 6), jnp.bfloat16), jnp.ones((2, 3)))
  np.testing.assert_allclose(uniform, math.log(6), rtol=1e-6)


def test_explained_variance():
  rng = np.random.default_rng(10)
  returns = rng.normal(size=(4, 6)).astype(np.float32)
  values = (returns + 0.5 * rng.normal(size=(4, 6))).astype(np.float32)
  mask = _prefix_mask(rng, 4, 6)
  _, var_ret = _ref_mean_var(_masked_entries(returns, mask))
  _, var_res = _ref_mean_var(_masked_entries(returns - values, mask))
  ref = 1 - var_res / var_ret
  np.testing.assert_allclose(explained_variance(values, returns, mask), ref, rtol=1e-5)
  np.testing.assert_allclose(explained_variance(returns, returns, mask), 1.0, atol=1e-6)
  const = np.ones_like(returns)
  assert float(explained_variance(const, const, mask)) == 1.0
  assert float(explained_variance(values, const, mask)) == 0.0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_log_probs_and_entropy_through_the_normaliser(temperature):
  """``rollout.token_log_probs`` (no [B, N, V] log-probs) against plain-loop numpy: log p(token) at the
  sampling temperature, 0 off the mask, the entropy of every row, and the gradient of both through jit."""
  from rlhf_jax.generate import SamplingConfig
  from rlhf_jax.rollout import policy_log_probs, token_log_probs
  sampling = SamplingConfig(4, temperature=temperature)
  rng = np.random.default_rng(10)
  logits = (rng.normal(size=(3, 5, 7)) * 4).astype(np.float32)
  tokens = rng.integers(0, 7, (3, 5))
  mask = _prefix_mask(rng, 3, 5)
  lp, entropy = jax.jit(token_log_probs, static_argnums=3)(logits, tokens, mask, sampling)
  for b in range(3):
    for t in range(5):
      scaled = [float(v) / temperature for v in logits[b, t]]
      z = sum(math.exp(v) for v in scaled)
      probs = [math.exp(v) / z for v in scaled]
      want = math.log(probs[tokens[b, t]]) if mask[b, t] else 0.0
      np.testing.assert_allclose(lp[b, t], want, rtol=1e-5, atol=1e-6)
      # lse - E[logits]: a difference of two numbers ~10x the entropy, so absolute rounding ~1e-6.
      np.testing.assert_allclose(entropy[b, t], -sum(p * math.log(p) for p in probs), rtol=1e-5, atol=1e-5)

  def through_log_softmax(x):
    all_lp = policy_log_probs(x, sampling)
    chosen = jnp.take_along_axis(all_lp, jnp.asarray(tokens)[..., None], -1)[..., 0] * mask
    return chosen.sum() + 0.3 * (-(jnp.exp(all_lp) * all_lp).sum(-1)).sum()

  def through_normaliser(x):
    chosen, ent = token_log_probs(x, tokens, mask, sampling)
    return chosen.sum() + 0.3 * ent.sum()

  np.testing.assert_allclose(jax.jit(jax.grad(through_normaliser))(logits),
                             jax.jit(jax.grad(through_log_softmax))(logits), atol=1e-5)
