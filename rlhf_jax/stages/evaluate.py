"""eval stage: trained policies on the same held-out prompts, a table, and the samples themselves.

Inputs: ``policies`` (policy instances; empty = every finished policy instance of
the config), ``reference`` (for ``eval/kl``), ``baseline`` (for
``eval/win_rate_vs_sft``, paired per prompt), ``reward`` (for ``eval/rm_reward``).
Each policy's metrics go to metrics.jsonl as a row of this instance with a
``policy_index``, and to summary.json as ``POLICY/eval/NAME``; a table and a
few samples are printed, and ``WORKDIR/INSTANCE/samples.jsonl`` holds every
prompt with each policy's response and its gold and RM scores.
"""

from __future__ import annotations

import json
import os

from etils import epath
from ml_collections import ConfigDict

from rlhf_jax.atomic_file import write_atomic
from rlhf_jax.stages import evaluation
from rlhf_jax.stages.context import StageContext, StageError
from rlhf_jax.stages.graph import POLICY, instances

COLUMNS = ("eval/gold_reward", "eval/rm_reward", "eval/kl", "eval/win_rate_vs_sft", "eval/lm_loss")


def eval_config() -> ConfigDict:
  """Keys of an ``eval`` instance (how policies are evaluated is ``config.evaluation``)."""
  return ConfigDict(dict(kind="eval", policies=(), reference="sft", baseline="sft", reward="reward",
                         print_samples=3))


def format_table(rows: dict[str, dict[str, float]]) -> str:
  """A plain-text table: one row per policy, one column per eval metric."""
  header = ["policy"] + [c.split("/", 1)[1] for c in COLUMNS]
  lines = [" | ".join(f"{h:>16}" for h in header)]
  for policy, metrics in rows.items():
    cells = [policy] + [f"{metrics[c]:.3f}" if c in metrics else "-" for c in COLUMNS]
    lines.append(" | ".join(f"{c:>16}" for c in cells))
  return "\n".join(lines)


def _has_params(ctx: StageContext, name: str) -> bool:
  return epath.Path(ctx.stage_dir(name), "params").is_dir()


def policies_to_evaluate(ctx: StageContext, cfg: ConfigDict) -> list[str]:
  """The named policies, or every policy instance with params (in ``config.stages`` order)."""
  if cfg.policies:
    missing = [p for p in cfg.policies if not _has_params(ctx, p)]
    if missing:
      raise StageError(f"eval: policies {missing} have not finished in {ctx.workdir}")
    names = list(cfg.policies)
  else:
    listed = [s.strip() for s in ctx.config.stages.split(",")]
    names = [n for n, i in instances(ctx.config).items() if i.kind.produces == POLICY and _has_params(ctx, n)]
    names.sort(key=lambda n: (listed.index(n) if n in listed else len(listed), n))
  if not names:
    raise StageError(f"eval: no policy to evaluate in {ctx.workdir} (no policy instance has finished)")
  return names


def run(ctx: StageContext, instance) -> dict[str, float]:
  cfg = instance.section
  names = policies_to_evaluate(ctx, cfg)
  evaluator = evaluation.PolicyEvaluator(ctx)
  reference = ctx.load_params(cfg.reference, "lm")[0] if cfg.reference and _has_params(ctx, cfg.reference) else None
  reward = evaluation.maybe_reward_scorer(ctx, cfg.reward)
  baseline_gold = None
  results: dict[str, evaluation.Evaluation] = {}
  # The baseline goes first: the others' win rates are paired against its per-prompt gold.
  for name in sorted(names, key=lambda n: n != cfg.baseline):
    params, _ = ctx.load_params(name, "lm")
    result = evaluator.evaluate(params, reference=reference, reward=reward, baseline_gold=baseline_gold)
    if name == cfg.baseline:
      baseline_gold = result.gold
      result.metrics["eval/win_rate_vs_sft"] = 0.5
    results[name] = result
  results = {name: results[name] for name in names}
  rows = {name: r.metrics for name, r in results.items()}
  for index, metrics in enumerate(rows.values()):
    ctx.metrics.write(instance.name, index, {**metrics, "policy_index": float(index)})
  if ctx.is_primary:
    write_samples(ctx, instance.name, evaluator.prompts, results)
    print(format_table(rows), flush=True)
    print(format_samples(evaluator.prompts, results, cfg.print_samples), flush=True)
  return {f"{name}/{k}": v for name, metrics in rows.items() for k, v in metrics.items()}


def write_samples(ctx: StageContext, name: str, prompts: list[str],
                  results: dict[str, evaluation.Evaluation]) -> None:
  """``WORKDIR/NAME/samples.jsonl``: one line per prompt with each policy's response, gold and RM score."""
  lines = []
  for i, prompt in enumerate(prompts):
    policies = {}
    for policy, r in results.items():
      entry = {"response": r.responses[i], "gold": float(r.gold[i])}
      if r.rm is not None:
        entry["rm"] = float(r.rm[i])
      policies[policy] = entry
    lines.append(json.dumps({"prompt": prompt, "policies": policies}))
  write_atomic(os.path.join(ctx.stage_dir(name), "samples.jsonl"), "\n".join(lines) + "\n")


def format_samples(prompts: list[str], results: dict[str, evaluation.Evaluation], count: int) -> str:
  """The first ``count`` prompts with every policy's response and scores, as text."""
  out = []
  for i in range(min(count, len(prompts))):
    out.append(f"prompt: {prompts[i]}")
    for policy, r in results.items():
      rm = f" rm={r.rm[i]:.2f}" if r.rm is not None else ""
      out.append(f"  {policy:>10} (gold={r.gold[i]:.2f}{rm}): {r.responses[i]}")
  return "\n".join(out)
