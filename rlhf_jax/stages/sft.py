"""sft stage: next-token loss on demonstration responses (prompt tokens masked), from the pretrained model.

Optionally mixes in pretraining text (``sft.ptx_coef``). At the end the policy is
evaluated on held-out prompts; its per-prompt gold scores are the baseline of
every later ``eval/win_rate_vs_sft``.
"""

from __future__ import annotations

from rlhf_jax import state as state_lib
from rlhf_jax.data import batching
from rlhf_jax.stages import evaluation
from rlhf_jax.stages.context import INIT_STREAM, StageContext
from rlhf_jax.stages.lm import lm_train_state, make_lm_step
from rlhf_jax.stages.loop import run_loop, truncation_metrics


def run(ctx: StageContext) -> dict[str, float]:
  cfg = ctx.config.sft
  data = ctx.config.data
  tok = ctx.tokenizer
  graphdef = ctx.graphdef("lm")
  if cfg.init_from:
    params, _ = ctx.load_params(cfg.init_from, "lm")
  else:
    _, params, _ = ctx.init_model("lm", ctx.key(INIT_STREAM))
  state, shardings, tx = lm_train_state(ctx, params, cfg)
  demos = ctx.records("demonstrations", "train")
  loader = ctx.loader(demos, cfg.batch_size)
  if cfg.ptx_coef:
    text = ctx.records("pretraining", "train")
    text_loader = ctx.loader(text, cfg.batch_size)

  def host_batch(step):
    rows = [demos[int(i)] for i in loader.indices_for_step(step)]
    batch, stats = batching.sft_batch(tok, [r["prompt"] for r in rows], [r["response"] for r in rows],
                                      data.prompt_len, data.response_len, mask_prompt=cfg.mask_prompt)
    if cfg.ptx_coef:
      texts = [text[int(i)]["text"] for i in text_loader.indices_for_step(step)]
      ptx, ptx_stats = batching.lm_batch(tok, texts, data.seq_len)
      batch.update({f"ptx_{k}": v for k, v in ptx.items()})
      stats = stats + ptx_stats
    return batch, stats

  def make_batch(step, state):
    del state
    batch, stats = host_batch(step)
    return ctx.put(batch), truncation_metrics(stats)

  step = state_lib.compile_step(make_lm_step(graphdef, tx, ptx_coef=cfg.ptx_coef), shardings,
                                ctx.batch_shardings(host_batch(0)[0]), None, ctx.mesh)
  evaluator = evaluation.PolicyEvaluator(ctx)
  reference = None
  if cfg.init_from:
    reference, _ = ctx.load_params(cfg.init_from, "lm")

  def evaluate(state, step_number):
    metrics, gold = evaluator.evaluate(state.params["policy"], reference=reference)
    if step_number == cfg.steps:
      evaluation.save_gold(ctx, "sft", gold)
    return metrics

  state, last_eval = run_loop(ctx, "sft", state, shardings, step, make_batch, cfg.steps, cfg, evaluate=evaluate)
  ctx.save_params("sft", state.params["policy"])
  return last_eval
