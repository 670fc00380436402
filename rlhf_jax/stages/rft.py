"""rft stage: reward-filtered fine-tuning of a policy instance with a frozen reward model.

Each round's samples (the shared rollout), their RM scores and log-ratios to
the reference are saved as ``WORKDIR/INSTANCE/rounds/round_R.npz`` when grown,
so a resumed run trains on exactly the samples it drew before; gradient steps
use the SFT step on the selected rows. Compute counters include the sampling
and scoring of every round.
"""

from __future__ import annotations

import functools
import io
import os

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from rlhf_jax import compute, rng, state as state_lib
from rlhf_jax.algorithms import rft
from rlhf_jax.algorithms.lm import make_lm_step
from rlhf_jax.atomic_file import write_atomic
from rlhf_jax.data import batching, packing
from rlhf_jax.generate import fitting_group
from rlhf_jax.rl.selection import RULES
from rlhf_jax.rollout import make_rollout_fn, repeat_prompts, response_texts
from rlhf_jax.scoring import GoldScorer
from rlhf_jax.stages import evaluation
from rlhf_jax.stages.context import StageContext, StageError
from rlhf_jax.stages.loop import run_loop, step_counts


@functools.lru_cache(maxsize=16)
def make_guarded_step(step_fn):
  """A step that leaves params and optimizer untouched when ``batch["active"]`` is 0 (nothing selected)."""

  def step(state, batch, frozen):
    new, metrics = step_fn(state, {k: v for k, v in batch.items() if k != "active"}, frozen)
    active = batch["active"] > 0
    kept = jax.tree.map(lambda n, o: jnp.where(active, n, o), new, state)
    return kept.replace(step=new.step), metrics

  return step


