"""dpo stage: direct preference optimisation (DPO or IPO) of a policy instance against a frozen reference.

Offline (the default) it trains on the K-wise comparisons of label instances
(``comparisons``, or ``data.comparisons_file``), every ranked pair of a prompt
in one batch element. Online (``online=True``) each step samples
``samples_per_prompt`` responses to ``batch_size`` prompts from the current
policy (the shared rollout), ranks them with the reward model (``ranker="rm"``,
the ``reward`` input; equal scores tie) or the task's simulated labelers
(``ranker="labeler"``), and takes the DPO step on those rankings. Prompts,
sampling keys and labeler noise are functions of the step, and the samples
come from the restored policy, so a resumed run replays the same batches.
Offline, ``precompute_reference`` computes the reference's log-probs of every
training comparison once before the first step (again on a resume: they are
a function of the data and the frozen reference), and the steps skip the
reference pass. Evaluation is the one every policy stage uses (gold and RM reward, KL to the
reference, win rate against the reference's gold), plus the implicit reward's
accuracy on held-out comparisons when there are any.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import jax
import numpy as np

from rlhf_jax import compute, rng, state as state_lib
from rlhf_jax.algorithms import dpo
from rlhf_jax.data import batching, bucketing, packing
from rlhf_jax.rl import dpo as dpo_math
from rlhf_jax.rollout import make_rollout_fn, repeat_prompts, response_texts
from rlhf_jax.scoring import GoldScorer
from rlhf_jax.stages import evaluation
from rlhf_jax.stages.context import StageContext, StageError
from rlhf_jax.stages.loop import run_loop, truncation_metrics


# The held-out preference loss on host arrays as one compiled program (eagerly, each jnp op compiles its own).
_preference_loss = jax.jit(dpo_math.preference_loss, static_argnums=(3, 4, 5))


def check(ctx: StageContext, instance) -> dpo.DPOSettings:
  """The instance's loss settings; every bad option is named before anything loads."""
  cfg = instance.section
  try:
    settings = dpo.DPOSettings.from_mapping(cfg)
  except ValueError as e:
    raise StageError(f"{instance.name}: {e}") from e
  if cfg.ranker not in dpo.RANKERS:
    raise StageError(f"{instance.name}.ranker must be one of {dpo.RANKERS}, got {cfg.ranker!r}")
  if cfg.online:
    if cfg.samples_per_prompt < 2:
      raise StageError(f"{instance.name}.samples_per_prompt must be >= 2 to rank, got {cfg.samples_per_prompt}")
    if cfg.ranker == "rm" and not cfg.reward:
      raise StageError(f"{instance.name}: online DPO with ranker='rm' needs a reward instance "
                       f"(config.{instance.name}.reward), or ranker='labeler'")
    if cfg.precompute_reference:
      raise StageError(f"{instance.name}.precompute_reference applies to offline DPO: online comparisons are "
                       "new samples every step")
    if cfg.pack_width:
      raise StageError(f"{instance.name}.pack_width applies to offline DPO: online comparisons are sampled on "
                       "the devices and trained as they are")
  elif not cfg.comparisons and not ctx.config.data.comparisons_file:
    raise StageError(f"{instance.name}: offline DPO needs comparisons (config.{instance.name}.comparisons names "
                     "label instances, or data.comparisons_file); or set online=True")
  return settings


def host_comparisons(ctx: StageContext, rows: Sequence[dict], max_k: int, trim: bool = True) -> tuple[dict, list]:
  """A batch of comparison rows and its truncation statistics; with ``trim`` its responses are cut to their
  bucket (the step splits rows at ``data.prompt_len``, so prompts keep their width)."""
  data = ctx.config.data
  batch, stats = batching.comparison_batch(ctx.tokenizer, [r["prompt"] for r in rows], [r["responses"] for r in rows],
                                           [r["ranking"] for r in rows], data.prompt_len, data.response_len, max_k)
  return (bucketing.trim_pairs(batch, data.prompt_len, data.min_bucket_len, left=False) if trim else batch), stats


def comparison_chunks(ctx: StageContext, rows: Sequence[dict], size: int, max_k: int,
                      trim: bool = False) -> Iterator[tuple[dict, int]]:
  """``rows`` as host batches of ``size`` prompts and the number of real ones: the last is filled with copies of
  its first prompt whose responses are all marked padding (no pairs). Untrimmed, every batch has one compiled
  shape (held-out evaluation); ``trim`` cuts each as the training batches are (``host_comparisons``)."""
  for start in range(0, len(rows), size):
    part = [rows[i] for i in range(start, min(start + size, len(rows)))]
    real = len(part)
    batch, _ = host_comparisons(ctx, part + [part[0]] * (size - real), max_k, trim)
    batch["response_mask"][real:] = 0
    yield batch, real


