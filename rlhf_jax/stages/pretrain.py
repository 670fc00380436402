"""pretrain stage: next-token training of a decoder on pretraining text (the base model).

A fresh decoder, or with ``init_from`` a policy instance or a Hugging Face checkpoint ("hf:PATH") to continue.
"""

from __future__ import annotations

from rlhf_jax import state as state_lib
from rlhf_jax.algorithms.lm import lm_train_state, make_lm_step
from rlhf_jax.data import batching, packing
from rlhf_jax.stages.context import StageContext
from rlhf_jax.stages.evaluation import PolicyEvaluator
from rlhf_jax.stages.loop import run_loop, step_counts, truncation_metrics


def run(ctx: StageContext, instance) -> dict[str, float]:
  cfg = instance.section
  tok = ctx.tokenizer
  train = ctx.records("pretraining", "train")
  loader = ctx.loader(train, cfg.batch_size)
  if cfg.init_from:
    graphdef, shardings = ctx.graphdef("lm"), ctx.param_shardings("lm")
    params, _ = ctx.load_params(cfg.init_from, "lm")
  else:
    graphdef, params, shardings = ctx.init_model("lm", ctx.key("init/policy", instance.name))
  state, state_shardings, tx = lm_train_state(params, shardings, cfg, ctx.mesh, ctx.config.seed)

  def host_batch(step):
    texts = [train[int(i)]["text"] for i in loader.indices_for_step(step)]
    batch, stats = batching.lm_batch(tok, texts, ctx.config.data.seq_len)
    return packing.training_rows(batch, ctx.config.data, tok.pad_id), stats

  def make_batch(step, state):
    del state
    batch, stats = host_batch(step)
    return ctx.put(batch), {**truncation_metrics(stats), **step_counts(ctx.model_config, batch).metrics(),
                            "data/fill": packing.fill(batch)}

  step = state_lib.compile_step(make_lm_step(graphdef, tx, use_dropout=ctx.config.model.dropout > 0,
                                             mesh=ctx.mesh, rules=ctx.rules),
                                state_shardings, ctx.batch_shardings(host_batch(0)[0]), None, ctx.mesh)
  evaluator = PolicyEvaluator(ctx)

  def evaluate(state, step_number):
    del step_number
    return {"eval/lm_loss": evaluator.lm_loss(state.params["policy"])}

  state, last_eval = run_loop(ctx, instance.name, state, state_shardings, step, make_batch, cfg.steps, cfg,
                              evaluate=evaluate)
  ctx.save_params(instance.name, state.params["policy"])
  return last_eval
