"""Reward-filtered fine-tuning (RFT): the rft stage kind's config keys, selection, and rollout -> SFT batch.

R rounds ("Grow" in ReST): sample ``samples_per_prompt`` responses to
``prompts_per_round`` prompts from the current policy, score them with the
reward model, then ``improve_passes`` passes ("Improve"), each keeping the
samples its selection rule picks and taking ``improve_steps`` SFT steps on
them. Rules (``rlhf_jax.rl.selection``): best_of_n (RAFT / Llama 2), threshold
(ReST, rising with every pass: ``threshold_start + threshold_step * k`` for the
k-th pass of the run), top_fraction, and kl_aware (best of n under
``score - kl_beta * log pi/pi_ref``).
"""

from __future__ import annotations

import numpy as np
from ml_collections import ConfigDict

from rlhf_jax import compute
from rlhf_jax.config_groups import checkpoint_config, optimizer_config, sampling_config
from rlhf_jax.models import DecoderConfig
from rlhf_jax.rl import selection
from rlhf_jax.rollout import shared_run

ROLLOUT_ROWS = 64  # rows per sampler call while growing


def rft_config() -> ConfigDict:
  """Keys of an ``rft`` instance. Inputs: ``policy`` (start), ``reference`` (for kl_aware and eval/kl),
  ``reward`` (the frozen reward model that scores samples)."""
  c = ConfigDict(dict(kind="rft", policy="sft", reference="sft", reward="reward",
                      rounds=4, prompts_per_round=64, samples_per_prompt=8, sampling=sampling_config(),
                      selection="best_of_n", threshold_start=0.0, threshold_step=0.25, top_fraction=0.125,
                      kl_beta=0.1, improve_passes=1, improve_steps=20, batch_size=16,
                      # PPO's policy learning rate, so the two arms of an ablation differ in the method only.
                      optimizer=optimizer_config(3e-4, schedule="constant")))
  c.update(checkpoint_config(20, log_every=5, eval_every=0).to_dict())
  return c


def total_steps(cfg) -> int:
  """Gradient steps of the whole run."""
  return cfg.rounds * cfg.improve_passes * cfg.improve_steps


def schedule(cfg, step: int) -> tuple[int, int]:
  """(round, improve pass within the round) of gradient step ``step``."""
  per_round = cfg.improve_passes * cfg.improve_steps
  return step // per_round, (step % per_round) // cfg.improve_steps


def select(cfg, scores: np.ndarray, group: np.ndarray, log_ratio: np.ndarray, round_index: int,
           improve_pass: int) -> np.ndarray:
  """Indices of the grown samples that pass ``improve_pass`` of round ``round_index`` (sorted)."""
  rule = cfg.selection
  if rule == "best_of_n":
    return selection.best_of_n(scores, group)
  if rule == "threshold":
    k = round_index * cfg.improve_passes + improve_pass
    return selection.threshold(scores, selection.rest_threshold(k, cfg.threshold_start, cfg.threshold_step))
  if rule == "top_fraction":
    return selection.top_fraction(scores, cfg.top_fraction)
  if rule == "kl_aware":
    return selection.kl_aware(scores, log_ratio, group, cfg.kl_beta)
  raise ValueError(f"rft.selection must be one of {selection.RULES}, got {rule!r}")


def sampler_group(samples_per_prompt: int) -> int:
  """Rows per prefilled prompt in each sampler call of ``ROLLOUT_ROWS`` rows (``rollout.shared_run``)."""
  return shared_run(samples_per_prompt, ROLLOUT_ROWS)


def scoring_flops(model_cfg: DecoderConfig, rows: int, width: int,
                  shared_prefix: tuple[int, int] | None = None) -> float:
  """FLOPs of scoring grown samples [rows, width]: one RM pass and two log-prob passes (policy, reference);
  ``shared_prefix``: see ``compute.sequence_flops``."""
  return (compute.sequence_flops(model_cfg, rows, width, lm_head=False, shared_prefix=shared_prefix)
          + 2 * compute.sequence_flops(model_cfg, rows, width, shared_prefix=shared_prefix))


def sft_rows(prompt: np.ndarray, prompt_mask: np.ndarray, response: np.ndarray,
             response_mask: np.ndarray) -> dict[str, np.ndarray]:
  """An SFT batch from rollout rows: tokens, mask [B, P+N] and a loss mask on the response tokens only."""
  tokens = np.concatenate([prompt, response], axis=1).astype(np.int32)
  mask = np.concatenate([prompt_mask, response_mask], axis=1).astype(np.int32)
  loss_mask = np.concatenate([np.zeros_like(prompt_mask), response_mask], axis=1).astype(np.float32)
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}