def precomputed_reference(ctx: StageContext, train: Sequence[dict], size: int, max_k: int, reference,
                          reference_fn) -> tuple[np.ndarray, compute.Counts]:
  """The reference's sequence log-prob of every response of ``train`` [N, max_k] (0 on padded slots), computed
  in batches of ``size`` comparisons built as the training batches are, and the compute it took."""
  table = np.zeros((len(train), max_k), np.float32)
  counts = compute.Counts()
  for start, (batch, real) in zip(range(0, len(train), size), comparison_chunks(ctx, train, size, max_k, trim=True)):
    table[start:start + real] = ctx.host(reference_fn(reference, ctx.put(batch)))[:real]
    counts += dpo.reference_counts(ctx.model_config, size * max_k, batch["tokens"].shape[-1],
                                   ctx.config.data.prompt_len, max_k)
  return table, counts


def run(ctx: StageContext, instance) -> dict[str, float]:
  cfg = instance.section
  settings = check(ctx, instance)
  data = ctx.config.data
  model_cfg = ctx.model_config
  sampling = ctx.sampling(cfg)
  graphdef = ctx.graphdef("lm")

  # Models: the trained policy; the frozen reference (never donated) and the optional reward model.
  reference_name = cfg.reference or cfg.policy
  policy, _ = ctx.load_params(cfg.policy, "lm")
  reference, _ = ctx.load_params(reference_name, "lm")
  scorer = evaluation.reward_scorer(ctx, cfg.reward) if cfg.reward else None
  tx = state_lib.make_optimizer(cfg.optimizer, cfg.steps)
  state, shardings = state_lib.create_train_state({"policy": policy}, {"policy": tx},
                                                  {"policy": ctx.param_shardings("lm")}, ctx.mesh,
                                                  seed=ctx.config.seed)
  frozen, frozen_shardings = {"reference": reference}, {"reference": ctx.param_shardings("lm")}

  # Comparisons: offline training data; held-out rows for the implicit reward's accuracy (either mode).
  has_comparisons = bool(cfg.comparisons) or bool(data.comparisons_file)
  train = ctx.comparisons(cfg.comparisons, "train") if has_comparisons else []
  test = ctx.comparisons(cfg.comparisons, "test") if has_comparisons else []
  test_rows = [test[i] for i in range(len(test))]
  max_k = max([len(train[i]["responses"]) for i in range(len(train))] + [len(r["responses"]) for r in test_rows],
              default=2)

  # Batches.
  if cfg.online:
    make_batch, example = online_batches(ctx, instance, scorer, sampling)
  else:
    loader = ctx.loader(train, cfg.batch_size)
    table = None
    if cfg.precompute_reference:
      reference_fn = dpo.make_reference_fn(graphdef, data.prompt_len, sampling, settings.average_log_probs)
      table, precompute_counts = precomputed_reference(ctx, train, cfg.batch_size, max_k, reference, reference_fn)

    def host_batch(step):
      indices = loader.indices_for_step(step)
      batch, stats = host_comparisons(ctx, [train[int(i)] for i in indices], max_k)
      if table is not None:
        batch[dpo.REFERENCE_KEY] = table[np.asarray(indices, np.int64)]
      if cfg.pack_width:
        try:
          batch = packing.comparison_training_rows(batch, cfg.pack_width, ctx.tokenizer.pad_id, data.min_bucket_len,
                                                   targets=True)
        except ValueError as e:
          raise StageError(f"{instance.name}.pack_width: {e}") from e
      return batch, stats

    def make_batch(step, state):
      del state
      batch, stats = host_batch(step)
      if cfg.pack_width:
        counts = dpo.step_counts(model_cfg, *batch["tokens"].shape, reference=table is None)
        fill = packing.fill(batch)
      else:
        counts = dpo.step_counts(model_cfg, batch["tokens"].shape[0] * max_k, batch["tokens"].shape[-1],
                                 data.prompt_len, max_k, reference=table is None)
        fill = packing.comparison_fill(batch, data.prompt_len)
      if table is not None and step == 0:  # counted once, as the run's (a resume recomputes it uncounted)
        counts += precompute_counts
      return ctx.put(batch), {**truncation_metrics(stats), "data/fill": fill, **counts.metrics()}

    example = host_batch(0)[0]

  step_fn = dpo.make_dpo_step(graphdef, tx, settings, data.prompt_len, sampling, ctx.mesh, ctx.rules)
  step = state_lib.compile_step(step_fn, shardings, ctx.batch_shardings(example), frozen_shardings, ctx.mesh)

  # Evaluation: the shared policy evaluation, and the implicit reward on held-out comparisons.
  evaluator = evaluation.PolicyEvaluator(ctx)
  baseline_gold = evaluation.load_gold(ctx, reference_name)
  chunks = list(comparison_chunks(ctx, test_rows, cfg.batch_size, max_k))
  log_ratio_fn = dpo.make_log_ratio_fn(graphdef, data.prompt_len, sampling, settings.average_log_probs)

  def held_out(params) -> dict[str, float]:
    h = np.concatenate([ctx.host(log_ratio_fn(params, reference, ctx.put(b)))[:real] for b, real in chunks])
    ranks = np.concatenate([b["ranks"][:real] for b, real in chunks])
    valid = np.concatenate([b["response_mask"][:real] for b, real in chunks])
    loss, aux = _preference_loss(h, ranks, valid, settings.beta, settings.loss, settings.label_smoothing)
    return {"eval/preference_accuracy": float(aux["accuracy"]), "eval/preference_loss": float(loss),
            "eval/preference_margin": float(aux["margin"])}

  def evaluate(state, step_number):
    params = state.params["policy"]
    result = evaluator.evaluate(params, reference=reference, reward=scorer, baseline_gold=baseline_gold)
    if step_number == cfg.steps:
      evaluation.save_gold(ctx, instance.name, result.gold)
    return {**result.metrics, **(held_out(params) if chunks else {})}

  state, last_eval = run_loop(ctx, instance.name, state, shardings, step, make_batch, cfg.steps, cfg,
                              frozen=frozen, evaluate=evaluate)
  ctx.save_params(instance.name, state.params["policy"])
  return last_eval


