"""pretrain stage: next-token training on pretraining text (the base model of the pipeline)."""

from __future__ import annotations

import jax

from rlhf_jax import state as state_lib
from rlhf_jax.data import batching
from rlhf_jax.data.loader import BatchLoader
from rlhf_jax.stages.context import StageContext
from rlhf_jax.stages.evaluation import PolicyEvaluator
from rlhf_jax.stages.lm import make_lm_step
from rlhf_jax.stages.loop import run_loop

INIT_STREAM = 1


def data_loader(ctx: StageContext, source, batch_size: int) -> BatchLoader:
  """Deterministic, per-host batches of ``source`` seeded by the run's seed."""
  return BatchLoader(len(source), batch_size, seed=ctx.config.seed, process_index=jax.process_index(),
                     process_count=jax.process_count())


def truncation_metrics(stats: batching.TruncationStats) -> dict[str, float]:
  """Counts of truncated examples in a batch, as metrics (truncation is never silent)."""
  return {f"data/{k}": float(v) for k, v in stats.as_dict().items() if k.endswith("truncated")}


def lm_train_state(ctx: StageContext, params: dict, loop_cfg) -> tuple:
  """(state, shardings, optimizer) for training one decoder under the name ``policy``."""
  tx = state_lib.make_optimizer(loop_cfg.optimizer, loop_cfg.steps)
  state, shardings = state_lib.create_train_state({"policy": params}, {"policy": tx},
                                                  {"policy": ctx.param_shardings("lm")}, ctx.mesh,
                                                  seed=ctx.config.seed)
  return state, shardings, tx


def batch_shardings(example: dict) -> dict:
  return {k: v.sharding for k, v in example.items()}


def run(ctx: StageContext) -> dict[str, float]:
  cfg = ctx.config.pretrain
  tok = ctx.tokenizer
  train = ctx.records("pretraining", "train")
  loader = data_loader(ctx, train, cfg.batch_size)
  graphdef, params, _ = ctx.init_model("lm", jax.random.fold_in(jax.random.key(ctx.config.seed), INIT_STREAM))
  state, shardings, tx = lm_train_state(ctx, params, cfg)

  def make_batch(step, state):
    del state
    texts = [train[int(i)]["text"] for i in loader.indices_for_step(step)]
    batch, stats = batching.lm_batch(tok, texts, ctx.config.data.seq_len)
    return ctx.put(batch), truncation_metrics(stats)

  example, _ = make_batch(0, None)
  step = state_lib.compile_step(make_lm_step(graphdef, tx), shardings, batch_shardings(example), None, ctx.mesh)
  evaluator = PolicyEvaluator(ctx)

  def evaluate(state, step_number):
    del step_number
    return {"eval/lm_loss": evaluator.lm_loss(state.params["policy"])}

  state, last_eval = run_loop(ctx, "pretrain", state, shardings, step, make_batch, cfg.steps, cfg,
                              evaluate=evaluate)
  ctx.save_params("pretrain", state.params["policy"])
  return last_eval
