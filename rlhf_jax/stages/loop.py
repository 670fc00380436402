"""The train loop every trained stage shares: resume, step, log, evaluate, checkpoint, NaN guard.

Batches and RNG keys are functions of the step number only, so a stage
restored from a checkpoint at step n continues exactly as an uninterrupted
run would; metrics lines past the restored step are dropped on resume.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np

from rlhf_jax import compute, state as state_lib
from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.data.batching import TruncationStats, comparison_shared_prefix
from rlhf_jax.progress import Progress
from rlhf_jax.stages.context import StageContext, StageError
from rlhf_jax.state import TrainState


# The few metrics worth a glance on the progress line; everything goes to metrics.jsonl.
PROGRESS_METRICS = ("train/loss", "train/accuracy", "train/policy_loss", "rollout/rm_score", "rollout/kl",
                    "rollout/gold_score")


class CheckpointLayoutError(StageError):
  """A stage's checkpoint holds another state layout than the stage builds (the checkpoint is left as it is)."""


class NonFiniteError(StageError):
  """A loss or metric became NaN/inf; the last good checkpoint is kept."""


def check_finite(stage: str, step: int, metrics: Mapping[str, Any]) -> None:
  """Raises ``NonFiniteError`` naming the stage, step and offending metric."""
  for name, value in metrics.items():
    if isinstance(value, float) and not math.isfinite(value):
      raise NonFiniteError(f"stage '{stage}' step {step}: {name} = {value}; stopping, the last good "
                           "checkpoint is kept")


def truncation_metrics(stats: TruncationStats) -> dict[str, float]:
  """Counts of truncated examples in a batch, as metrics (truncation is never silent)."""
  return {f"data/{k}": float(v) for k, v in stats.as_dict().items() if k.endswith("truncated")}