def online_batches(ctx: StageContext, instance, scorer, sampling):
  """``(make_batch, example batch)`` of online DPO: k samples per prompt of the current policy, ranked."""
  cfg = instance.section
  tok = ctx.tokenizer
  model_cfg = ctx.model_config
  k = cfg.samples_per_prompt
  prompts = ctx.records("prompts", "train")
  loader = ctx.loader(prompts, cfg.batch_size)
  rollout_fn = make_rollout_fn(ctx.graphdef("lm"), sampling, k, ctx.decode_layout)
  key = ctx.key("dpo/samples", instance.name)
  gold = GoldScorer(ctx.task)
  columns = ("prompt", "prompt_mask", "response", "response_mask")

  def make_batch(step, state):
    chosen = [prompts[int(i)]["prompt"] for i in loader.indices_for_step(step)]
    texts, group = repeat_prompts(chosen, k)
    prompt, stats = batching.prompt_batch(tok, texts, ctx.config.data.prompt_len)
    prompt = ctx.put({**prompt, "group": group}, with_valid=True)
    rollout = rollout_fn(state.params["policy"], prompt["tokens"], prompt["mask"], prompt["group"],
                         jax.random.fold_in(key, step))
    valid = ctx.host(prompt["valid"]).astype(bool)
    rows = {c: ctx.real_rows(getattr(rollout, c), valid) for c in columns}
    responses = [r for r, v in zip(response_texts(tok, rollout), valid) if v]
    lengths = rows["response_mask"].sum(axis=1)
    counts = compute.rollout_counts(model_cfg, len(valid), rollout.prompt_len, lengths, rollout.response_len,
                                    samples=len(texts), prompt_group=rollout.prompt_group)
    width = rollout.prompt_len + rollout.response_len
    host = {"rollout/gold_score": float(gold(None, texts, responses).mean()),
            "rollout/response_length": float(lengths.mean())}
    if cfg.ranker == "rm":
      scores = ctx.real_rows(scorer(rollout), valid).reshape(len(chosen), k)
      ranks = np.asarray(dpo_math.ranks_from_scores(scores, np.ones_like(scores)))
      counts.flops += compute.sequence_flops(model_cfg, len(valid), width, lm_head=False,
                                             shared_prefix=rollout.shared_prefix)
      host["rollout/rm_score"] = float(scores.mean())
    else:
      seed = int(rng.numpy_rng(ctx.config.seed, "dpo/rank", instance.name, step).integers(2 ** 31))
      ranks = np.stack([dpo.ranks_from_ranking(ctx.task.rank(p, responses[i * k:(i + 1) * k], seed=seed + i))
                        for i, p in enumerate(chosen)])
    # Prompts whose k samples are all the same text teach nothing (their pairs have no gradient).
    host["rollout/distinct_fraction"] = float(np.mean([len(set(responses[i * k:(i + 1) * k])) / k
                                                       for i in range(len(chosen))]))
    batch = dpo.online_batch(rows["prompt"], rows["prompt_mask"], rows["response"], rows["response_mask"], ranks)
    # Responses only, as offline: the step splits rows at the prompt's width.
    batch = bucketing.trim_pairs(batch, rollout.prompt_len, ctx.config.data.min_bucket_len, left=False)
    counts += dpo.step_counts(model_cfg, len(texts), batch["tokens"].shape[-1], rollout.prompt_len, k)
    host["data/fill"] = packing.comparison_fill(batch, rollout.prompt_len)
    return ctx.put(batch), {**truncation_metrics(stats), **host, **counts.metrics()}

  p, n = ctx.config.data.prompt_len, sampling.max_new_tokens
  zeros = lambda w: np.zeros((cfg.batch_size * k, w), np.int32)  # noqa: E731
  example = dpo.online_batch(zeros(p), zeros(p), zeros(n), zeros(n), np.zeros((cfg.batch_size, k), np.int32))
  return make_batch, example
