"""Reward models: the reward stage kind's config keys, the ranking / direct-score train step, normalisation.

The RM is a trunk plus a scalar head. Ranking loss (InstructGPT): all C(K,2)
pairs of one prompt in one batch element, one forward pass per response.
After training the RM is normalised with a gain and bias folded into its head,
so that the reference policy's responses score mean 0 and std 1.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import optax
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from rlhf_jax import data_parallel, losses, sharding
from rlhf_jax.config_groups import loop_config
from rlhf_jax.data.batching import comparison_shared_prefix
from rlhf_jax.scoring import reward_scores
from rlhf_jax.state import TrainState, learning_rate_metrics, step_key

LOSSES = ("ranking", "direct_sigmoid", "direct_mse")
NORMALIZATIONS = ("gain_bias", "bias", "none")


def reward_config() -> ConfigDict:
  """Keys of a ``reward`` instance.

  Inputs: ``init_from`` (a policy instance: its trunk and a fresh head; a reward instance: continue
  that RM; "" = random), ``comparisons`` (label instances whose comparisons it trains on, held-out
  rows taken from each), ``reference`` (the policy whose samples define the normalisation).
  ``pack_width`` > 0: each step's examples are packed into rows of that many tokens, an example's prompt
  once and then its responses, each response attending to its prompt and itself only
  (``packing.pack_comparisons``): the same rewards and loss for the padding's compute. Every distinct packed
  row count compiles its own step, so a width that holds a few examples per row pays most.
  """
  c = loop_config(steps=600, batch_size=16, lr=5e-4)
  c.update(dict(kind="reward", init_from="sft", comparisons=("label",), reference="sft", loss="ranking",
                margin=0.0, head_std=-1.0, normalize="gain_bias", normalize_samples=256, eval_comparisons=128,
                pack_width=0))
  return c


def comparison_rewards(graphdef: nnx.GraphDef, params, batch, dropout_key=None) -> jax.Array:
  """RM scores [B, K] of a comparison batch (tokens [B, K, T]).

  With the batch's ``prompt_mask`` [B, P] (``batching.comparison_batch``: columns [0, P) hold the example's
  prompt in all K rows) the prompt is computed once per example (``Trunk(shared_prefix=(P, K))``);
  without it, one full pass per response.
  """
  b, k, t = batch["tokens"].shape
  return reward_scores(graphdef, params, batch["tokens"].reshape(b * k, t), batch["mask"].reshape(b * k, t),
                       dropout_key, shared_prefix=comparison_shared_prefix(batch)).reshape(b, k)


PACKED_ROW_KEYS = ("tokens", "mask", "segments", "branches", "positions", "reads")


def packed_comparison_rewards(graphdef: nnx.GraphDef, params, rows, dropout_key=None) -> jax.Array:
  """RM scores [R, E, K] of packed comparison rows (``packing.pack_comparisons``): the scalar output at each
  response's last token, ``rows["reads"]`` [R, E, K] (entries of empty slots read column 0, to be masked)."""
  r, e, k = rows["reads"].shape
  values = nnx.merge(graphdef, params).values(rows["tokens"], rows["mask"], dropout_key,
                                              queries=rows["reads"].reshape(r, e * k), segments=rows["segments"],
                                              branches=rows["branches"], positions=rows["positions"])
  return values.reshape(r, e, k)


def reward_objective(graphdef: nnx.GraphDef, loss_kind: str, margin: float, mesh: Mesh | None = None,
                     rules: Any = sharding.DEFAULT_RULES) -> Callable:
  """``objective(params, batch, key) -> (loss, metrics)`` of the chosen loss (see ``LOSSES``).

  ``mesh``: the mesh the step is compiled for; without dropout the RM pass is then a
  ``data_parallel.rows_call`` (its weight gradient crosses the data axes as one sum)."""
  if loss_kind not in LOSSES:
    raise ValueError(f"reward.loss must be one of {LOSSES}, got {loss_kind!r}")

  def objective(params, batch, key):
    packed = "reads" in batch  # packing.pack_comparisons: examples [R, E, ...] in packed rows

    def scores(p, rows):  # one example per row: [B, K, T] comparisons or [B, T] scored responses
      if packed:
        return packed_comparison_rewards(graphdef, p, rows, key)
      if loss_kind == "ranking":
        return comparison_rewards(graphdef, p, rows, key)
      return reward_scores(graphdef, p, rows["tokens"], rows["mask"], key)

    if key is None:
      scores = data_parallel.rows_call(scores, mesh, rules)
    names = PACKED_ROW_KEYS if packed else ("tokens", "mask", "prompt_mask")
    rewards = scores(params, {name: batch[name] for name in names if name in batch})
    response_mask = batch.get("response_mask")
    if packed:  # the packed examples as a batch of R * E, empty slots with no real response
      rewards = rewards.reshape(-1, rewards.shape[-1])
      response_mask = response_mask.reshape(rewards.shape)
    if loss_kind == "ranking":
      loss, aux = losses.ranking_loss(rewards, batch["ranks"].reshape(rewards.shape), response_mask, margin)
      return loss, {"train/loss": loss, "train/accuracy": aux["accuracy"], "train/reward_gap": aux["reward_gap"]}
    kind = "sigmoid_mse" if loss_kind == "direct_sigmoid" else "mse"
    if packed:
      loss = losses.direct_score_loss(rewards[:, 0], batch["score"].reshape(-1), kind, response_mask[:, 0])
    else:  # rows ``ctx.put`` added to fit the data axes are all padding: no example
      loss = losses.direct_score_loss(rewards, batch["score"], kind, batch["mask"].any(axis=-1))
    return loss, {"train/loss": loss}

  return objective


@functools.lru_cache(maxsize=32)
def make_reward_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, loss_kind: str,
                     margin: float, use_dropout: bool = False, mesh: Mesh | None = None,
                     rules: Any = sharding.DEFAULT_RULES) -> Callable:
  """``step(state, batch, frozen) -> (state, metrics)`` for ``state.params["reward"]``; ``mesh``: the mesh
  it is compiled for (see ``reward_objective``)."""
  objective = reward_objective(graphdef, loss_kind, margin, mesh, rules)

  def step(state: TrainState, batch, frozen):
    del frozen
    key = step_key(state) if use_dropout else None
    (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params["reward"], batch, key)
    metrics.update(learning_rate_metrics(state.opt_state["reward"]))
    updates, opt_state = optimizer.update(grads, state.opt_state["reward"], state.params["reward"])
    metrics["train/grad_norm"] = optax.tree.norm(grads)
    return state.replace(step=state.step + 1, params={"reward": optax.apply_updates(state.params["reward"], updates)},
                         opt_state={"reward": opt_state}), metrics

  return step


@jax.jit
def fold_normalisation(params: dict, gain: float, bias: float) -> dict:
  """Head params such that the model outputs ``gain * r + bias`` (one compiled program, not one per op)."""
  return {**params, "head": params["head"] * gain, "head_bias": params["head_bias"] * gain + bias}
