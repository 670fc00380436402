"""Direct preference optimisation: the dpo stage kind's config keys, its train step and its batches.

A DPO batch is a K-wise comparison batch (``data.batching.comparison_batch``):
``tokens``, ``mask`` [B, K, P + R] (left-padded prompt, right-padded response),
``response_mask`` [B, K] (1 = a real response; K may vary per prompt) and
``ranks`` [B, K] (0 = best). Offline the rows come from label instances'
comparisons; online they are k samples per prompt of the current policy
(``online_batch`` from rollout rows), ranked by the reward model or the task's
labelers. The step computes each response's log-ratio to the frozen reference
(``rollout.response_log_probs``, the one definition of a policy's log-probs)
and takes one optimizer step on the DPO or IPO loss of every ranked pair
(``rlhf_jax.rl.dpo``). Offline, ``precompute_reference`` computes every
comparison's reference log-probs once before training (``make_reference_fn``)
and the batches carry them (``REFERENCE_KEY`` [B, K]), so a step runs no
reference pass: a quarter less compute a step, paid back from the second epoch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from rlhf_jax import compute, data_parallel, sharding
from rlhf_jax.config_groups import loop_config, sampling_config
from rlhf_jax.generate import SamplingConfig
from rlhf_jax.models import DecoderConfig
from rlhf_jax.rl import dpo as dpo_math
from rlhf_jax.rollout import Rollout, response_log_probs, token_log_probs
from rlhf_jax.state import TrainState, learning_rate_metrics

RANKERS = ("rm", "labeler")
# A batch key: each response's reference sequence log-prob [B, K] (``reference_log_probs``), precomputed.
REFERENCE_KEY = "reference_log_probs"


def dpo_config() -> ConfigDict:
  """Keys of a ``dpo`` instance.

  Inputs: ``policy`` (the initial policy), ``reference`` (the frozen policy of the log-ratios and the
  win-rate baseline; "" = the ``policy`` input), ``comparisons`` (label instances: offline training
  data and held-out preference accuracy; may be empty online), ``reward`` (a reward-model instance:
  the online ranker with ``ranker="rm"``, and ``eval/rm_reward``; may be empty).
  ``batch_size`` counts prompts (each with its K ranked responses) per step. ``precompute_reference``
  (offline only): the reference's log-probs of every training comparison are computed once before the
  first step instead of in every step (TRL's ``precompute_ref_log_probs``); it pays from the second epoch.
  ``pack_width`` > 0 (offline only): each step's comparisons are packed into rows of that many tokens, an
  example's prompt once then its responses (``packing.pack_comparisons``, as the reward stage's).
  """
  c = loop_config(steps=200, batch_size=16, lr=1e-4, log_every=10)
  c.optimizer.schedule = "constant"
  c.update(dict(kind="dpo", policy="sft", reference="sft", comparisons=("label",), reward="",
                loss="dpo", beta=0.1, label_smoothing=0.0, average_log_probs=False,
                online=False, ranker="rm", samples_per_prompt=2, sampling=sampling_config(), eval_every=50,
                precompute_reference=False, pack_width=0))
  return c


@dataclasses.dataclass(frozen=True)
class DPOSettings:
  """The loss of a dpo instance (see ``rlhf_jax.rl.dpo``)."""

  beta: float = 0.1
  loss: str = "dpo"
  label_smoothing: float = 0.0
  average_log_probs: bool = False

  def __post_init__(self):
    if self.loss not in dpo_math.LOSSES:
      raise ValueError(f"dpo.loss must be one of {dpo_math.LOSSES}, got {self.loss!r}")
    if self.beta <= 0:
      raise ValueError(f"dpo.beta must be > 0, got {self.beta}")
    if not 0.0 <= self.label_smoothing < 0.5:
      raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
    if self.loss == "ipo" and self.label_smoothing:
      raise ValueError("dpo.label_smoothing applies to loss='dpo' only (conservative DPO)")

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any]) -> "DPOSettings":
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})


def comparison_rollout(tokens: jax.Array, mask: jax.Array, prompt_len: int) -> Rollout:
  """The rows of a comparison batch [B, K, P + R] as a flat ``Rollout`` [B * K] (for ``response_log_probs``).

  The K responses of an example share its prompt, so model passes compute it once per example
  (``Rollout.prompt_group`` K).
  """
  k, width = tokens.shape[-2:]
  tokens, mask = tokens.reshape(-1, width), mask.reshape(-1, width)
  return Rollout(prompt=tokens[:, :prompt_len], prompt_mask=mask[:, :prompt_len], response=tokens[:, prompt_len:],
                 response_mask=mask[:, prompt_len:], log_probs=jnp.zeros(tokens[:, prompt_len:].shape, jnp.float32),
                 group=jnp.repeat(jnp.arange(tokens.shape[0] // k, dtype=jnp.int32), k), prompt_group=k)


PACKED_ROW_KEYS = ("tokens", "mask", "segments", "branches", "positions", "reads", "targets", "sources",
                   "target_slots")


def packed_sequence_log_probs(graphdef: nnx.GraphDef, params, rows: Mapping[str, jax.Array],
                              sampling: SamplingConfig, average: bool) -> jax.Array:
  """Sequence log-prob [R, E, K] (sum, or mean with ``average``) of every response of packed comparison rows
  (``packing.pack_comparisons`` with ``packing.comparison_targets``); 0 on an empty slot.

  Only the ``sources`` rows (the columns predicting a response token) are queried in the last block and
  projected to the vocabulary: an example's prompt tokens, but its last, get no logits."""
  r, e, k = rows["reads"].shape
  model = nnx.merge(graphdef, params)
  hidden, _ = model.trunk(rows["tokens"], rows["mask"], None, None, rows["sources"], None, rows["segments"],
                          rows["branches"], rows["positions"])
  valid = rows["target_slots"] >= 0
  targets = jnp.take_along_axis(rows["tokens"], rows["targets"], axis=1)
  lp, _ = token_log_probs(model.logits_from_hidden(hidden), targets, valid, sampling)  # [R, N]
  slot = (rows["target_slots"][..., None] == jnp.arange(e * k)).astype(jnp.float32)  # [R, N, E * K]
  total = jnp.einsum("rn,rns->rs", lp.astype(jnp.float32), slot)
  if average:
    total = total / jnp.maximum(slot.sum(axis=1), 1.0)
  return total.reshape(r, e, k)


