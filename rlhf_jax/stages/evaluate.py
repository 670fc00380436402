"""eval stage: every trained policy of the run (pretrain, sft, ppo) on the same held-out prompts.

Metrics per policy: ``eval/gold_reward``, ``eval/rm_reward``, ``eval/kl`` (to the
reference, ``eval.reference``), ``eval/win_rate_vs_sft`` (gold, paired per
prompt) and ``eval/lm_loss`` (held-out pretraining text). Each policy's metrics
go to metrics.jsonl as a stage ``eval`` row with a ``policy`` index, and to
summary.json under ``eval`` as ``POLICY/eval/NAME``; a table is printed.
"""

from __future__ import annotations

import os

from rlhf_jax.stages import evaluation
from rlhf_jax.stages.context import StageContext, StageError

POLICIES = ("pretrain", "sft", "ppo")
COLUMNS = ("eval/gold_reward", "eval/rm_reward", "eval/kl", "eval/win_rate_vs_sft", "eval/lm_loss")


def format_table(rows: dict[str, dict[str, float]]) -> str:
  """A plain-text table: one row per policy, one column per eval metric."""
  header = ["policy"] + [c.split("/", 1)[1] for c in COLUMNS]
  lines = [" | ".join(f"{h:>16}" for h in header)]
  for policy, metrics in rows.items():
    cells = [policy] + [f"{metrics[c]:.3f}" if c in metrics else "-" for c in COLUMNS]
    lines.append(" | ".join(f"{c:>16}" for c in cells))
  return "\n".join(lines)


def run(ctx: StageContext) -> dict[str, float]:
  cfg = ctx.config.eval
  available = [p for p in POLICIES if os.path.isdir(os.path.join(ctx.stage_dir(p), "params"))]
  if not available:
    raise StageError(f"eval: no policy to evaluate in {ctx.workdir} (none of {list(POLICIES)} has finished)")
  evaluator = evaluation.PolicyEvaluator(ctx)
  reference = None
  if cfg.reference:
    reference, _ = ctx.load_params(cfg.reference, "lm")
  reward = evaluation.reward_model(ctx)
  sft_gold = None
  rows: dict[str, dict[str, float]] = {}
  for policy in sorted(available, key=lambda p: p != "sft"):
    params, _ = ctx.load_params(policy, "lm")
    metrics, gold = evaluator.evaluate(params, reference=reference, reward=reward, baseline_gold=sft_gold)
    if policy == "sft":
      sft_gold = gold
      metrics["eval/win_rate_vs_sft"] = 0.5
    rows[policy] = metrics
  ordered = {p: rows[p] for p in POLICIES if p in rows}
  for index, (policy, metrics) in enumerate(ordered.items()):
    ctx.metrics.write("eval", index, {**metrics, "policy_index": float(POLICIES.index(policy))})
  if ctx.is_primary:
    print(format_table(ordered), flush=True)
  return {f"{policy}/{k}": v for policy, metrics in ordered.items() for k, v in metrics.items()}
