"""PPO for language models: experience from a rollout, and the epochs x minibatches update.

A rollout is a left-padded prompt [B, P] and a right-padded ``Sample`` [B, N].
The full sequence is ``prompt ++ response`` [B, P + N]; response token i sits
at column P + i and is predicted from (and its state's value is read at)
column P + i - 1, so every per-token tensor here is the window
``[:, P - 1 : P + N - 1]`` of a forward pass over the full sequence.

Policy log-probs are always those of the distribution the sampler draws
from (``sampling_log_probs``: temperature, top-k, top-p), so old log-probs
from the rollout and new ones from teacher forcing are comparable. The
reference policy is read at the same temperature but without top-k/top-p:
a truncated reference would give sampled tokens probability 0 and the KL
penalty an infinite value.

Value modes:
  * ``"separate"``: a ``ScalarModel`` over the full sequence, with its own
    params (``state.params["value"]``) and optimizer.
  * ``"shared"``: a scalar head on the policy trunk; ``state.params["value"]``
    holds only ``{"head", "head_bias"}``. One objective
    ``policy_loss - entropy_coef * entropy + ptx_coef * ptx_loss
    + value_coef * value_loss`` is differentiated: the trunk gets the gradient
    of all terms (through the policy optimizer), the head only the value term
    (through the value optimizer).
In ``"separate"`` mode the same sum is used; as the param trees are disjoint,
each model sees only its own terms.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from rlhf_jax import losses
from rlhf_jax.generate import Sample, SamplingConfig, sampling_log_probs
from rlhf_jax.models import DecoderConfig
from rlhf_jax.rl.gae import gae_advantages, per_token_rewards
from rlhf_jax.rl.kl import kl_penalty, sequence_kl
from rlhf_jax.rl.ppo_losses import clipped_policy_loss, clipped_value_loss, explained_variance
from rlhf_jax.rl.whitening import masked_mean, masked_whiten
from rlhf_jax.state import TrainState, step_key

Array = jax.Array
PyTree = Any
ValueMode = Literal["separate", "shared"]
_VALUE_MODES = ("separate", "shared")
MIN_LOG_PROB = -30.0  # nats; floor for tokens outside the (top-k/top-p) support


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """PPO hyperparameters; ``sampling`` is the rollout sampler's config (defines the policy distribution).

  kl_estimator: per-token KL penalty estimator "k1" | "k2" | "k3".
  gamma, lam: GAE discount and lambda over response tokens.
  whiten_rewards: rescale per-token rewards to unit variance over the batch (mean kept).
  whiten_advantages: standardise advantages over the batch (mean 0, std 1).
  clip_eps: policy ratio clip range; value_clip: value clip range (reward units).
  value_coef, entropy_coef, ptx_coef: weights of the value loss, entropy bonus and pretraining loss.
  epochs, minibatches: passes over the rollout and minibatches per pass (rows must divide).
  no_eos_penalty: added to the score of responses that never end (no EOS / stop token); 0 = off.
  truncate_at_stop, stop_token: cut each response after its first ``stop_token``
    (None: the sampler's EOS) before scoring and training.
  """

  sampling: SamplingConfig
  kl_estimator: str = "k1"
  gamma: float = 1.0
  lam: float = 0.95
  whiten_rewards: bool = False
  whiten_advantages: bool = True
  clip_eps: float = 0.2
  value_clip: float = 0.2
  value_coef: float = 0.1
  entropy_coef: float = 0.0
  ptx_coef: float = 0.0
  epochs: int = 1
  minibatches: int = 1
  no_eos_penalty: float = 0.0
  truncate_at_stop: bool = False
  stop_token: int | None = None

  def __post_init__(self):
    if self.kl_estimator not in ("k1", "k2", "k3"):
      raise ValueError(f"ppo.kl_estimator must be k1, k2 or k3, got {self.kl_estimator!r}")
    if self.epochs < 1 or self.minibatches < 1:
      raise ValueError(f"ppo.epochs and ppo.minibatches must be >= 1, got {self.epochs}, {self.minibatches}")
    if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
      raise ValueError(f"ppo.gamma and ppo.lam must be in [0, 1], got {self.gamma}, {self.lam}")
    if self.clip_eps <= 0 or self.value_clip <= 0:
      raise ValueError(f"ppo.clip_eps and ppo.value_clip must be > 0, got {self.clip_eps}, {self.value_clip}")

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any], sampling: SamplingConfig) -> "PPOConfig":
    """Builds from a config mapping (e.g. ``config.ppo``) plus the rollout sampling config, naming unknown keys."""
    known = {f.name for f in dataclasses.fields(cls)} - {"sampling"}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown ppo config keys {unknown}; known: {sorted(known)}")
    return cls(sampling=sampling, **dict(values))

  @property
  def stop_id(self) -> int:
    return self.sampling.eos_id if self.stop_token is None else self.stop_token


@struct.dataclass
class Experience:
  """One PPO batch. prompt/prompt_mask: [B, P] left-padded; score: [B]; the rest [B, N] per response token.

  mask: 1 for response tokens that are trained on (after truncation); log_probs: old policy
  (teacher-forced, sampling distribution); ref_log_probs: reference policy; values: old values of the
  state before each token; kl: per-token penalty estimator (nats); rewards: per-token rewards (after
  optional whitening); advantages (after optional whitening) and returns (value targets).
  All [B, N] float tensors are 0 where ``mask`` is 0.
  """

  prompt: Array
  prompt_mask: Array
  tokens: Array
  mask: Array
  log_probs: Array
  ref_log_probs: Array
  values: Array
  kl: Array
  rewards: Array
  advantages: Array
  returns: Array
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


def response_ended(tokens: Array, mask: Array, cfg: PPOConfig) -> Array:
  """[B] bool: the response contains the sampler's EOS (or, with truncation, the stop token)."""
  real = mask.astype(bool)
  ended = ((tokens == cfg.sampling.eos_id) & real).any(axis=1)
  if cfg.truncate_at_stop:
    ended |= ((tokens == cfg.stop_id) & real).any(axis=1)
  return ended


def _entropy(log_probs: Array) -> Array:
  """Entropy [...] (nats) of log-probs [..., V] that may hold -inf (top-k/top-p); NaN-free gradients."""
  finite = jnp.where(jnp.isfinite(log_probs), log_probs, 0.0)
  return -(jnp.exp(log_probs) * finite).sum(axis=-1)


def _picked(log_probs: Array, tokens: Array, mask: Array) -> Array:
  """Log-prob [B, N] of each token from log_probs [B, N, V], floored at ``MIN_LOG_PROB``; 0 where mask is 0.

  Under top-k/top-p a token the old policy sampled can leave the updated policy's support (-inf); the
  floor keeps its ratio ~0 (no gradient) and the KL diagnostics finite.
  """
  lp = jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
  return jnp.where(mask.astype(bool), jnp.maximum(lp, MIN_LOG_PROB), 0.0)


def _window(x: Array, p: int, n: int) -> Array:
  """Columns P-1 .. P+N-2 of a full-sequence tensor [B, P+N, ...]: the state before each response token."""
  return x[:, p - 1:p + n - 1]


def _policy_forward(graphdef: nnx.GraphDef, params: PyTree, head: PyTree | None, tokens: Array, mask: Array,
                    p: int, n: int) -> tuple[Array, Array | None]:
  """Policy logits [B, N, V] over the response window, and shared-head values [B, N] (None without a head)."""
  model = nnx.merge(graphdef, params)
  hidden, _ = model.trunk(tokens, mask)
  hidden = _window(hidden, p, n)
  values = None
  if head is not None:
    values = hidden.astype(jnp.float32) @ head["head"].astype(jnp.float32) + head["head_bias"].astype(jnp.float32)
  return model.logits_from_hidden(hidden), values


def _values(value_graphdef: nnx.GraphDef | None, value_params: PyTree, tokens: Array, mask: Array,
            p: int, n: int) -> Array:
  """Separate value model: values [B, N] of the state before each response token."""
  return _window(nnx.merge(value_graphdef, value_params).values(tokens, mask), p, n)


def _check_value_mode(value_mode: str) -> None:
  if value_mode not in _VALUE_MODES:
    raise ValueError(f"value_mode must be one of {_VALUE_MODES}, got {value_mode!r}")


def make_experience(policy_graphdef: nnx.GraphDef, policy_params: PyTree, ref_params: PyTree,
                    value_graphdef: nnx.GraphDef | None, value_params: PyTree,
                    reward_graphdef: nnx.GraphDef | None, reward_params: PyTree,
                    prompt: Array, prompt_mask: Array, sample: Sample, beta: Array | float, cfg: PPOConfig,
                    value_mode: ValueMode = "separate", score: Array | None = None
                    ) -> tuple[Experience, dict[str, Array]]:
  """Builds the PPO batch from a rollout (pure; jit with the graphdefs, ``cfg`` and ``value_mode`` static).

  Args:
    policy_graphdef, policy_params: the sampling policy (a ``Decoder``).
    ref_params: reference (SFT) policy params, same graphdef.
    value_graphdef, value_params: a ``ScalarModel`` (``"separate"``) or, for ``"shared"``, None and the
      head ``{"head", "head_bias"}`` on the policy trunk.
    reward_graphdef, reward_params: a ``ScalarModel`` whose output is the normalised reward; unused
      (may be None) when ``score`` is given.
    prompt, prompt_mask: [B, P] left-padded prompts; sample: the rollout, [B, N].
    beta: scalar KL coefficient.
    score: optional precomputed score [B] (e.g. a gold reward) instead of the reward model; it should
      be computed on the response as truncated by ``truncate_after_stop`` when ``cfg.truncate_at_stop``.
      The no-EOS penalty is still added.

  Returns:
    (experience, metrics) with scalar metrics ``rollout/*``: ``rm_score`` (scorer output),
    ``score`` (with penalty), ``kl`` (mean summed log-ratio, nats), ``kl_penalty`` (mean summed
    beta * estimator), ``total_reward``, ``response_length``, ``no_eos_fraction``, ``entropy``
    (nats/token), ``logprob_diff`` (mean |sampler - teacher-forced| log-prob), ``value``, ``return``.
  """
  _check_value_mode(value_mode)
  s = cfg.sampling
  p, n = prompt.shape[1], sample.tokens.shape[1]
  tokens, mask = sample.tokens, sample.mask.astype(jnp.int32)
  if cfg.truncate_at_stop:
    tokens, mask = truncate_after_stop(tokens, mask, cfg.stop_id, s.pad_id)
  full_tokens = jnp.concatenate([prompt, tokens], axis=1)
  full_mask = jnp.concatenate([prompt_mask.astype(jnp.int32), mask], axis=1)
  fmask = mask.astype(jnp.float32)

  head = value_params if value_mode == "shared" else None
  logits, values = _policy_forward(policy_graphdef, policy_params, head, full_tokens, full_mask, p, n)
  if value_mode == "separate":
    values = _values(value_graphdef, value_params, full_tokens, full_mask, p, n)
  values = values * fmask
  policy_lp = sampling_log_probs(logits, s)
  log_probs = _picked(policy_lp, tokens, mask)
  ref_logits, _ = _policy_forward(policy_graphdef, ref_params, None, full_tokens, full_mask, p, n)
  ref_sampling = dataclasses.replace(s, top_k=0, top_p=1.0)
  ref_log_probs = _picked(sampling_log_probs(ref_logits, ref_sampling), tokens, mask)

  if score is None:
    if reward_graphdef is None:
      raise ValueError("make_experience needs a reward model (reward_graphdef) or a precomputed score")
    score = nnx.merge(reward_graphdef, reward_params)(full_tokens, full_mask)
  raw_score = score.astype(jnp.float32)
  ended = response_ended(tokens, mask, cfg)
  score = raw_score + cfg.no_eos_penalty * (~ended).astype(jnp.float32)

  kl = kl_penalty(log_probs, ref_log_probs, cfg.kl_estimator) * fmask
  rewards = per_token_rewards(score, kl, mask, beta)
  total_reward = rewards.sum(axis=1)
  if cfg.whiten_rewards:
    rewards = masked_whiten(rewards, mask, shift_mean=False)
  advantages, returns = gae_advantages(rewards, values, mask, cfg.gamma, cfg.lam)
  if cfg.whiten_advantages:
    advantages = masked_whiten(advantages, mask)

  experience = Experience(prompt=prompt, prompt_mask=prompt_mask, tokens=tokens, mask=mask, log_probs=log_probs,
                          ref_log_probs=ref_log_probs, values=values, kl=kl, rewards=rewards,
                          advantages=advantages, returns=returns, score=score)
  metrics = {
      "rollout/rm_score": raw_score.mean(),
      "rollout/score": score.mean(),
      "rollout/kl": sequence_kl(log_probs, ref_log_probs, mask).mean(),
      "rollout/kl_penalty": (beta * kl).sum(axis=1).mean(),
      "rollout/total_reward": total_reward.mean(),
      "rollout/response_length": fmask.sum(axis=1).mean(),
      "rollout/no_eos_fraction": 1.0 - ended.astype(jnp.float32).mean(),
      "rollout/entropy": masked_mean(_entropy(policy_lp), mask),
      "rollout/logprob_diff": masked_mean(jnp.abs(sample.log_probs - log_probs), mask),
      "rollout/value": masked_mean(values, mask),
      "rollout/return": masked_mean(returns, mask),
  }
  return experience, metrics


def make_experience_fn(policy_graphdef: nnx.GraphDef, value_graphdef: nnx.GraphDef | None,
                       reward_graphdef: nnx.GraphDef | None, cfg: PPOConfig,
                       value_mode: ValueMode = "separate") -> Callable:
  """Jitted ``experience(policy_params, ref_params, value_params, reward_params, prompt, prompt_mask, sample,
  beta, score=None) -> (Experience, metrics)``; see ``make_experience``."""

  @jax.jit
  def experience(policy_params, ref_params, value_params, reward_params, prompt, prompt_mask, sample, beta,
                 score=None):
    return make_experience(policy_graphdef, policy_params, ref_params, value_graphdef, value_params,
                           reward_graphdef, reward_params, prompt, prompt_mask, sample, beta, cfg,
                           value_mode, score)

  return experience


def ppo_losses(policy_graphdef: nnx.GraphDef, value_graphdef: nnx.GraphDef | None, cfg: PPOConfig,
               value_mode: ValueMode, params: dict[str, PyTree], exp: Experience,
               ptx: dict[str, Array] | None) -> tuple[Array, dict[str, Array]]:
  """The PPO objective on one minibatch -> (total loss, metrics).

  params: {"policy": ..., "value": ...}; ptx: optional {tokens, mask, loss_mask} [b, T] pretraining rows.
  total = policy_loss - entropy_coef * entropy + value_coef * value_loss (+ ptx_coef * ptx_loss).
  """
  p, n = exp.prompt.shape[1], exp.tokens.shape[1]
  tokens = jnp.concatenate([exp.prompt, exp.tokens], axis=1)
  mask = jnp.concatenate([exp.prompt_mask.astype(jnp.int32), exp.mask.astype(jnp.int32)], axis=1)
  head = params["value"] if value_mode == "shared" else None
  logits, values = _policy_forward(policy_graphdef, params["policy"], head, tokens, mask, p, n)
  if value_mode == "separate":
    values = _values(value_graphdef, params["value"], tokens, mask, p, n)
  log_probs_all = sampling_log_probs(logits, cfg.sampling)
  log_probs = _picked(log_probs_all, exp.tokens, exp.mask)

  policy_loss, pm = clipped_policy_loss(log_probs, exp.log_probs, exp.advantages, exp.mask, cfg.clip_eps)
  value_loss, vm = clipped_value_loss(values, exp.values, exp.returns, exp.mask, cfg.value_clip)
  entropy = masked_mean(_entropy(log_probs_all), exp.mask)
  total = policy_loss + cfg.value_coef * value_loss
  if cfg.entropy_coef:
    total = total - cfg.entropy_coef * entropy
  metrics = {
      "train/policy_loss": policy_loss,
      "train/value_loss": value_loss,
      "train/entropy": entropy,
      "train/clip_frac": pm["clip_frac"],
      "train/approx_kl": pm["approx_kl_k3"],
      "train/out_of_support_frac": masked_mean((log_probs <= MIN_LOG_PROB).astype(jnp.float32), exp.mask),
      "train/value_clip_frac": vm["value_clip_frac"],
      "train/explained_variance": explained_variance(jax.lax.stop_gradient(values), exp.returns, exp.mask),
  }
  if cfg.ptx_coef:
    if ptx is None:
      raise ValueError("ppo.ptx_coef > 0 needs a pretraining batch ('ptx')")
    model = nnx.merge(policy_graphdef, params["policy"])
    ptx_logits, _ = model(ptx["tokens"], ptx["mask"])
    ptx_loss, _ = losses.next_token_loss(ptx_logits, ptx["tokens"], ptx["loss_mask"])
    total = total + cfg.ptx_coef * ptx_loss
    metrics["train/ptx_loss"] = ptx_loss
  metrics["train/total_loss"] = total
  return total, metrics


def _split_rows(key: Array, rows: int, minibatches: int, what: str) -> Array:
  """A random permutation of ``rows`` split into [minibatches, rows // minibatches] indices."""
  if rows % minibatches:
    raise ValueError(f"{what} has {rows} rows, not divisible by ppo.minibatches={minibatches}")
  return jax.random.permutation(key, rows).reshape(minibatches, rows // minibatches)


def make_ppo_update(policy_graphdef: nnx.GraphDef, value_graphdef: nnx.GraphDef | None,
                    policy_tx: optax.GradientTransformation, value_tx: optax.GradientTransformation,
                    cfg: PPOConfig, value_mode: ValueMode = "separate") -> Callable:
  """Builds ``update(state, batch, frozen=None) -> (state, metrics)`` for ``state.compile_step``.

  batch: {"experience": Experience [B rows], "ptx": None or {tokens, mask, loss_mask} [B_ptx, T]}.
  Runs ``cfg.epochs`` passes (``lax.scan``), each over a fresh permutation of the rows (keys from
  ``step_key(state)``) split into ``cfg.minibatches`` minibatches (an inner ``lax.scan``); the ptx rows
  are split the same way. Each minibatch takes one step of ``policy_tx`` on ``state.params["policy"]``
  and of ``value_tx`` on ``state.params["value"]``. ``state.step`` grows by 1 per call. Metrics
  ``train/*`` are means over all minibatches; ``frozen`` is unused (reference and reward models
  only enter through ``make_experience``).
  """
  _check_value_mode(value_mode)
  objective = jax.value_and_grad(
      lambda params, exp, ptx: ppo_losses(policy_graphdef, value_graphdef, cfg, value_mode, params, exp, ptx),
      has_aux=True)

  def minibatch_step(carry, xs):
    params, opt_state = carry
    exp, ptx = xs
    (_, metrics), grads = objective(params, exp, ptx)
    p_updates, p_opt = policy_tx.update(grads["policy"], opt_state["policy"], params["policy"])
    v_updates, v_opt = value_tx.update(grads["value"], opt_state["value"], params["value"])
    params = {"policy": optax.apply_updates(params["policy"], p_updates),
              "value": optax.apply_updates(params["value"], v_updates)}
    metrics["train/policy_grad_norm"] = optax.tree.norm(grads["policy"])
    metrics["train/value_grad_norm"] = optax.tree.norm(grads["value"])
    return (params, {"policy": p_opt, "value": v_opt}), metrics

  def update(state: TrainState, batch: Mapping[str, Any], frozen: Any = None) -> tuple[TrainState, dict]:
    del frozen
    exp: Experience = batch["experience"]
    ptx = batch.get("ptx") if cfg.ptx_coef else None
    m = cfg.minibatches
    rows = exp.tokens.shape[0]

    def epoch(carry, key):
      idx = _split_rows(jax.random.fold_in(key, 0), rows, m, "experience")
      mb_exp = jax.tree.map(lambda x: x[idx], exp)  # [M, B/M, ...]
      mb_ptx = None
      if ptx is not None:
        ptx_idx = _split_rows(jax.random.fold_in(key, 1), ptx["tokens"].shape[0], m, "ptx batch")
        mb_ptx = jax.tree.map(lambda x: x[ptx_idx], ptx)
      return jax.lax.scan(minibatch_step, carry, (mb_exp, mb_ptx))

    keys = jax.random.split(step_key(state), cfg.epochs)
    init = ({"policy": state.params["policy"], "value": state.params["value"]},
            {"policy": state.opt_state["policy"], "value": state.opt_state["value"]})
    (params, opt_state), metrics = jax.lax.scan(epoch, init, keys)
    new_state = state.replace(step=state.step + 1, params={**state.params, **params},
                              opt_state={**state.opt_state, **opt_state})
    return new_state, jax.tree.map(jnp.mean, metrics)

  return update
