"""Next-token training: the pretrain and sft stage kinds' config keys, train step and eval step.

A batch is ``{"tokens", "mask", "loss_mask"}``, each [B, T]; the loss is the
mean next-token cross-entropy over tokens whose ``loss_mask`` is 1. SFT masks
prompt tokens; an optional second batch ``"ptx_*"`` of pretraining text is
mixed in with weight ``ptx_coef``.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping

import jax
import optax
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from rlhf_jax import data_parallel, losses, sharding, state as state_lib
from rlhf_jax.config_groups import loop_config
from rlhf_jax.state import TrainState, step_key


def pretrain_config() -> ConfigDict:
  """Keys of a ``pretrain`` instance: a decoder trained on pretraining text. Inputs: ``init_from`` (a policy
  instance or "hf:PATH" to continue pretraining; "" = fresh init)."""
  c = loop_config(steps=400, batch_size=32, lr=3e-3)
  c.kind = "pretrain"
  c.init_from = ""
  return c


def sft_config() -> ConfigDict:
  """Keys of an ``sft`` instance. Inputs: ``init_from`` (a policy instance or "hf:PATH"; "" = fresh init)."""
  c = loop_config(steps=600, batch_size=32, lr=3e-3)
  c.update(dict(kind="sft", init_from="pretrain", mask_prompt=True, ptx_coef=0.0))
  return c


def lm_loss(graphdef: nnx.GraphDef, params, batch: Mapping[str, jax.Array], dropout_key: jax.Array | None,
            mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES) -> tuple[jax.Array, jax.Array]:
  """Mean next-token loss of a decoder on ``batch`` -> (loss, number of target tokens).

  ``mesh``: the mesh the step is compiled for; without dropout the logits are then a
  ``data_parallel.rows_call`` (the weight gradient crosses the data axes as one sum). A batch with
  ``segments`` holds packed rows (``data.packing``)."""

  def logits_of(p, rows):
    return nnx.merge(graphdef, p)(rows["tokens"], rows["mask"], dropout_key=dropout_key,
                                  segments=rows.get("segments"))[0]

  if dropout_key is None:
    logits_of = data_parallel.rows_call(logits_of, mesh, rules)
  logits = logits_of(params, {k: batch[k] for k in ("tokens", "mask", "segments") if k in batch})
  return losses.next_token_loss(logits, batch["tokens"], batch["loss_mask"])


@functools.lru_cache(maxsize=32)
def make_lm_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, *, model: str = "policy",
                 ptx_coef: float = 0.0, use_dropout: bool = False, mesh: Mesh | None = None,
                 rules=sharding.DEFAULT_RULES) -> Callable:
  """Builds ``step(state, batch, frozen) -> (state, metrics)`` for next-token training of ``state.params[model]``.

  With ``ptx_coef > 0`` the batch also holds ``ptx_tokens``/``ptx_mask``/``ptx_loss_mask`` and the
  objective is ``loss + ptx_coef * ptx_loss``. With ``use_dropout`` the model's dropout is applied with
  a key derived from the state's step. ``mesh`` (and its ``rules``): the mesh the step is compiled for
  (see ``lm_loss``).
  """

  def step(state: TrainState, batch: dict, frozen: dict):
    del frozen
    key = step_key(state) if use_dropout else None

    def objective(params):
      loss, n = lm_loss(graphdef, params, batch, key, mesh, rules)
      total, aux = loss, {"train/loss": loss, "train/target_tokens": n}
      if ptx_coef:
        ptx = {k[4:]: v for k, v in batch.items() if k.startswith("ptx_")}
        ptx_loss, _ = lm_loss(graphdef, params, ptx, None if key is None else jax.random.fold_in(key, 1), mesh,
                              rules)
        total = total + ptx_coef * ptx_loss
        aux["train/ptx_loss"] = ptx_loss
      return total, aux

    (total, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params[model])
    metrics.update(state_lib.learning_rate_metrics(state.opt_state[model]))
    updates, opt_state = optimizer.update(grads, state.opt_state[model], state.params[model])
    params = optax.apply_updates(state.params[model], updates)
    metrics["train/grad_norm"] = optax.tree.norm(grads)
    metrics["train/total_loss"] = total
    new_state = state.replace(step=state.step + 1, params={**state.params, model: params},
                              opt_state={**state.opt_state, model: opt_state})
    return new_state, metrics

  return step


def lm_train_state(params: dict, shardings: dict, loop_cfg: ConfigDict, mesh: Mesh,
                   seed: int) -> tuple[TrainState, TrainState, optax.GradientTransformation]:
  """(state, state shardings, optimizer) for training one decoder, stored under the name ``policy``."""
  tx = state_lib.make_optimizer(loop_cfg.optimizer, loop_cfg.steps)
  state, state_shardings = state_lib.create_train_state({"policy": params}, {"policy": tx}, {"policy": shardings},
                                                        mesh, seed=seed)
  return state, state_shardings, tx


@functools.lru_cache(maxsize=16)
def make_lm_eval(graphdef: nnx.GraphDef) -> Callable:
  """Jitted ``eval(params, batch) -> (summed loss, target tokens)`` for exact averaging over batches (one
  function per model shape in a process, so every stage's evaluation reuses its compiled programs)."""

  @jax.jit
  def evaluate(params, batch):
    loss, n = lm_loss(graphdef, params, batch, None)
    return loss * n, n

  return evaluate
