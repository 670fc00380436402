"""Direct preference optimisation: DPO and IPO losses over K-wise rankings (pure, jit-able).

A response y to a prompt x has the log-ratio ``h(y) = log pi(y|x) - log pi_ref(y|x)``, the sum of its
response tokens' log-probs under the policy minus under the reference (``sequence_log_ratio``; with
``average=True`` the per-token mean instead). Its implicit reward is ``beta * h(y)``. For a preferred
response w and a dispreferred l, with ``d = h(w) - h(l)``:

* DPO (Rafailov et al. 2023): ``-log sigmoid(beta * d)``; with label smoothing eps (conservative DPO,
  the labels flipped with probability eps): ``-(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)``.
* IPO (Azar et al. 2023): ``(d - 1 / (2 beta))^2``, which regresses the margin to a finite target
  instead of pushing it to infinity.

Which log-ratio IPO uses: the IPO paper writes ``pi(y|x)``, the probability of the whole response, i.e.
the summed log-probs used here by default for both losses; TRL's IPO averages log-probs over tokens.
That is ``average=True`` in ``sequence_log_ratio`` (the stage's ``average_log_probs``), which puts
``1 / (2 beta)`` on the per-token scale and removes the loss's pull towards longer responses.

K-wise rankings are expanded the InstructGPT way: a prompt with k real responses (``valid`` [B, K],
padded slots 0; k may differ per prompt) contributes every pair (w, l) with ``ranks[w] < ranks[l]``, each
weighted ``1 / (number of pairs of that prompt)`` (``1 / C(k, 2)`` without ties), so each prompt counts
once; the loss is the mean over prompts that have at least one pair. Equal ranks (ties) form no pair.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses import tie_half_correct

LOSSES = ("dpo", "ipo")


def sequence_log_prob(log_probs: jax.Array, mask: jax.Array, average: bool = False) -> jax.Array:
  """Per-response log-prob: the sum (or with ``average``, static, the mean) over real tokens.

  Args:
    log_probs: [..., N] per-token log-probs of the response tokens (any float dtype).
    mask: [..., N], 1 on real response tokens.

  Returns:
    [...] float32 (0 for an empty response).
  """
  mask = mask.astype(jnp.float32)
  total = (log_probs.astype(jnp.float32) * mask).sum(axis=-1)
  if average:
    return total / jnp.maximum(mask.sum(axis=-1), 1.0)
  return total


def sequence_log_ratio(log_probs: jax.Array, ref_log_probs: jax.Array, mask: jax.Array,
                       average: bool = False) -> jax.Array:
  """Per-response log-ratio of policy to reference: ``sequence_log_prob`` of ``log_probs - ref_log_probs``
  (both [..., N], any float dtype) -> [...] float32."""
  return sequence_log_prob(log_probs.astype(jnp.float32) - ref_log_probs.astype(jnp.float32), mask, average)


def pair_weights(ranks: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Weights of the ordered pairs of each prompt's K-wise ranking.

  Args:
    ranks: [B, K] int, 0 = best; equal ranks are ties.
    valid: [B, K], 1 for real responses (padded slots 0).

  Returns:
    (weight [B, K, K] float32, weight[b, w, l] = 1 / pairs_b where w ranks strictly above l and both are
    real, else 0; pairs [B] float32, the number of such pairs of each prompt).
  """
  real = valid.astype(bool)
  pair = (ranks[:, :, None] < ranks[:, None, :]) & real[:, :, None] & real[:, None, :]
  pair = pair.astype(jnp.float32)
  pairs = pair.sum(axis=(1, 2))
  return pair / jnp.maximum(pairs, 1.0)[:, None, None], pairs


def pair_losses(margin: jax.Array, beta: float, loss: str = "dpo", label_smoothing: float = 0.0) -> jax.Array:
  """Loss of each pair from its log-ratio margin ``d = h(w) - h(l)`` (any shape, float32).

  ``loss`` is static: "dpo" (with ``label_smoothing`` eps in [0, 0.5)) or "ipo" (no smoothing)."""
  if loss == "dpo":
    logits = beta * margin
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * jax.nn.log_sigmoid(-logits)
  if loss == "ipo":
    return (margin - 1.0 / (2.0 * beta)) ** 2
  raise ValueError(f"preference loss must be one of {LOSSES}, got {loss!r}")


def preference_loss(log_ratio: jax.Array, ranks: jax.Array, valid: jax.Array, beta: float, loss: str = "dpo",
                    label_smoothing: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DPO / IPO loss of K-wise rankings, every ranked pair of a prompt in one batch element.

  Args:
    log_ratio: [B, K] log-ratio h of each response (``sequence_log_ratio``).
    ranks: [B, K] int, 0 = best; ties form no pair.
    valid: [B, K], 1 for real responses.
    beta: the KL strength (scalar).
    loss: "dpo" or "ipo" (static).
    label_smoothing: conservative DPO's label-flip probability (dpo only).

  Returns:
    (loss, metrics): the mean over prompts with at least one pair of each prompt's pair-weighted loss
    (0 when no prompt has a pair). Metrics, weighted the same way: ``accuracy`` (pairs whose implicit
    reward ``beta * h`` ranks w above l; equal rewards count half, so the first step, where the policy is
    the reference, reads 0.5), ``chosen_reward`` and
    ``rejected_reward`` (mean ``beta * h`` of the preferred and the dispreferred response of a pair),
    ``margin`` (their difference); ``num_pairs`` and ``num_prompts`` are counts over the batch.
  """
  h = log_ratio.astype(jnp.float32)
  weight, pairs = pair_weights(ranks, valid)
  num_prompts = (pairs > 0).astype(jnp.float32).sum()
  denominator = jnp.maximum(num_prompts, 1.0)
  margin = h[:, :, None] - h[:, None, :]  # [B, w, l]

  def mean(x):
    return (x * weight).sum() / denominator

  reward = beta * h
  metrics = {"accuracy": mean(tie_half_correct(margin)),
             "chosen_reward": mean(jnp.broadcast_to(reward[:, :, None], margin.shape)),
             "rejected_reward": mean(jnp.broadcast_to(reward[:, None, :], margin.shape)),
             "margin": mean(beta * margin), "num_pairs": pairs.sum(), "num_prompts": num_prompts}
  return mean(pair_losses(margin, beta, loss, label_smoothing)), metrics


def ranks_from_scores(scores: jax.Array, valid: jax.Array) -> jax.Array:
  """Ranks [B, K] int32 (0 = best) of scores [B, K]: the number of real responses scored strictly higher,
  so equal scores tie (and form no pair)."""
  real = valid.astype(bool)
  higher = (scores[:, None, :] > scores[:, :, None]) & real[:, None, :]
  return higher.sum(axis=-1).astype(jnp.int32)