def log_ratios(graphdef: nnx.GraphDef, params, ref_params, batch: Mapping[str, jax.Array], prompt_len: int,
               sampling: SamplingConfig, average: bool, mesh: Mesh | None = None,
               rules: Any = sharding.DEFAULT_RULES) -> jax.Array:
  """Log-ratio [B, K] of every response of a comparison batch (reference log-probs carry no gradient).

  A batch holding ``REFERENCE_KEY`` [B, K] (``reference_log_probs`` of the same rows) takes the reference's
  side from it and runs no reference pass (``ref_params`` unused). ``mesh``: the mesh the step is compiled
  for; the policy pass is then a ``data_parallel.rows_call``.

  Packed rows (a batch with ``target_slots``, see ``packed_sequence_log_probs``) give [R * E, K], a slot of
  the packed layout per example."""
  if "target_slots" in batch:
    rows = {name: batch[name] for name in PACKED_ROW_KEYS}
    own_fn = data_parallel.rows_call(lambda p, x: packed_sequence_log_probs(graphdef, p, x, sampling, average), mesh,
                                     rules)
    own = own_fn(params, rows)
    k = own.shape[-1]
    if REFERENCE_KEY in batch:
      ref = batch[REFERENCE_KEY].astype(jnp.float32)
    else:
      ref = packed_sequence_log_probs(graphdef, ref_params, rows, sampling, average)
    return (own - jax.lax.stop_gradient(ref)).reshape(-1, k)
  b, k, _ = batch["tokens"].shape
  rollout = comparison_rollout(batch["tokens"], batch["mask"], prompt_len)
  policy_log_probs = data_parallel.rows_call(lambda p, r: response_log_probs(graphdef, p, r, sampling)[0], mesh,
                                             rules, row_group=rollout.prompt_group)
  lp = policy_log_probs(params, rollout)
  if REFERENCE_KEY in batch:
    own = dpo_math.sequence_log_prob(lp, rollout.response_mask, average).reshape(b, k)
    return own - jax.lax.stop_gradient(batch[REFERENCE_KEY].astype(jnp.float32))
  ref = jax.lax.stop_gradient(response_log_probs(graphdef, ref_params, rollout, sampling)[0])
  return dpo_math.sequence_log_ratio(lp, ref, rollout.response_mask, average).reshape(b, k)


def reference_log_probs(graphdef: nnx.GraphDef, ref_params, batch: Mapping[str, jax.Array], prompt_len: int,
                        sampling: SamplingConfig, average: bool) -> jax.Array:
  """Sequence log-prob [B, K] (sum, or mean with ``average``) of every response of a comparison batch under
  the reference: what ``log_ratios`` subtracts, to be stored as the batch's ``REFERENCE_KEY``."""
  b, k, _ = batch["tokens"].shape
  rollout = comparison_rollout(batch["tokens"], batch["mask"], prompt_len)
  lp = response_log_probs(graphdef, ref_params, rollout, sampling)[0]
  return dpo_math.sequence_log_prob(lp, rollout.response_mask, average).reshape(b, k)


@functools.lru_cache(maxsize=16)
def make_reference_fn(graphdef: nnx.GraphDef, prompt_len: int, sampling: SamplingConfig, average: bool) -> Callable:
  """Jitted ``f(ref_params, batch) -> reference_log_probs [B, K]``."""
  return jax.jit(lambda r, b: reference_log_probs(graphdef, r, b, prompt_len, sampling, average))


