"""label stage: the InstructGPT comparison loop.

K responses per prompt are sampled from the SFT policy with the jitted sampler,
the task's simulated labelers rank them (noisy around the hidden gold score),
and the result is written as a comparisons dataset
(``WORKDIR/label/comparisons.jsonl``, then TFDS). With ``data.comparisons_file``
set, those static comparisons are used instead and nothing is sampled.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from rlhf_jax.data import batching, formats
from rlhf_jax.generate import make_sampler
from rlhf_jax.stages import evaluation
from rlhf_jax.stages.context import StageContext, StageError, sync
from rlhf_jax.tasks import pairwise_agreement

LABEL_STREAM = 31


def run(ctx: StageContext) -> dict[str, float]:
  cfg = ctx.config.label
  if ctx.config.data.comparisons_file:
    return {"label/comparisons": float(len(ctx.records("comparisons", "train")))}
  if not 2 <= cfg.k <= formats.MAX_RESPONSES:
    raise StageError(f"label.k must be between 2 and {formats.MAX_RESPONSES}, got {cfg.k}")
  tok = ctx.tokenizer
  prompts = [r["prompt"] for r in ctx.records("prompts", "train")]
  order = np.random.default_rng([ctx.config.seed, LABEL_STREAM]).permutation(len(prompts))
  prompts = [prompts[int(i)] for i in order[: cfg.num_prompts]]
  params, _ = ctx.load_params("sft", "lm")
  sampler = make_sampler(ctx.graphdef("lm"), evaluation.sampling_config(ctx, cfg))
  key = ctx.key(LABEL_STREAM)
  records, gold, rankings = [], [], []
  per_batch = max(cfg.batch_size // cfg.k, 1)
  for b, start in enumerate(range(0, len(prompts), per_batch)):
    chunk = prompts[start:start + per_batch]
    repeated = [p for p in chunk for _ in range(cfg.k)]
    batch, _ = batching.prompt_batch(tok, repeated, ctx.config.data.prompt_len)
    sample = sampler(params, *[ctx.put(batch)[k] for k in ("tokens", "mask")], jax.random.fold_in(key, b))
    responses = evaluation.decode_responses(ctx, sample)
    for i, prompt in enumerate(chunk):
      group = responses[i * cfg.k:(i + 1) * cfg.k]
      ranking = ctx.task.rank(prompt, group, seed=ctx.config.seed * 1_000_003 + start + i)
      records.append({"prompt": prompt, "responses": group, "ranking": ranking})
      gold.append(ctx.task.gold_scores([prompt] * len(group), group))
      rankings.append(ranking)
  if ctx.is_primary:
    os.makedirs(ctx.stage_dir("label"), exist_ok=True)
    formats.write_records(os.path.join(ctx.stage_dir("label"), "comparisons.jsonl"), "comparisons", records)
  sync("label")
  distinct = np.mean([len(set(r["responses"])) / len(r["responses"]) for r in records])
  return {"label/comparisons": float(len(records)), "label/k": float(cfg.k),
          "label/labeler_gold_agreement": float(pairwise_agreement(gold, rankings)),
          "label/sample_gold_mean": float(np.mean([g.mean() for g in gold])),
          "label/distinct_fraction": float(distinct)}
