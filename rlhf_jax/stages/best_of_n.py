"""best_of_n stage: the best-of-n policy of a policy instance under a reward model, for every n in a list.

On the held-out evaluation prompts, max(ns) samples per prompt are drawn (the
shared rollout) and scored by the reward model and by gold; for each n the
RM-best sample of each disjoint group of n is the best-of-n draw. Metrics per
n (``bon/N/...``): gold and RM reward of the draws, the analytic
KL_bon = log n - (n-1)/n and a sample estimate (``rlhf_jax.rl.best_of_n``),
plus the compute counters of the sampling.
"""

from __future__ import annotations

import jax
import numpy as np
from ml_collections import ConfigDict

from rlhf_jax import compute
from rlhf_jax.config_groups import sampling_config
from rlhf_jax.data import batching, bucketing
from rlhf_jax.rl import best_of_n as bon
from rlhf_jax.rollout import make_rollout_fn, repeat_prompts, response_texts, shared_run
from rlhf_jax.scoring import GoldScorer
from rlhf_jax.stages import evaluation
from rlhf_jax.stages.context import StageContext, StageError

ROLLOUT_ROWS = 256


def best_of_n_config() -> ConfigDict:
  """Keys of a ``best_of_n`` instance. Inputs: ``policy`` (the base policy), ``reward`` (the selecting RM)."""
  return ConfigDict(dict(kind="best_of_n", policy="sft", reward="reward", ns=(1, 2, 4, 8, 16, 32, 64),
                         num_prompts=64, sampling=sampling_config()))


def run(ctx: StageContext, instance) -> dict[str, float]:
  cfg = instance.section
  ns = sorted(int(n) for n in cfg.ns)
  m = ns[-1]
  if ns[0] < 1 or any(m % n for n in ns):
    raise StageError(f"{instance.name}.ns must be positive and divide the largest ({m}), got {list(cfg.ns)}")
  sampling = ctx.sampling(cfg)
  params, _ = ctx.load_params(cfg.policy, "lm")
  scorer = evaluation.reward_scorer(ctx, cfg.reward)
  gold_scorer = GoldScorer(ctx.task)
  prompts = [r["prompt"] for r in ctx.records("prompts", "test")][: cfg.num_prompts]
  texts, group = repeat_prompts(prompts, m)
  rollout_fn = make_rollout_fn(ctx.graphdef("lm"), sampling, shared_run(m, ROLLOUT_ROWS), ctx.decode_layout)
  key = ctx.key("bon/samples", instance.name)
  rm, gold, counts = [], [], compute.Counts()
  for b, start in enumerate(range(0, len(texts), ROLLOUT_ROWS)):
    rows = slice(start, start + ROLLOUT_ROWS)
    batch, _ = batching.prompt_batch(ctx.tokenizer, texts[rows], ctx.config.data.prompt_len)
    batch = bucketing.trim_prompts(batch, ctx.config.data.min_bucket_len)
    batch = ctx.put({**batch, "group": group[rows]})
    r = rollout_fn(params, batch["tokens"], batch["mask"], batch["group"], jax.random.fold_in(key, b))
    rm.append(ctx.host(scorer(r)))
    gold.append(gold_scorer(r, texts[rows], response_texts(ctx.tokenizer, r)))
    lengths = ctx.host(r.response_mask).sum(axis=1)
    counts += compute.rollout_counts(ctx.model_config, len(lengths), r.prompt_len, lengths, sampling.max_new_tokens,
                                     prompt_group=r.prompt_group)
    counts.flops += compute.sequence_flops(ctx.model_config, len(lengths), r.prompt_len + r.response_len,
                                           lm_head=False, shared_prefix=r.shared_prefix)
  rm = np.concatenate(rm).reshape(len(prompts), m)
  gold = np.concatenate(gold).reshape(len(prompts), m)
  summary = counts.metrics()
  for n in ns:
    metrics = {"bon/gold_reward": float(bon.best_of_n_values(rm, gold, n).mean()),
               "bon/rm_reward": float(bon.best_of_n_values(rm, rm, n).mean()),
               "bon/kl_formula": bon.kl_bon_formula(n), "bon/kl_estimate": bon.kl_bon_estimate(rm, n),
               "bon/n": float(n)}
    ctx.metrics.write(instance.name, n, metrics)
    summary.update({f"bon/{n}/{k.split('/', 1)[1]}": v for k, v in metrics.items() if k != "bon/n"})
  if ctx.is_primary:
    print("   n |  gold |    rm | KL formula | KL estimate", flush=True)
    for n in ns:
      print(f"{n:>4} | {summary[f'bon/{n}/gold_reward']:.3f} | {summary[f'bon/{n}/rm_reward']:+.3f} | "
            f"{summary[f'bon/{n}/kl_formula']:10.3f} | {summary[f'bon/{n}/kl_estimate']:11.3f}", flush=True)
  return summary
