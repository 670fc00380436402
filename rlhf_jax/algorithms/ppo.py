"""PPO for language models: the ppo stage kind's config keys, experience from a rollout, and the update.

One iteration: a ``Rollout`` of the policy (``rlhf_jax.rollout``), optionally
cut at a stop token (``truncate_rollout``), scored by a ``Scorer`` (the frozen
RM), then ``make_experience`` (reference log-probs, values, per-token rewards
``-beta * KL + score at the last token``, GAE), then ``make_ppo_step``: E epochs x
M minibatches of clipped policy/value updates in one compiled function, which
also moves the KL coefficient held in the state (fixed, or the adaptive
controller of Ziegler et al.).

Log-probs are those of the policy's distribution (``rollout.policy_log_probs``:
softmax at the sampling temperature; top-k/top-p only filter proposals), for
the old policy, the new one and the reference alike, so the KL of a policy to
itself is exactly 0 and PPO ratios never see a token outside the support.

Advantage estimators (``advantage``), one rollout -> reward -> update path:
  * ``"gae"`` (PPO): per-token rewards ``-beta * KL`` plus the score at the last token, GAE
    over a learnt value model.
  * ``"rloo"``: the sequence reward ``score - beta * sum KL`` minus the mean of the other
    samples of the same prompt (leave-one-out; needs ``samples_per_prompt >= 2``); no value model.
  * ``"grpo"``: the score z-scored within its prompt's group (``group_scale_by_std=False``: only
    centred); no value model; the KL is not in the reward but in the loss,
    ``+ beta * k3(policy, reference)`` per token; ``drop_zero_variance_groups`` leaves groups whose
    samples all scored the same out of the loss.
  The critic-free estimators give every token of a response its sequence's advantage.

Value modes:
  * ``"none"``: no value model (rloo, grpo); ``state.params["value"]`` is ``{}``.
  * ``"separate"``: a ``ScalarModel`` over the full sequence, with its own
    params (``state.params["value"]``) and optimizer.
  * ``"shared"``: a scalar head on the policy trunk; ``state.params["value"]``
    holds only ``{"head", "head_bias"}``. The trunk gets the gradient of all
    terms (through the policy optimizer), the head only the value term.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from ml_collections import ConfigDict

from rlhf_jax import compute, data_parallel, losses, sharding
from rlhf_jax.config_groups import checkpoint_config, optimizer_config, sampling_config
from rlhf_jax.generate import SamplingConfig, sampling_log_probs
from rlhf_jax.models import DecoderConfig
from rlhf_jax.rl.gae import gae_advantages, per_token_rewards
from rlhf_jax.rl.group_advantages import GROUP_ESTIMATORS, grpo_advantages, rloo_advantages
from rlhf_jax.rl.kl import kl_k3, kl_penalty, sequence_kl, update_kl_coef
from rlhf_jax.rl.ppo_losses import clipped_policy_loss, clipped_value_loss, explained_variance
from rlhf_jax.rl.whitening import masked_mean, masked_var, masked_whiten
from rlhf_jax.rollout import (Rollout, picked, policy_log_probs, response_hidden, response_log_probs,
                              token_log_probs)
from rlhf_jax.state import TrainState, learning_rate_metrics, step_key

Array = jax.Array
PyTree = Any
ValueMode = Literal["separate", "shared", "none"]
VALUE_MODES = ("separate", "shared", "none")
ADVANTAGES = ("gae",) + GROUP_ESTIMATORS
VALUE_INITS = ("reward", "sft", "shared")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """PPO hyperparameters; ``sampling`` is the rollout sampler's config. These defaults are the config's.

  advantage: "gae" (PPO with a value model) | "rloo" | "grpo" (critic-free; see the module doc).
  drop_zero_variance_groups: grpo: rows of groups whose rewards are all equal leave the loss.
  group_scale_by_std: grpo: divide the centred group rewards by the group's std.
  kl_estimator: per-token KL penalty estimator "k1" | "k2" | "k3" (gae, rloo; grpo's loss uses k3).
  gamma, lam: GAE discount and lambda over response tokens.
  whiten_rewards: rescale per-token rewards to unit variance over the batch (mean kept).
  whiten_advantages: standardise advantages over the batch (mean 0, std 1).
  clip_eps: policy ratio clip range; value_clip: value clip range (reward units).
  value_coef, entropy_coef, ptx_coef: weights of the value loss, entropy bonus and pretraining loss.
  epochs, minibatches: passes over the rollout and minibatches per pass (rows must divide).
  no_eos_penalty: added to the score of responses that never end (no EOS / stop token); 0 = off.
  truncate_at_stop, stop_token: cut each response after its first ``stop_token`` (-1: the sampler's
    EOS) before scoring and training.
  old_log_probs: "teacher_forced" (a forward pass of the policy over the rollout) | "sampler" (the
    rollout's own log-probs: the sampler drew from the policy distribution itself, so they are the
    same numbers up to float rounding, and the experience skips the policy's LM head and, with a
    separate or no value model, its whole forward pass). "sampler" needs no top-k/top-p; its
    ``rollout/entropy`` is the sampled estimate -mean log p and ``rollout/logprob_diff`` is 0.
  share_prompt: with k = samples_per_prompt >= 2, the sampler's prefill and every model pass over the
    rollout (policy, reference, value, reward; experience and update) compute each prompt once for its k
    samples, and minibatches hold whole groups. The same values up to float rounding, for (1 - 1/k) less
    of the prompt columns' compute. When the prompts per iteration do not divide by ``minibatches``, the
    update runs per row.
  fuse_experience: with ``minibatches == 1``, the experience's policy and value passes are left to the
    update, whose first epoch runs at the same params: its forward pass gives the old log-probs and
    values (held constant, so every ratio starts at 1, as PPO's does) before the same pass's gradient
    (``ExperienceInputs``; the same numbers up to float rounding, one policy and one value forward pass
    less per iteration). The ``rollout/*`` metrics then come out of the update. No effect with
    ``minibatches > 1``: the later minibatches need the old policy's numbers for their rows.
  """

  sampling: SamplingConfig
  advantage: str = "gae"
  drop_zero_variance_groups: bool = False
  group_scale_by_std: bool = True
  kl_estimator: str = "k1"
  gamma: float = 1.0
  lam: float = 0.95
  whiten_rewards: bool = False
  whiten_advantages: bool = True
  clip_eps: float = 0.2
  value_clip: float = 0.2
  value_coef: float = 0.5
  entropy_coef: float = 0.0
  ptx_coef: float = 0.0
  epochs: int = 2
  minibatches: int = 2
  no_eos_penalty: float = 0.0
  truncate_at_stop: bool = False
  stop_token: int = -1
  old_log_probs: str = "teacher_forced"
  share_prompt: bool = True
  fuse_experience: bool = True

  def __post_init__(self):
    if self.advantage not in ADVANTAGES:
      raise ValueError(f"ppo.advantage must be one of {ADVANTAGES}, got {self.advantage!r}")
    if self.kl_estimator not in ("k1", "k2", "k3"):
      raise ValueError(f"ppo.kl_estimator must be k1, k2 or k3, got {self.kl_estimator!r}")
    if self.epochs < 1 or self.minibatches < 1:
      raise ValueError(f"ppo.epochs and ppo.minibatches must be >= 1, got {self.epochs}, {self.minibatches}")
    if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
      raise ValueError(f"ppo.gamma and ppo.lam must be in [0, 1], got {self.gamma}, {self.lam}")
    if self.old_log_probs not in ("teacher_forced", "sampler"):
      raise ValueError(f"ppo.old_log_probs must be 'teacher_forced' or 'sampler', got {self.old_log_probs!r}")
    if self.old_log_probs == "sampler" and not self.sampling.is_greedy and (
        self.sampling.top_k or self.sampling.top_p < 1.0):
      raise ValueError("ppo.old_log_probs='sampler' needs sampling without top_k/top_p: the sampler's "
                       "log-probs are then those of a truncated distribution, not the policy's")
    if self.clip_eps <= 0 or self.value_clip <= 0:
      raise ValueError(f"ppo.clip_eps and ppo.value_clip must be > 0, got {self.clip_eps}, {self.value_clip}")

  @classmethod
  def fields(cls) -> dict[str, Any]:
    """Field name -> default, for every field but ``sampling``."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name != "sampling"}

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any], sampling: SamplingConfig) -> "PPOConfig":
    """Builds from a config section (e.g. ``config.ppo``): its keys that are fields; the rest are ignored."""
    return cls(sampling=sampling, **{k: values[k] for k in cls.fields() if k in values})

  @property
  def critic_free(self) -> bool:
    """True for the group estimators (no value model)."""
    return self.advantage in GROUP_ESTIMATORS

  @property
  def stop_id(self) -> int:
    return self.sampling.eos_id if self.stop_token < 0 else self.stop_token

  @property
  def fuses_experience(self) -> bool:
    """Whether the update computes the policy's and value model's experience numbers itself
    (``fuse_experience`` with one minibatch): the stage then hands it ``ExperienceInputs``."""
    return self.fuse_experience and self.minibatches == 1


def ppo_config() -> ConfigDict:
  """Keys of a ``ppo`` instance (the PPOConfig fields and the loop around them).

  Inputs: ``policy`` (initial policy instance), ``reference`` (KL anchor and win-rate baseline),
  ``reward`` (the frozen reward-model instance).
  """
  c = ConfigDict(dict(kind="ppo", policy="sft", reference="sft", reward="reward",
                      iterations=80, prompts_per_iteration=32, samples_per_prompt=1, sampling=sampling_config(),
                      policy_optimizer=optimizer_config(3e-4, schedule="constant"),
                      value_optimizer=optimizer_config(1e-3, schedule="constant"),
                      value_init="reward",  # reward | sft | shared (a value head on the policy trunk)
                      kl_coef=0.1, kl_adaptive=False, kl_target=6.0, kl_horizon=10000, ptx_batch_size=16))
  c.update(PPOConfig.fields())
  c.update(checkpoint_config(20, log_every=5, eval_every=20).to_dict())
  return c


@struct.dataclass
class Experience:
  """One PPO batch: the (possibly truncated) rollout and per-token tensors [B, N] over its responses.

  log_probs: old policy (teacher-forced, policy distribution); ref_log_probs: reference policy;
  values: old values of the state before each token; kl: per-token penalty estimator (nats);
  rewards: per-token rewards (after optional whitening); advantages (after optional whitening) and
  returns (value targets); score: [B] sequence score (with the no-EOS penalty); keep: [B] 1 for rows
  the loss sees (0: a zero-variance group dropped by grpo). All [B, N] tensors are 0 where
  ``rollout.response_mask`` is 0.
  """

  rollout: Rollout
  log_probs: Array
  ref_log_probs: Array
  values: Array
  kl: Array
  rewards: Array
  advantages: Array
  returns: Array
  score: Array
  keep: Array

  @property
  def mask(self) -> Array:
    return self.rollout.response_mask

  @property
  def loss_mask(self) -> Array:
    """[B, N] the tokens the losses average over: real response tokens of kept rows."""
    return self.rollout.response_mask * self.keep[:, None].astype(self.rollout.response_mask.dtype)


@struct.dataclass
class ExperienceInputs:
  """What an experience needs besides the trained params: the rollout, the reference log-probs [B, N] and
  the score [B] (before the no-EOS penalty). ``make_ppo_update`` finishes it with its first forward pass
  (``PPOConfig.fuses_experience``)."""

  rollout: Rollout
  ref_log_probs: Array
  score: Array


def value_head_params(cfg: DecoderConfig) -> dict[str, Array]:
  """A zero-initialised value head for ``"shared"`` mode: {"head": [D], "head_bias": []}."""
  return {"head": jnp.zeros((cfg.d_model,), cfg.param_dtype), "head_bias": jnp.zeros((), cfg.param_dtype)}


def truncate_after_stop(tokens: Array, mask: Array, stop_token: int, pad_id: int) -> tuple[Array, Array]:
  """Cuts each response [B, N] after its first ``stop_token`` (kept); later tokens become ``pad_id``, mask 0."""
  is_stop = (tokens == stop_token) & mask.astype(bool)
  first = jnp.argmax(is_stop, axis=1)
  keep = jnp.where(is_stop.any(axis=1)[:, None], jnp.arange(tokens.shape[1])[None, :] <= first[:, None], True)
  mask = mask.astype(jnp.int32) * keep.astype(jnp.int32)
  return jnp.where(mask.astype(bool), tokens, pad_id), mask


def truncate_rollout(rollout: Rollout, cfg: PPOConfig) -> Rollout:
  """The rollout as PPO scores and trains on it: cut after the stop token when ``cfg.truncate_at_stop``."""
  if not cfg.truncate_at_stop:
    return rollout
  return rollout.with_response(*truncate_after_stop(rollout.response, rollout.response_mask, cfg.stop_id,
                                                    cfg.sampling.pad_id))


def response_ended(tokens: Array, mask: Array, cfg: PPOConfig) -> Array:
  """[B] bool: the response contains the sampler's EOS (or, with truncation, the stop token)."""
  real = mask.astype(bool)
  ended = ((tokens == cfg.sampling.eos_id) & real).any(axis=1)
  if cfg.truncate_at_stop:
    ended |= ((tokens == cfg.stop_id) & real).any(axis=1)
  return ended


def _check_value_mode(value_mode: str) -> None:
  if value_mode not in VALUE_MODES:
    raise ValueError(f"value_mode must be one of {VALUE_MODES}, got {value_mode!r}")


def _policy_and_values(policy_graphdef: nnx.GraphDef, policy_params: PyTree, value_graphdef: nnx.GraphDef | None,
                       value_params: PyTree, rollout: Rollout, cfg: PPOConfig,
                       value_mode: ValueMode, with_log_probs: bool = True) -> tuple[Array, Array, Array, Array]:
  """(token log-probs [B, N], entropy [B, N], logits [B, N, V], values [B, N]) of the current policy and value.

  Without ``with_log_probs`` the first three are None and the policy runs only if the value head sits on its
  trunk. The logits are None too unless the sampler truncates (top-k/top-p), whose log-probs the experience
  compares with them; they carry no gradient, nor does the entropy unless the loss has an entropy bonus.
  Under ``rows_call`` every output gets a dense cotangent, so an output outside the loss must be cut here
  or its zero cotangent runs through the backward pass.
  """
  token_lp = entropy = logits = None
  if with_log_probs or value_mode == "shared":
    model, hidden = response_hidden(policy_graphdef, policy_params, rollout)
  if with_log_probs:
    all_logits = model.logits_from_hidden(hidden)
    token_lp, entropy = token_log_probs(all_logits, rollout.response, rollout.response_mask, cfg.sampling)
    if not cfg.entropy_coef:
      entropy = jax.lax.stop_gradient(entropy)
    if _truncated(cfg.sampling):
      logits = jax.lax.stop_gradient(all_logits)
  if value_mode == "none":
    values = jnp.zeros(rollout.response.shape, jnp.float32)
  elif value_mode == "shared":
    head = value_params
    values = hidden.astype(jnp.float32) @ head["head"].astype(jnp.float32) + head["head_bias"].astype(jnp.float32)
  else:
    values = nnx.merge(value_graphdef, value_params).values(
        rollout.tokens, rollout.mask, queries=(rollout.prompt_len - 1, rollout.response_len),
        shared_prefix=rollout.shared_prefix)
  return token_lp, entropy, logits, values


def _truncated(sampling: SamplingConfig) -> bool:
  """Whether the sampler draws from a top-k/top-p truncation of the policy's distribution."""
  return bool(sampling.top_k or sampling.top_p < 1.0) and not sampling.is_greedy


def experience_inputs(policy_graphdef: nnx.GraphDef, ref_params: PyTree, rollout: Rollout, score: Array,
                      cfg: PPOConfig) -> ExperienceInputs:
  """The experience's numbers that do not depend on the trained params: the reference log-probs [B, N]
  (0 off the response mask) of ``rollout`` and its score [B]."""
  ref_log_probs, _ = response_log_probs(policy_graphdef, ref_params, rollout, cfg.sampling)
  return ExperienceInputs(rollout=rollout, ref_log_probs=ref_log_probs, score=score.astype(jnp.float32))


def finish_experience(inputs: ExperienceInputs, log_probs: Array | None, entropy: Array | None,
                      logits: Array | None, values: Array, beta: Array | float,
                      cfg: PPOConfig) -> tuple[Experience, dict[str, Array]]:
  """The experience from its inputs and the policy's and value model's numbers on the rollout (pure).

  log_probs [B, N], entropy [B, N], logits [B, N, V]: the policy's teacher-forced log-probs, its entropy and
  logits (None with ``old_log_probs="sampler"``: the rollout's log-probs are used); values [B, N] (zeros
  without a value model).
  Returns (experience, metrics) as ``make_experience``.
  """
  rollout = inputs.rollout
  s = cfg.sampling
  mask = rollout.response_mask.astype(jnp.int32)
  fmask = mask.astype(jnp.float32)
  if cfg.old_log_probs == "sampler":
    # Drawn from the policy's own distribution (no top-k/top-p, checked by PPOConfig) by the same params:
    # the teacher-forced forward would give these numbers up to float rounding (tests/test_ppo.py).
    log_probs, entropy, logits = rollout.log_probs * fmask, None, None
  values = values * fmask
  ref_log_probs = inputs.ref_log_probs

  raw_score = inputs.score
  ended = response_ended(rollout.response, mask, cfg)
  score = raw_score + cfg.no_eos_penalty * (~ended).astype(jnp.float32)

  kl = kl_penalty(log_probs, ref_log_probs, cfg.kl_estimator) * fmask
  keep = jnp.ones(score.shape, jnp.float32)
  extra = {}
  if cfg.advantage == "gae":
    rewards = per_token_rewards(score, kl, mask, beta)
    total_reward = rewards.sum(axis=1)
    if cfg.whiten_rewards:
      rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae_advantages(rewards, values, mask, cfg.gamma, cfg.lam)
  else:
    # Sequence-level: RLOO's reward carries the KL penalty; GRPO's KL is a loss term instead.
    if cfg.advantage == "rloo":
      total_reward = score - beta * kl.sum(axis=1)
      sequence_advantage = rloo_advantages(total_reward, rollout.group)
    else:
      total_reward = score
      sequence_advantage, zero_variance = grpo_advantages(score, rollout.group, cfg.group_scale_by_std)
      extra["rollout/zero_variance_fraction"] = zero_variance.astype(jnp.float32).mean()
      if cfg.drop_zero_variance_groups:
        keep = 1.0 - zero_variance.astype(jnp.float32)
    rewards = total_reward[:, None] * fmask
    advantages = sequence_advantage[:, None] * fmask
    returns = jnp.zeros_like(advantages)
  loss_mask = mask * keep[:, None].astype(jnp.int32)
  extra["rollout/advantage_std"] = jnp.sqrt(masked_var(advantages, loss_mask))
  if cfg.whiten_advantages:
    advantages = masked_whiten(advantages, loss_mask)

  # The sampler reports log-probs of the truncated (top-k/top-p) distribution; compare like with like.
  if _truncated(s):  # teacher-forced: PPOConfig allows sampler log-probs only without truncation
    # log_softmax(logits / T) truncated at temperature 1 is the sampler's distribution.
    all_lp = policy_log_probs(logits, s)
    sampled = picked(sampling_log_probs(all_lp, dataclasses.replace(s, temperature=1.0)), rollout.response, mask)
  else:
    sampled = log_probs
  finite = jnp.isfinite(sampled) & mask.astype(bool)
  logprob_diff = masked_mean(jnp.where(finite, jnp.abs(rollout.log_probs - sampled), 0.0), finite)

  experience = Experience(rollout=rollout, log_probs=log_probs, ref_log_probs=ref_log_probs, values=values, kl=kl,
                          rewards=rewards, advantages=advantages, returns=returns, score=score, keep=keep)
  metrics = {
      "rollout/rm_score": raw_score.mean(),
      "rollout/score": score.mean(),
      "rollout/kl": sequence_kl(log_probs, ref_log_probs, mask).mean(),
      "rollout/kl_penalty": (beta * kl).sum(axis=1).mean(),
      "rollout/total_reward": total_reward.mean(),
      "rollout/response_length": fmask.sum(axis=1).mean(),
      "rollout/no_eos_fraction": 1.0 - ended.astype(jnp.float32).mean(),
      "rollout/entropy": masked_mean(-log_probs if entropy is None else entropy, mask),
      "rollout/logprob_diff": logprob_diff,
      "rollout/value": masked_mean(values, mask),
      "rollout/return": masked_mean(returns, mask),
      **extra,
  }
  return experience, metrics


def make_experience(policy_graphdef: nnx.GraphDef, policy_params: PyTree, ref_params: PyTree,
                    value_graphdef: nnx.GraphDef | None, value_params: PyTree, rollout: Rollout,
                    score: Array, beta: Array | float, cfg: PPOConfig,
                    value_mode: ValueMode = "separate") -> tuple[Experience, dict[str, Array]]:
  """Builds the PPO batch from a rollout (pure; jit with the graphdefs, ``cfg`` and ``value_mode`` static).

  Args:
    policy_graphdef, policy_params: the sampling policy (a ``Decoder``); ref_params: the reference
      policy, same graphdef.
    value_graphdef, value_params: a ``ScalarModel`` (``"separate"``) or, for ``"shared"``, None and the
      head ``{"head", "head_bias"}`` on the policy trunk; for ``"none"`` (rloo, grpo) None and ``{}``.
    rollout: the rollout as trained on (already through ``truncate_rollout``).
    score: [B] scorer output on that rollout (the normalised RM score). The no-EOS penalty is added here.
    beta: scalar KL coefficient.

  Returns:
    (experience, metrics) with scalar metrics ``rollout/*``: ``rm_score`` (scorer output),
    ``score`` (with penalty), ``kl`` (mean summed log-ratio, nats), ``kl_penalty`` (mean summed
    beta * estimator), ``total_reward``, ``response_length``, ``no_eos_fraction``, ``entropy``
    (nats/token), ``logprob_diff`` (mean |sampler - teacher-forced| log-prob of the sampling
    distribution), ``value``, ``return``, ``advantage_std`` (before whitening) and, for grpo,
    ``zero_variance_fraction`` (rows whose group scored all equal).
  """
  _check_value_mode(value_mode)
  if cfg.critic_free != (value_mode == "none"):
    raise ValueError(f"ppo.advantage={cfg.advantage!r} does not go with value mode {value_mode!r}")
  outputs = _policy_and_values(policy_graphdef, policy_params, value_graphdef, value_params, rollout, cfg,
                               value_mode, with_log_probs=cfg.old_log_probs != "sampler")
  inputs = experience_inputs(policy_graphdef, ref_params, rollout, score, cfg)
  return finish_experience(inputs, *outputs, beta, cfg)


@functools.lru_cache(maxsize=16)
def make_experience_fn(policy_graphdef: nnx.GraphDef, value_graphdef: nnx.GraphDef | None, cfg: PPOConfig,
                       value_mode: ValueMode = "separate") -> Callable:
  """Jitted ``experience(policy_params, ref_params, value_params, rollout, score, beta) -> (Experience,
  metrics)``; see ``make_experience``. One function per distinct set of arguments in a process (PPO
  instances of an iterated run with equal settings share its compiled programs)."""

  @jax.jit
  def experience(policy_params, ref_params, value_params, rollout, score, beta):
    return make_experience(policy_graphdef, policy_params, ref_params, value_graphdef, value_params, rollout,
                           score, beta, cfg, value_mode)

  return experience


@functools.lru_cache(maxsize=16)
def make_experience_inputs_fn(policy_graphdef: nnx.GraphDef, cfg: PPOConfig) -> Callable:
  """Jitted ``inputs(ref_params, rollout, score) -> ExperienceInputs`` (``experience_inputs``): the
  experience's part before a fused update (``PPOConfig.fuses_experience``)."""
  return jax.jit(lambda ref_params, rollout, score: experience_inputs(policy_graphdef, ref_params, rollout,
                                                                       score, cfg))


def ppo_losses(policy_graphdef: nnx.GraphDef, value_graphdef: nnx.GraphDef | None, cfg: PPOConfig,
               value_mode: ValueMode, params: dict[str, PyTree], exp: Experience,
               ptx: dict[str, Array] | None, beta: Array | float = 0.0, mesh: jax.sharding.Mesh | None = None,
               rules: Any = sharding.DEFAULT_RULES) -> tuple[Array, dict[str, Array]]:
  """The PPO objective on one minibatch -> (total loss, metrics).

  params: {"policy": ..., "value": ...}; ptx: optional {tokens, mask, loss_mask} [b, T] pretraining rows;
  beta: the KL coefficient (used by grpo's loss term only).
  total = policy_loss - entropy_coef * entropy + value_coef * value_loss (+ ptx_coef * ptx_loss)
  (+ beta * mean k3(policy, reference) for grpo). Token means are over ``exp.loss_mask``. ``mesh``: the
  mesh the update is compiled for; the policy and value passes are then a ``data_parallel.rows_call``.
  """
  outputs = _rollout_outputs(policy_graphdef, value_graphdef, cfg, value_mode, params, exp.rollout, mesh, rules)
  return _losses_of_outputs(policy_graphdef, cfg, value_mode, params, outputs, exp, ptx, beta, mesh, rules)


def fused_ppo_losses(policy_graphdef: nnx.GraphDef, value_graphdef: nnx.GraphDef | None, cfg: PPOConfig,
                     value_mode: ValueMode, params: dict[str, PyTree], inputs: ExperienceInputs,
                     ptx: dict[str, Array] | None, beta: Array | float, mesh: jax.sharding.Mesh | None = None,
                     rules: Any = sharding.DEFAULT_RULES
                     ) -> tuple[Array, tuple[dict[str, Array], dict[str, Array], Experience]]:
  """``ppo_losses`` on the experience that ``params`` themselves give (``PPOConfig.fuses_experience``): one
  forward pass yields the old log-probs and values (held constant: ``finish_experience``) and the loss.
  Returns (total loss, (``train/*`` metrics, the experience's ``rollout/*`` metrics, the experience))."""
  outputs = _rollout_outputs(policy_graphdef, value_graphdef, cfg, value_mode, params, inputs.rollout, mesh, rules)
  old = jax.lax.stop_gradient(outputs)
  exp, rollout_metrics = finish_experience(inputs, *old, beta, cfg)
  total, metrics = _losses_of_outputs(policy_graphdef, cfg, value_mode, params, outputs, exp, ptx, beta, mesh, rules)
  return total, (metrics, rollout_metrics, exp)


def _rollout_outputs(policy_graphdef, value_graphdef, cfg, value_mode, params, rollout, mesh, rules):
  """(token log-probs, entropy, logits, values) of ``params`` on the rollout, rows split over ``mesh``."""
  def outputs(p, rows):
    return _policy_and_values(policy_graphdef, p["policy"], value_graphdef, p["value"], rows, cfg, value_mode)

  return data_parallel.rows_call(outputs, mesh, rules, row_group=rollout.prompt_group)(params, rollout)


def _losses_of_outputs(policy_graphdef, cfg, value_mode, params, outputs, exp, ptx, beta, mesh, rules):
  log_probs, token_entropy, _, values = outputs
  mask = exp.loss_mask
  policy_loss, pm = clipped_policy_loss(log_probs, exp.log_probs, exp.advantages, mask, cfg.clip_eps)
  entropy = masked_mean(token_entropy, mask)
  total = policy_loss
  metrics = {
      "train/policy_loss": policy_loss,
      "train/entropy": entropy,
      "train/clip_frac": pm["clip_frac"],
      "train/approx_kl": pm["approx_kl_k3"],
  }
  if value_mode != "none":
    value_loss, vm = clipped_value_loss(values, exp.values, exp.returns, mask, cfg.value_clip)
    total = total + cfg.value_coef * value_loss
    metrics.update({
        "train/value_loss": value_loss,
        "train/value_clip_frac": vm["value_clip_frac"],
        "train/explained_variance": explained_variance(jax.lax.stop_gradient(values), exp.returns, mask),
    })
  if cfg.advantage == "grpo":
    kl_loss = masked_mean(kl_k3(log_probs, exp.ref_log_probs), mask)
    total = total + beta * kl_loss
    metrics["train/kl_loss"] = kl_loss
  if cfg.entropy_coef:
    total = total - cfg.entropy_coef * entropy
  if cfg.ptx_coef:
    if ptx is None:
      raise ValueError("ppo.ptx_coef > 0 needs a pretraining batch ('ptx')")
    ptx_logits = data_parallel.rows_call(lambda p, rows: nnx.merge(policy_graphdef, p)(*rows)[0], mesh, rules)(
        params["policy"], (ptx["tokens"], ptx["mask"]))
    ptx_loss, _ = losses.next_token_loss(ptx_logits, ptx["tokens"], ptx["loss_mask"])
    total = total + cfg.ptx_coef * ptx_loss
    metrics["train/ptx_loss"] = ptx_loss
  metrics["train/total_loss"] = total
  return total, metrics


def _split_rows(key: Array, rows: int, minibatches: int, what: str, group: int = 1) -> Array:
  """A random permutation of ``rows`` split into [minibatches, rows // minibatches] indices; with ``group``
  g > 1 the rows ``i*g .. i*g+g-1`` stay together, in order (groups are permuted)."""
  if rows % (minibatches * group):
    whole = f" of {rows // group} groups of {group}" if group > 1 else ""
    raise ValueError(f"{what} has {rows} rows{whole}, not divisible by ppo.minibatches={minibatches}")
  order = jax.random.permutation(key, rows // group)
  return (order[:, None] * group + jnp.arange(group)).reshape(minibatches, rows // minibatches)


def update_shares_prompts(cfg: PPOConfig, prompts: int, samples_per_prompt: int) -> bool:
  """Whether the update keeps each prompt's k rows together and computes the prompt once: ``share_prompt``,
  k >= 2 and the ``prompts`` of an iteration split evenly into ``minibatches``."""
  return cfg.share_prompt and samples_per_prompt > 1 and prompts % cfg.minibatches == 0


def share_prompts(rollout: Rollout, cfg: PPOConfig, samples_per_prompt: int) -> Rollout:
  """The rollout marked as groups of ``samples_per_prompt`` rows sharing one prompt (``Rollout.prompt_group``)
  when ``cfg.share_prompt`` and k >= 2; its rows must be the k samples of each prompt in a row
  (``rollout.repeat_prompts``)."""
  if not cfg.share_prompt or samples_per_prompt < 2:
    return rollout
  if rollout.prompt.shape[0] % samples_per_prompt:
    raise ValueError(f"{rollout.prompt.shape[0]} rollout rows are not groups of {samples_per_prompt}")
  return rollout.replace(prompt_group=samples_per_prompt)


@functools.lru_cache(maxsize=16)
def make_ppo_update(policy_graphdef: nnx.GraphDef, value_graphdef: nnx.GraphDef | None,
                    policy_tx: optax.GradientTransformation, value_tx: optax.GradientTransformation,
                    cfg: PPOConfig, value_mode: ValueMode = "separate", mesh: jax.sharding.Mesh | None = None,
                    rules: Any = sharding.DEFAULT_RULES) -> Callable:
  """Builds ``update(state, batch, frozen=None) -> (state, metrics)`` for ``state.compile_step``.

  batch: {"experience": Experience [B rows], "ptx": None or {tokens, mask, loss_mask} [B_ptx, T]}.
  Runs ``cfg.epochs`` passes (``lax.scan``), each over a fresh permutation of the rows (keys from
  ``step_key(state)``) split into ``cfg.minibatches`` minibatches (an inner ``lax.scan``); the ptx rows
  are split the same way. Each minibatch takes one step of ``policy_tx`` on ``state.params["policy"]``
  and of ``value_tx`` on ``state.params["value"]``. ``state.step`` grows by 1 per call. Metrics
  ``train/*`` are means over all minibatches. ``mesh`` (and its ``rules``): the mesh the step is compiled
  for; each minibatch's rows are then split over its data axes as the batch's are (without it XLA may
  replicate the permuted minibatches, and every device computes all of them).

  With ``ExperienceInputs`` in place of the experience (``cfg.fuses_experience``: one minibatch), the first
  epoch's forward pass also gives the old log-probs and values (``fused_ppo_losses``, KL coefficient
  ``state.scalars["kl_coef"]``, 0 without one); the metrics then hold the experience's ``rollout/*`` too.
  """
  _check_value_mode(value_mode)
  objective = jax.value_and_grad(
      lambda params, exp, ptx, beta: ppo_losses(policy_graphdef, value_graphdef, cfg, value_mode, params, exp,
                                                ptx, beta, mesh, rules),
      has_aux=True)
  fused_objective = jax.value_and_grad(
      lambda params, inputs, ptx, beta: fused_ppo_losses(policy_graphdef, value_graphdef, cfg, value_mode, params,
                                                         inputs, ptx, beta, mesh, rules),
      has_aux=True)

  def apply_grads(carry, grads, metrics):
    params, opt_state = carry
    p_updates, p_opt = policy_tx.update(grads["policy"], opt_state["policy"], params["policy"])
    v_updates, v_opt = value_tx.update(grads["value"], opt_state["value"], params["value"])
    params = {"policy": optax.apply_updates(params["policy"], p_updates),
              "value": optax.apply_updates(params["value"], v_updates)}
    metrics["train/policy_grad_norm"] = optax.tree.norm(grads["policy"])
    metrics.update(learning_rate_metrics(opt_state["policy"]))  # the rate of this minibatch's update
    if value_mode != "none":
      metrics["train/value_grad_norm"] = optax.tree.norm(grads["value"])
      metrics.update(learning_rate_metrics(opt_state["value"], "train/value_lr"))
    return (params, {"policy": p_opt, "value": v_opt}), metrics

  def minibatch_step(carry, xs, beta):
    exp, ptx = xs
    (_, metrics), grads = objective(carry[0], exp, ptx, beta)
    return apply_grads(carry, grads, metrics)

  def update(state: TrainState, batch: Mapping[str, Any], frozen: Any = None) -> tuple[TrainState, dict]:
    del frozen
    exp: Experience | ExperienceInputs = batch["experience"]
    ptx = batch.get("ptx") if cfg.ptx_coef else None
    m = cfg.minibatches
    rows = exp.rollout.response.shape[0]
    beta = state.scalars["kl_coef"] if "kl_coef" in state.scalars else 0.0
    fused = isinstance(exp, ExperienceInputs)
    if fused and m != 1:
      raise ValueError(f"ExperienceInputs are finished by the update's first pass, which needs "
                       f"ppo.minibatches=1, got {m}: give the update an Experience (make_experience)")
    group = exp.rollout.prompt_group
    if group > 1 and not update_shares_prompts(cfg, rows // group, group):
      # Groups do not split evenly into minibatches: row-level minibatches, each row its own prompt pass.
      exp, group = exp.replace(rollout=exp.rollout.replace(prompt_group=1)), 1

    def epoch(carry, key, exp):
      idx = _split_rows(jax.random.fold_in(key, 0), rows, m, "experience", group)
      mb_exp = jax.tree.map(lambda x: x[idx], exp)  # [M, B/M, ...]
      mb_ptx = None
      if ptx is not None:
        ptx_idx = _split_rows(jax.random.fold_in(key, 1), ptx["tokens"].shape[0], m, "ptx batch")
        mb_ptx = jax.tree.map(lambda x: x[ptx_idx], ptx)
      if mesh is not None:
        mb_exp, mb_ptx = sharding.constrain_minibatch_rows((mb_exp, mb_ptx), mesh, rules)
      return jax.lax.scan(lambda c, xs: minibatch_step(c, xs, beta), carry, (mb_exp, mb_ptx))

    keys = jax.random.split(step_key(state), cfg.epochs)
    carry = ({"policy": state.params["policy"], "value": state.params["value"]},
             {"policy": state.opt_state["policy"], "value": state.opt_state["value"]})
    if fused:
      # The first epoch is one minibatch of all rows (in any order: the losses are means), at the params
      # the experience is taken from; the later epochs train on the experience it finished.
      (_, (first, rollout_metrics, exp)), grads = fused_objective(carry[0], exp, ptx, beta)
      carry, first = apply_grads(carry, grads, first)
      metrics = jax.tree.map(lambda x: x[None, None], first)  # as one epoch of one minibatch
      if cfg.epochs > 1:
        carry, rest = jax.lax.scan(functools.partial(epoch, exp=exp), carry, keys[1:])
        metrics = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), metrics, rest)
    else:
      rollout_metrics = {}
      carry, metrics = jax.lax.scan(functools.partial(epoch, exp=exp), carry, keys)
    params, opt_state = carry
    new_state = state.replace(step=state.step + 1, params={**state.params, **params},
                              opt_state={**state.opt_state, **opt_state})
    return new_state, {**jax.tree.map(jnp.mean, metrics), **rollout_metrics}

  return update


def make_ppo_step(update: Callable, section: Mapping[str, Any], rows: int) -> Callable:
  """Wraps a PPO ``update``: also moves ``state.scalars["kl_coef"]`` with the rollout's KL (``batch["kl"]``,
  or with ``ExperienceInputs``, where ``batch["kl"]`` is None, the update's ``rollout/kl``).

  section: the instance's config (kl_adaptive, kl_target, kl_horizon); rows: samples per iteration.
  """
  adaptive = bool(section["kl_adaptive"])
  if not adaptive:
    return _kl_controlled_step(update, rows, "fixed", None, None)
  return _kl_controlled_step(update, rows, "adaptive", section["kl_target"], section["kl_horizon"])


@functools.lru_cache(maxsize=16)
def _kl_controlled_step(update: Callable, rows: int, kind: str, target: float | None,
                        horizon: float | None) -> Callable:
  """One function per distinct settings in a process (its compiled programs are then shared)."""

  def step(state: TrainState, batch, frozen):
    new_state, metrics = update(state, batch, frozen)
    kl = metrics["rollout/kl"] if batch.get("kl") is None else batch["kl"]
    beta = update_kl_coef(state.scalars["kl_coef"], kl, rows, kind=kind, target=target, horizon=horizon)
    metrics["train/kl_coef"] = state.scalars["kl_coef"]
    return new_state.replace(scalars={**new_state.scalars, "kl_coef": beta}), metrics

  return step


def iteration_counts(model_cfg: DecoderConfig, cfg: PPOConfig, rows: int, prompt_len: int, response_lengths,
                     value_mode: ValueMode, ptx_shape: tuple[int, int] | None = None,
                     samples_per_prompt: int = 1, response_width: int | None = None) -> compute.Counts:
  """Compute of one PPO iteration: the rollout, the scoring passes over [rows, P + W] (policy unless
  ``old_log_probs="sampler"`` skips it, reference, value model if separate, RM; neither policy nor value
  when the update finishes the experience, ``cfg.fuses_experience``), and ``epochs`` training
  passes of the policy and value model (+ the ptx rows). W is ``response_width`` (the rollout's response
  columns after ``rollout.trim_response_width``), by default the sampler's N. With ``share_prompt`` each
  prompt's columns count once per ``samples_per_prompt`` rows, in the sampler's prefill too."""
  n = cfg.sampling.max_new_tokens
  width = n if response_width is None else response_width
  k = samples_per_prompt
  counts = compute.rollout_counts(model_cfg, rows, prompt_len, response_lengths, n,
                                  prompt_group=k if cfg.share_prompt else 1)

  def passes(shared: bool) -> tuple[float, float]:
    prefix = (prompt_len, k) if shared else None
    return (compute.sequence_flops(model_cfg, rows, prompt_len + width, shared_prefix=prefix),
            compute.sequence_flops(model_cfg, rows, prompt_len + width, lm_head=False, shared_prefix=prefix))

  lm, scalar = passes(cfg.share_prompt and k > 1)
  lm_train, scalar_train = passes(update_shares_prompts(cfg, rows // k, k))
  value = scalar if value_mode == "separate" and not cfg.fuses_experience else 0.0
  value_train = scalar_train if value_mode == "separate" else 0.0
  ptx = compute.sequence_flops(model_cfg, *ptx_shape) if ptx_shape and cfg.ptx_coef else 0.0
  policy_pass = 0 if cfg.fuses_experience or (cfg.old_log_probs == "sampler" and value_mode != "shared") else 1
  counts.flops += (policy_pass + 1) * lm + value + scalar + cfg.epochs * 3 * (lm_train + value_train + ptx)
  counts.grad_steps = float(cfg.epochs * cfg.minibatches)
  return counts