def dpo_objective(graphdef: nnx.GraphDef, settings: DPOSettings, prompt_len: int, sampling: SamplingConfig,
                  mesh: Mesh | None = None, rules: Any = sharding.DEFAULT_RULES) -> Callable:
  """``objective(params, ref_params, batch) -> (loss, metrics)`` with ``train/*`` metrics (``mesh``: see
  ``log_ratios``)."""

  def objective(params, ref_params, batch):
    h = log_ratios(graphdef, params, ref_params, batch, prompt_len, sampling, settings.average_log_probs, mesh,
                   rules)
    ranks, response_mask = batch["ranks"].reshape(h.shape), batch["response_mask"].reshape(h.shape)
    loss, aux = dpo_math.preference_loss(h, ranks, response_mask, settings.beta, settings.loss,
                                         settings.label_smoothing)
    valid = response_mask.astype(jnp.float32)
    metrics = {"train/loss": loss, **{f"train/{k}": v for k, v in aux.items()},
               "train/log_ratio": (h * valid).sum() / jnp.maximum(valid.sum(), 1.0)}
    return loss, metrics

  return objective


@functools.lru_cache(maxsize=32)
def make_dpo_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, settings: DPOSettings,
                  prompt_len: int, sampling: SamplingConfig, mesh: Mesh | None = None,
                  rules: Any = sharding.DEFAULT_RULES) -> Callable:
  """``step(state, batch, frozen) -> (state, metrics)``: one optimizer step of ``state.params["policy"]`` on
  a comparison batch; ``frozen["reference"]`` holds the reference policy's params; ``mesh``: the mesh it is
  compiled for (see ``log_ratios``)."""
  objective = dpo_objective(graphdef, settings, prompt_len, sampling, mesh, rules)

  def step(state: TrainState, batch, frozen):
    (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params["policy"], frozen["reference"],
                                                                      batch)
    metrics.update(learning_rate_metrics(state.opt_state["policy"]))
    updates, opt_state = optimizer.update(grads, state.opt_state["policy"], state.params["policy"])
    metrics["train/grad_norm"] = optax.tree.norm(grads)
    return state.replace(step=state.step + 1,
                         params={**state.params, "policy": optax.apply_updates(state.params["policy"], updates)},
                         opt_state={**state.opt_state, "policy": opt_state}), metrics

  return step


@functools.lru_cache(maxsize=16)
def make_log_ratio_fn(graphdef: nnx.GraphDef, prompt_len: int, sampling: SamplingConfig, average: bool) -> Callable:
  """Jitted ``f(params, ref_params, batch) -> log-ratios [B, K]`` (held-out preference accuracy); one function
  per distinct set of arguments in a process."""
  return jax.jit(lambda p, r, b: log_ratios(graphdef, p, r, b, prompt_len, sampling, average))


def step_counts(model_cfg: DecoderConfig, rows: int, width: int, prompt_len: int = 0, k: int = 1,
                reference: bool = True) -> compute.Counts:
  """Compute of one DPO step on ``rows`` sequences of ``width`` tokens: the policy's forward and backward
  and (unless its log-probs were precomputed, ``reference`` False) the reference's forward, each computing
  the ``prompt_len`` prompt columns once per ``k`` rows."""
  shared = (prompt_len, k) if k > 1 and prompt_len else None
  policy = compute.Counts(grad_steps=1.0,
                          flops=compute.sequence_flops(model_cfg, rows, width, train=True, shared_prefix=shared))
  return policy + reference_counts(model_cfg, rows, width, prompt_len, k) if reference else policy


def reference_counts(model_cfg: DecoderConfig, rows: int, width: int, prompt_len: int = 0,
                     k: int = 1) -> compute.Counts:
  """Compute of the reference's forward over ``rows`` sequences of ``width`` tokens (prompts shared by k)."""
  shared = (prompt_len, k) if k > 1 and prompt_len else None
  return compute.Counts(flops=compute.sequence_flops(model_cfg, rows, width, shared_prefix=shared))


def ranks_from_ranking(ranking) -> np.ndarray:
  """Ranks [K] int32 (0 = best) of a ranking (indices, best first)."""
  ranks = np.empty(len(ranking), np.int32)
  ranks[np.asarray(ranking, np.int64)] = np.arange(len(ranking), dtype=np.int32)
  return ranks


def online_batch(prompt: np.ndarray, prompt_mask: np.ndarray, response: np.ndarray, response_mask: np.ndarray,
                 ranks: np.ndarray) -> dict[str, np.ndarray]:
  """A comparison batch from B * k rollout rows (the k samples of a prompt consecutive) and their ranks [B, k]."""
  b, k = ranks.shape
  tokens = np.concatenate([prompt, response], axis=1).astype(np.int32)
  mask = np.concatenate([prompt_mask, response_mask], axis=1).astype(np.int32)
  return {"tokens": tokens.reshape(b, k, -1), "mask": mask.reshape(b, k, -1),
          "response_mask": np.ones((b, k), np.int32), "ranks": np.asarray(ranks, np.int32)}