def step_counts(model_cfg, batch: Mapping[str, Any], lm_head: bool = True) -> compute.Counts:
  """Compute of one training step on a host batch of full sequences: every ``*tokens`` array [..., T]
  is one forward and backward pass (e.g. an SFT batch and its ``ptx_tokens``). K-wise comparison
  ``tokens`` [B, K, T] with a ``prompt_mask`` [B, P] compute the prompt once per example."""
  shared = comparison_shared_prefix(batch) if np.ndim(batch.get("tokens")) == 3 else None
  flops = sum(compute.sequence_flops(model_cfg, int(v.size // v.shape[-1]), int(v.shape[-1]), lm_head, train=True,
                                     shared_prefix=shared if k == "tokens" else None)
              for k, v in batch.items() if k.endswith("tokens"))
  return compute.Counts(grad_steps=1.0, flops=flops)


def to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
  """One host fetch of a metrics dict -> Python floats."""
  return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


def _restore_legacy_layout(ckpt: Checkpointer, state: TrainState, state_shardings: TrainState, step: int,
                           error: ValueError) -> tuple[TrainState, dict]:
  """Restores a checkpoint written before optimizer numbers moved into the optimizer state; re-raises
  ``error`` (naming the checkpoint) when the checkpoint is not of that layout either."""
  legacy = state_lib.legacy_opt_layout(state)
  if jax.tree.structure(legacy) == jax.tree.structure(state):  # nothing to translate
    raise CheckpointLayoutError(f"{ckpt.directory} step {step} does not match this stage's state: {error}") from error
  try:
    restored, extra = ckpt.restore(state_lib.abstract_like(legacy, state_lib.legacy_opt_layout(state_shardings)),
                                   step=step)
  except ValueError:
    raise CheckpointLayoutError(f"{ckpt.directory} step {step} does not match this stage's state (written by "
                                f"another model, optimizer or rlhf_jax): {error}") from error
  return state_lib.from_legacy_opt_layout(state, restored), extra


def run_loop(ctx: StageContext, stage: str, state: TrainState, state_shardings: TrainState,
             step_fn: Callable[[TrainState, Any, Any], tuple[TrainState, Any]],
             make_batch: Callable[[int, TrainState], tuple[Any, dict[str, float]]],
             total_steps: int, loop_cfg: Mapping[str, Any], frozen: Any = None,
             evaluate: Callable[[TrainState, int], dict[str, float]] | None = None,
             checkpoint_extra: Callable[[TrainState], dict] | None = None,
             per_step_metrics: tuple[str, ...] = ()) -> tuple[TrainState, dict[str, float]]:
  """Runs ``step_fn`` from the last checkpoint (if any) to ``total_steps``.

  make_batch(step, state) -> (device batch, host-side metrics such as truncation counts), the latter
  averaged over the steps since the last log line, except ``compute/*`` increments, which are summed
  into cumulative totals (logged with every row, saved with checkpoints, and returned);
  step metrics whose names start with one of ``per_step_metrics`` are averaged the same way (numbers of
  each step's batch that the step itself computes, such as PPO's fused ``rollout/*``; summed on the device
  and read with the log line, so no step waits on them);
  evaluate(state, step) -> eval metrics, called every ``eval_every`` steps and at the end.
  Returns the final state and the last eval metrics.
  """
  directory = os.path.join(ctx.stage_dir(stage), "checkpoints")
  ckpt = Checkpointer(directory, save_every=loop_cfg["checkpoint_every"], keep=loop_cfg["keep_checkpoints"],
                      async_save=loop_cfg["async_checkpoints"])
  start = ckpt.latest_step() or 0
  # Cumulative compute counters (``compute/*`` increments from make_batch), restored with the state.
  totals = {k: 0.0 for k in compute.KEYS}
  if start:
    try:
      state, extra = ckpt.restore(state_lib.abstract_like(state, state_shardings), step=start)
    except ValueError as error:
      state, extra = _restore_legacy_layout(ckpt, state, state_shardings, start, error)
    totals.update({k: float(v) for k, v in (extra or {}).get("compute", {}).items()})
  # Lines a killed run wrote after its last checkpoint (or before its first) are replayed below.
  ctx.metrics.truncate_after(stage, start)
  progress = Progress(stage, total_steps, start_step=start, enabled=ctx.is_primary)
  log_every, eval_every = loop_cfg["log_every"], loop_cfg.get("eval_every", 0)
  last_eval: dict[str, float] = {}
  pending_host: dict[str, float] = {}
  pending_device: dict[str, Any] = {}  # per_step_metrics, summed on the device since the last log line
  pending_steps = 0
  try:
    for step in range(start, total_steps):
      batch, host_metrics = make_batch(step, state)
      for k, v in host_metrics.items():
        if k in totals:
          totals[k] += v
        else:
          pending_host[k] = pending_host.get(k, 0.0) + v
      pending_steps += 1
      state, metrics = step_fn(state, batch, frozen)
      for k in [k for k in metrics if k.startswith(per_step_metrics)]:  # none for ()
        pending_device[k] = pending_device[k] + metrics[k] if k in pending_device else metrics[k]
      done = step + 1
      will_save = done % ckpt.save_every == 0 or done == total_steps
      if done % log_every == 0 or will_save:
        values = to_floats(metrics)
        values.update({k: v / pending_steps for k, v in {**pending_host, **to_floats(pending_device)}.items()})
        values.update(totals)
        check_finite(stage, done, values)  # rollout metrics (host side) included
        pending_host, pending_device, pending_steps = {}, {}, 0
        ctx.metrics.write(stage, done, values)
        progress.update(done, {k: v for k, v in values.items() if k in PROGRESS_METRICS})
      if evaluate is not None and eval_every and done % eval_every == 0 and done != total_steps:
        last_eval = evaluate(state, done)
        check_finite(stage, done, last_eval)
        ctx.metrics.write(stage, done, last_eval)
      if will_save:
        ctx.metrics.flush()  # on an object store metrics.jsonl is written in batches: none lost past a checkpoint
        extra = checkpoint_extra(state) if checkpoint_extra else {}
        ckpt.save(done, state, {**extra, "compute": dict(totals)}, force=done == total_steps)
    if evaluate is not None:
      last_eval = evaluate(state, total_steps)
      ctx.metrics.write(stage, total_steps, last_eval)
    last_eval = {**last_eval, **{k: v for k, v in totals.items() if v}}
  finally:
    progress.close()
    ckpt.wait()
    ckpt.close()
  return state, last_eval
