"""sft stage: next-token loss on demonstration responses (prompt tokens masked), from a policy instance.

Optionally mixes in pretraining text (``ptx_coef``). At the end the policy is
evaluated on held-out prompts; its per-prompt gold scores are the baseline of
later ``eval/win_rate_vs_sft``.
"""

from __future__ import annotations

from rlhf_jax import sharding, state as state_lib
from rlhf_jax.algorithms.lm import lm_train_state, make_lm_step
from rlhf_jax.data import batching, packing
from rlhf_jax.stages import evaluation
from rlhf_jax.stages.context import StageContext
from rlhf_jax.stages.loop import run_loop, step_counts, truncation_metrics


def run(ctx: StageContext, instance) -> dict[str, float]:
  cfg = instance.section
  data = ctx.config.data
  tok = ctx.tokenizer
  graphdef = ctx.graphdef("lm")
  if cfg.init_from:
    params, _ = ctx.load_params(cfg.init_from, "lm")
  else:
    _, params, _ = ctx.init_model("lm", ctx.key("init/policy", instance.name))
  state, state_shardings, tx = lm_train_state(params, ctx.param_shardings("lm"), cfg, ctx.mesh, ctx.config.seed)
  demos = ctx.records("demonstrations", "train")
  loader = ctx.loader(demos, cfg.batch_size)
  if cfg.ptx_coef:
    text = ctx.records("pretraining", "train")
    text_loader = ctx.loader(text, cfg.batch_size)

  def host_batch(step):
    rows = [demos[int(i)] for i in loader.indices_for_step(step)]
    batch, stats = batching.sft_batch(tok, [r["prompt"] for r in rows], [r["response"] for r in rows],
                                      data.prompt_len, data.response_len, mask_prompt=cfg.mask_prompt)
    batch = packing.training_rows(batch, data, tok.pad_id, data.prompt_len)
    if cfg.ptx_coef:
      texts = [text[int(i)]["text"] for i in text_loader.indices_for_step(step)]
      ptx, ptx_stats = batching.lm_batch(tok, texts, data.seq_len)
      ptx = packing.training_rows(ptx, data, tok.pad_id)
      rows = max(len(batch["tokens"]), len(ptx["tokens"]))  # packed, the two may differ: one batch needs one
      batch, ptx = sharding.pad_batch(batch, rows)[0], sharding.pad_batch(ptx, rows)[0]
      batch.update({f"ptx_{k}": v for k, v in ptx.items()})
      stats = stats + ptx_stats
    return batch, stats

  def make_batch(step, state):
    del state
    batch, stats = host_batch(step)
    return ctx.put(batch), {**truncation_metrics(stats), **step_counts(ctx.model_config, batch).metrics(),
                            "data/fill": packing.fill(batch)}

  step_fn = make_lm_step(graphdef, tx, ptx_coef=cfg.ptx_coef, use_dropout=ctx.config.model.dropout > 0,
                         mesh=ctx.mesh, rules=ctx.rules)
  step = state_lib.compile_step(step_fn, state_shardings, ctx.batch_shardings(host_batch(0)[0]), None, ctx.mesh)
  evaluator = evaluation.PolicyEvaluator(ctx)
  reference = ctx.load_params(cfg.init_from, "lm")[0] if cfg.init_from else None

  def evaluate(state, step_number):
    result = evaluator.evaluate(state.params["policy"], reference=reference)
    if step_number == cfg.steps:
      evaluation.save_gold(ctx, instance.name, result.gold)
    return result.metrics

  state, last_eval = run_loop(ctx, instance.name, state, state_shardings, step, make_batch, cfg.steps, cfg,
                              evaluate=evaluate)
  ctx.save_params(instance.name, state.params["policy"])
  return last_eval