def run(ctx: StageContext, instance) -> dict[str, float]:
  cfg = instance.section
  if cfg.selection not in RULES:
    raise StageError(f"{instance.name}.selection must be one of {RULES}, got {cfg.selection!r}")
  model_cfg = ctx.model_config
  graphdef = ctx.graphdef("lm")
  sampling = ctx.sampling(cfg)
  policy, _ = ctx.load_params(cfg.policy, "lm")
  reference, _ = ctx.load_params(cfg.reference, "lm")
  scorer = evaluation.reward_scorer(ctx, cfg.reward)
  steps = rft.total_steps(cfg)
  tx = state_lib.make_optimizer(cfg.optimizer, steps)
  state, shardings = state_lib.create_train_state({"policy": policy}, {"policy": tx},
                                                  {"policy": ctx.param_shardings("lm")}, ctx.mesh,
                                                  seed=ctx.config.seed)
  rollout_fn = make_rollout_fn(graphdef, sampling, rft.sampler_group(cfg.samples_per_prompt), ctx.decode_layout)
  log_ratio_fn = evaluation.log_ratio_fn(graphdef, sampling)
  gold = GoldScorer(ctx.task)
  prompts = ctx.records("prompts", "train")
  rounds_dir = os.path.join(ctx.stage_dir(instance.name), "rounds")
  grown: dict[int, dict[str, np.ndarray]] = {}

  def grow(round_index: int, params) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The round's samples with scores (from disk if this round was grown before) and its metrics."""
    path = os.path.join(rounds_dir, f"round_{round_index}.npz")
    if epath.Path(path).exists():
      with epath.Path(path).open("rb") as f, np.load(f) as arrays:
        data = dict(arrays)
    else:
      order = rng.numpy_rng(ctx.config.seed, "rft/prompts", instance.name, round_index).permutation(len(prompts))
      chosen = [prompts[int(i)]["prompt"] for i in order[: cfg.prompts_per_round]]
      texts, group = repeat_prompts(chosen, cfg.samples_per_prompt)
      key = jax.random.fold_in(ctx.key("rft/samples", instance.name), round_index)
      parts = []
      for b, start in enumerate(range(0, len(texts), rft.ROLLOUT_ROWS)):
        rows = slice(start, start + rft.ROLLOUT_ROWS)
        batch, _ = batching.prompt_batch(ctx.tokenizer, texts[rows], ctx.config.data.prompt_len)
        batch = ctx.put({**batch, "group": group[rows]})
        r = rollout_fn(params, batch["tokens"], batch["mask"], batch["group"], jax.random.fold_in(key, b))
        parts.append({"prompt": r.prompt, "prompt_mask": r.prompt_mask, "response": r.response,
                      "response_mask": r.response_mask, "group": r.group, "score": scorer(r),
                      "log_ratio": log_ratio_fn(params, reference, r),
                      "gold": gold(r, texts[rows], response_texts(ctx.tokenizer, r))})
      data = {k: np.concatenate([ctx.host(p[k]) for p in parts]) for k in parts[0]}
      if ctx.is_primary:
        buffer = io.BytesIO()
        np.savez(buffer, **data)
        write_atomic(path, buffer.getvalue())
    lengths = data["response_mask"].sum(axis=1)
    counts = compute.Counts()
    prompt_len = data["prompt"].shape[1]
    width = prompt_len + data["response"].shape[1]
    for start in range(0, len(lengths), rft.ROLLOUT_ROWS):
      chunk = lengths[start:start + rft.ROLLOUT_ROWS]
      group = fitting_group(rft.sampler_group(cfg.samples_per_prompt), len(chunk))
      counts += compute.rollout_counts(model_cfg, len(chunk), prompt_len, chunk, sampling.max_new_tokens,
                                       prompt_group=group)
      counts.flops += rft.scoring_flops(model_cfg, len(chunk), width, (prompt_len, group) if group > 1 else None)
    metrics = {"rollout/rm_score": float(data["score"].mean()), "rollout/gold_score": float(data["gold"].mean()),
               "rollout/kl": float(data["log_ratio"].mean()),
               "rollout/response_length": float(lengths.mean()), **counts.metrics()}
    return data, metrics

  def make_batch(step, state):
    round_index, improve_pass = rft.schedule(cfg, step)
    host = {}
    if round_index not in grown:
      grown.clear()
      grown[round_index], grow_metrics = grow(round_index, state.params["policy"])
      if step % (cfg.improve_passes * cfg.improve_steps) == 0:  # counted once, at the round's first step
        host.update(grow_metrics)
    data = grown[round_index]
    chosen = rft.select(cfg, data["score"], data["group"], data["log_ratio"], round_index, improve_pass)
    pick = rng.numpy_rng(ctx.config.seed, "rft/batches", instance.name, step)
    if len(chosen):
      idx = pick.choice(chosen, cfg.batch_size, replace=len(chosen) < cfg.batch_size)
    else:
      idx = np.zeros(cfg.batch_size, np.int64)
    batch = rft.sft_rows(data["prompt"][idx], data["prompt_mask"][idx], data["response"][idx],
                         data["response_mask"][idx])
    # The grown rounds keep the full widths; each SFT batch is cut to its own rows' bucket (or packed).
    batch = packing.training_rows(batch, ctx.config.data, ctx.tokenizer.pad_id, data["prompt"].shape[1])
    host.update({"rft/selected": float(len(chosen)),
                 "rft/selected_score": float(data["score"][chosen].mean()) if len(chosen) else 0.0,
                 "rft/selected_gold": float(data["gold"][chosen].mean()) if len(chosen) else 0.0})
    if len(chosen):
      host["data/fill"] = packing.fill(batch)
      for k, v in step_counts(model_cfg, batch).metrics().items():
        host[k] = host.get(k, 0.0) + v
    return ctx.put({**batch, "active": np.asarray(len(chosen) > 0, np.int32)}), host

  example = rft.sft_rows(*(np.zeros((cfg.batch_size, n), np.int32)
                           for n in (ctx.config.data.prompt_len, ctx.config.data.prompt_len,
                                     sampling.max_new_tokens, sampling.max_new_tokens)))
  example = packing.training_rows(example, ctx.config.data, ctx.tokenizer.pad_id, ctx.config.data.prompt_len)
  example["active"] = np.asarray(1, np.int32)
  step_fn = make_guarded_step(make_lm_step(graphdef, tx, mesh=ctx.mesh, rules=ctx.rules))
  step = state_lib.compile_step(step_fn, shardings, ctx.batch_shardings(example), None, ctx.mesh)
  evaluator = evaluation.PolicyEvaluator(ctx)
  baseline_gold = evaluation.load_gold(ctx, cfg.reference)

  def evaluate(state, step_number):
    result = evaluator.evaluate(state.params["policy"], reference=reference, reward=scorer,
                                baseline_gold=baseline_gold)
    if step_number == steps:
      evaluation.save_gold(ctx, instance.name, result.gold)
    return result.metrics

  state, last_eval = run_loop(ctx, instance.name, state, shardings, step, make_batch, steps, cfg, evaluate=evaluate)
  ctx.save_params(instance.name, state.params["policy"])
  return last_eval
