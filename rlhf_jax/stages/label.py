"""label stage: the InstructGPT comparison loop, for any policy instance.

K responses per prompt are sampled from the input policy (one shared
rollout), the task's simulated labelers rank them (noisy around the hidden
gold score), and the result is written as ``WORKDIR/INSTANCE/comparisons.jsonl``
(then a TFDS dataset). With a ``reward`` input, that reward model scores the
same samples: ``label/rm_accuracy`` (against the labelers) and
``label/rm_gold_accuracy`` (against gold) measure how well an RM trained on
earlier policies holds on this policy's samples — the distribution shift
that iterated RLHF rounds exist to fix. With ``data.comparisons_file`` set,
those static comparisons are used instead and nothing is sampled.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from ml_collections import ConfigDict

from rlhf_jax import compute, rng
from rlhf_jax.config_groups import sampling_config
from rlhf_jax.data import batching, bucketing, formats
from rlhf_jax.rollout import make_rollout_fn, repeat_prompts, response_texts
from rlhf_jax.stages import evaluation
from rlhf_jax.stages.context import StageContext, StageError, sync
from rlhf_jax.tasks import pairwise_agreement, ranking_scores, score_agreement


def label_config() -> ConfigDict:
  """Keys of a ``label`` instance. Inputs: ``policy`` (whose samples are ranked), ``reward`` (optional RM to test)."""
  return ConfigDict(dict(kind="label", policy="sft", reward="", num_prompts=2048, k=8, batch_size=64,
                         sampling=sampling_config()))


def run(ctx: StageContext, instance) -> dict[str, float]:
  cfg = instance.section
  if ctx.config.data.comparisons_file:
    return {"label/comparisons": float(len(ctx.records("comparisons", "train")))}
  if not 2 <= cfg.k <= formats.MAX_RESPONSES:
    raise StageError(f"{instance.name}.k must be between 2 and {formats.MAX_RESPONSES}, got {cfg.k}")
  seed = ctx.config.seed
  prompts = [r["prompt"] for r in ctx.records("prompts", "train")]
  order = rng.numpy_rng(seed, "label/prompts", instance.name).permutation(len(prompts))
  prompts = [prompts[int(i)] for i in order[: cfg.num_prompts]]
  rank_seed = int(rng.numpy_rng(seed, "label/rank", instance.name).integers(2 ** 31))
  params, _ = ctx.load_params(cfg.policy, "lm")
  rollout_fn = make_rollout_fn(ctx.graphdef("lm"), ctx.sampling(cfg), cfg.k, ctx.decode_layout)
  scorer = evaluation.reward_scorer(ctx, cfg.reward) if cfg.reward else None
  key = ctx.key("label/samples", instance.name)
  records, gold, rm, counts = [], [], [], compute.Counts()
  per_batch = max(cfg.batch_size // cfg.k, 1)
  for b, start in enumerate(range(0, len(prompts), per_batch)):
    chunk = prompts[start:start + per_batch]
    repeated, group = repeat_prompts(chunk, cfg.k)
    batch, _ = batching.prompt_batch(ctx.tokenizer, repeated, ctx.config.data.prompt_len)
    batch = bucketing.trim_prompts(batch, ctx.config.data.min_bucket_len)
    # Padded to fit the mesh; only the real rows' responses and scores are read.
    batch = ctx.put({**batch, "group": group}, with_valid=True)
    rollout = rollout_fn(params, batch["tokens"], batch["mask"], batch["group"], jax.random.fold_in(key, b))
    real = ctx.host(batch["valid"]).astype(bool)
    lengths = ctx.host(rollout.response_mask).sum(axis=1)[real]
    counts += compute.rollout_counts(ctx.model_config, len(real), rollout.prompt_len, lengths,
                                     rollout.response_len, samples=int(real.sum()), prompt_group=rollout.prompt_group)
    if scorer is not None:
      counts.flops += compute.sequence_flops(ctx.model_config, len(real), rollout.prompt_len + rollout.response_len,
                                             lm_head=False, shared_prefix=rollout.shared_prefix)
    responses = [r for r, v in zip(response_texts(ctx.tokenizer, rollout), real) if v]
    scores = ctx.real_rows(scorer(rollout), real) if scorer is not None else None
    for i, prompt in enumerate(chunk):
      rows = slice(i * cfg.k, (i + 1) * cfg.k)
      ranking = ctx.task.rank(prompt, responses[rows], seed=rank_seed + start + i)
      records.append({"prompt": prompt, "responses": responses[rows], "ranking": ranking})
      gold.append(ctx.task.gold_scores([prompt] * cfg.k, responses[rows]))
      if scores is not None:
        rm.append(scores[rows])
  if ctx.is_primary:
    formats.write_records(os.path.join(ctx.stage_dir(instance.name), "comparisons.jsonl"), "comparisons", records)
  sync(instance.name)
  rankings = [r["ranking"] for r in records]
  distinct = np.mean([len(set(r["responses"])) / len(r["responses"]) for r in records])
  metrics = {"label/comparisons": float(len(records)), "label/k": float(cfg.k),
             "label/labeler_gold_agreement": float(pairwise_agreement(gold, rankings)),
             "label/sample_gold_mean": float(np.mean([g.mean() for g in gold])),
             "label/distinct_fraction": float(distinct), **counts.metrics()}
  if rm:
    metrics["label/rm_accuracy"] = score_agreement([ranking_scores(r) for r in rankings], rm)
    metrics["label/rm_gold_accuracy"] = score_agreement(gold, rm)
    metrics["label/rm_score_mean"] = float(np.mean([s.mean() for s in rm]))
  return metrics

