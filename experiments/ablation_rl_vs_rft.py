"""RL versus reward-filtered fine-tuning and the rest of the family at matched compute, from one shared
SFT + RM per seed.

  python experiments/ablation_rl_vs_rft.py --workdir=DIR [--seeds=2] [--preset=quick|full]
      [--match=samples|flops] [--arms=ppo,rloo,...] [--config.x=y ...]

Per seed, one workdir (DIR/seed_S) holds the shared pipeline (tokenizer,
pretrain, sft, label, reward) and the arms (``--arms``, default all): PPO,
PPO-ptx, RLOO and GRPO (the PPO path with a critic-free estimator, k = 4
samples per prompt), offline DPO (on the label stage's comparisons), online
DPO (k = 4 samples of the current policy ranked by the RM), RFT best-of-N
(RAFT / Llama 2 rejection sampling), ReST-style RFT (rising threshold, two
Improve passes per Grow), and best-of-n of the SFT policy for n = 1..64.
Every arm gets the PPO arm's budget: the same number of samples drawn
(``--match=samples``) or the same estimated FLOPs (``--match=flops``, which
gives the critic-free and RFT arms more samples since they skip the value
model). Offline DPO draws no samples: it is matched on FLOPs in both modes,
capped at ``DPO_MAX_EPOCHS`` passes over the comparisons.
Writes DIR/ablation.json (every arm's metrics, compute and eval curve),
DIR/ablation.md (mean +/- std over seeds) and DIR/ablation.png (gold reward
against sqrt(KL), RM reward dashed, with Gao et al.'s best-of-n and RL forms
fitted). Re-running resumes: finished stages are skipped.
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
from absl import app, flags
from ml_collections import ConfigDict, config_flags

from rlhf_jax import compute, defaults, host_memory, pipeline
from rlhf_jax.algorithms import dpo as dpo_lib
from rlhf_jax.algorithms import ppo as ppo_lib
from rlhf_jax.algorithms import rft as rft_lib
from rlhf_jax.generate import SamplingConfig
from rlhf_jax.metrics import read_metrics
from rlhf_jax.models import DecoderConfig

ARMS = ("ppo", "ppo_ptx", "rloo", "grpo", "dpo", "dpo_online", "rft_bon", "rft_rest")
LABELS = {"sft": "SFT", "ppo": "PPO", "ppo_ptx": "PPO-ptx", "rloo": "RLOO (k=4)", "grpo": "GRPO (k=4)",
          "dpo": "DPO (offline)", "dpo_online": "online DPO (k=4, RM-ranked)", "rft_bon": "RFT best-of-N",
          "rft_rest": "ReST RFT"}
GROUP_K = 4
DPO_MAX_EPOCHS = 4
BON_NS = (1, 2, 4, 8, 16, 32, 64)
TABLE_BON_NS = (4, 16, 64)

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory of the ablation (one sub-workdir per seed).")
flags.DEFINE_integer("seeds", 2, "Number of seeds (0 .. seeds-1).")
flags.DEFINE_enum("preset", "quick", ["quick", "full"], "quick: <= 20 min for 2 seeds on 2 CPU cores.")
flags.DEFINE_enum("match", "samples", ["samples", "flops"], "What the arms are matched to PPO on.")
flags.DEFINE_list("arms", list(ARMS), f"Arms to run, from {', '.join(ARMS)}.")
config_flags.DEFINE_config_dict("config", defaults.base_config(), "The shared pipeline's config (override keys).")


def model_of(config: ConfigDict) -> DecoderConfig:
  values = config.model.to_dict()
  values["vocab_size"] = config.tokenizer.vocab_size
  return DecoderConfig.from_mapping(values)


def ppo_flops_per_sample(config: ConfigDict, ppo: ConfigDict) -> float:
  """Estimated FLOPs per sample of a ppo instance (the stage's own accounting) at full response length."""
  n = ppo.sampling.max_new_tokens
  pcfg = ppo_lib.PPOConfig.from_mapping(ppo, SamplingConfig(max_new_tokens=n))
  value_mode = "none" if pcfg.critic_free else "shared" if ppo.value_init == "shared" else "separate"
  k = ppo.samples_per_prompt
  return ppo_lib.iteration_counts(model_of(config), pcfg, k, config.data.prompt_len, [n] * k, value_mode,
                                  samples_per_prompt=k).flops / k


def ppo_budget(config: ConfigDict, match: str) -> float:
  """The PPO arm's samples or estimated FLOPs: the budget every arm is matched to."""
  ppo = config.ppo
  samples = ppo.iterations * ppo.prompts_per_iteration * ppo.samples_per_prompt
  return samples if match == "samples" else samples * ppo_flops_per_sample(config, ppo)


def match_critic_free(config: ConfigDict, arm: ConfigDict, match: str) -> None:
  """Sets a critic-free ppo instance's ``prompts_per_iteration`` (same iterations as PPO) to the budget, a
  multiple of its minibatches when its samples share their prompt, so that the update shares it too."""
  per_iteration = arm.samples_per_prompt * (1 if match == "samples" else ppo_flops_per_sample(config, arm))
  step = arm.minibatches if arm.share_prompt and arm.samples_per_prompt > 1 else 1
  prompts = ppo_budget(config, match) / (arm.iterations * per_iteration * step)
  arm.prompts_per_iteration = max(int(round(prompts)), 1) * step


def dpo_flops_per_step(config: ConfigDict, dpo: ConfigDict, k: int) -> float:
  """Estimated FLOPs of one dpo step on ``batch_size`` prompts x ``k`` responses (the stage's accounting);
  online also samples them and scores them with the RM."""
  m, p = model_of(config), config.data.prompt_len
  n = dpo.sampling.max_new_tokens if dpo.online else config.data.response_len
  rows = dpo.batch_size * k
  flops = dpo_lib.step_counts(m, rows, p + n, p, k, reference=not dpo.precompute_reference).flops
  if dpo.online:
    flops += (compute.rollout_counts(m, rows, p, [n] * rows, n, prompt_group=k).flops
              + compute.sequence_flops(m, rows, p + n, lm_head=False, shared_prefix=(p, k) if k > 1 else None))
  return flops


def match_dpo(config: ConfigDict, arm: ConfigDict, match: str) -> None:
  """Sets a dpo instance's ``steps``: online to the budget's samples or FLOPs; offline to the FLOPs
  budget, capped at ``DPO_MAX_EPOCHS`` passes over the label stage's comparisons."""
  if arm.online:
    per_step = arm.batch_size * arm.samples_per_prompt
    if match == "flops":
      per_step = dpo_flops_per_step(config, arm, arm.samples_per_prompt)
    arm.steps = max(int(round(ppo_budget(config, match) / per_step)), 1)
  else:
    held_out = min(config.reward.eval_comparisons, max(config.label.num_prompts // 5, 1))
    train = config.label.num_prompts - held_out
    arm.batch_size = min(arm.batch_size, train)
    epoch = math.ceil(train / arm.batch_size)
    budget = ppo_budget(config, "flops")
    if arm.precompute_reference:  # one reference pass over every training comparison, before the steps
      k, p = config.label.k, config.data.prompt_len
      budget -= epoch * dpo_lib.reference_counts(model_of(config), arm.batch_size * k, p + config.data.response_len,
                                                 p, k).flops
    steps = int(budget // dpo_flops_per_step(config, arm, config.label.k))
    arm.steps = max(min(steps, DPO_MAX_EPOCHS * epoch), 1)
  arm.eval_every = max(arm.steps // 8, 1)
  arm.checkpoint_every = arm.eval_every


def rft_flops(config: ConfigDict, rft: ConfigDict) -> float:
  """Estimated FLOPs of an RFT instance: samples (generation, RM, 2 log-prob passes) and SFT steps."""
  m, p, n = model_of(config), config.data.prompt_len, rft.sampling.max_new_tokens
  g = rft_lib.sampler_group(rft.samples_per_prompt)  # rows per prefilled prompt
  per_sample = (compute.generation_flops(m, g, p, n - 1, p + n - 1, prompt_group=g)
                + rft_lib.scoring_flops(m, g, p + n, (p, g) if g > 1 else None)) / g
  samples = rft.rounds * rft.prompts_per_round * rft.samples_per_prompt
  steps = rft.rounds * rft.improve_passes * rft.improve_steps
  return samples * per_sample + steps * compute.sequence_flops(m, rft.batch_size, p + n, train=True)


def match_rft(config: ConfigDict, rft: ConfigDict, match: str) -> None:
  """Sets ``rft.prompts_per_round`` so the arm uses the PPO arm's samples or FLOPs (in place)."""
  budget = ppo_budget(config, match)
  if match == "samples":
    rft.prompts_per_round = max(int(budget) // (rft.rounds * rft.samples_per_prompt), 1)
    return
  rft.prompts_per_round = 1
  one = rft_flops(config, rft)
  rft.prompts_per_round = 2
  slope = rft_flops(config, rft) - one
  rft.prompts_per_round = max(int((budget - one) // slope) + 1, 1)


def arm_config(base: ConfigDict, seed: int, preset: str, match: str, arms=ARMS) -> ConfigDict:
  """The config of one seed's workdir: the shared pipeline, the chosen arms, best-of-n and eval."""
  unknown = set(arms) - set(ARMS)
  if unknown:
    raise ValueError(f"unknown arms {sorted(unknown)}; choose from {', '.join(ARMS)}")
  c = ConfigDict(base.to_dict())
  c.seed = seed
  if preset == "quick":
    c.reward.steps = min(c.reward.steps, 400)
  evals = 8
  c.ppo.eval_every = max(c.ppo.iterations // evals, 1)
  c.ppo_ptx = ConfigDict(c.ppo.to_dict())
  c.ppo_ptx.ptx_coef = 0.5
  # RLOO and GRPO: PPO's settings (same iterations, epochs, minibatches, KL coefficient), k samples per
  # prompt, no value model; GRPO's advantages are already normalised per group.
  for name, whiten in (("rloo", True), ("grpo", False)):
    arm = ConfigDict(c.ppo.to_dict())
    arm.update(dict(advantage=name, samples_per_prompt=GROUP_K, whiten_advantages=whiten))
    match_critic_free(c, arm, match)
    c[name] = arm
  for name, online in (("dpo", False), ("dpo_online", True)):
    arm = defaults.stage("dpo", online=online, reward="reward", samples_per_prompt=GROUP_K,
                         comparisons=() if online else ("label",))
    arm.sampling = ConfigDict(c.ppo.sampling.to_dict())
    match_dpo(c, arm, match)
    c[name] = arm
  for name, selection, passes in (("rft_bon", "best_of_n", 1), ("rft_rest", "threshold", 2)):
    arm = defaults.stage("rft", selection=selection, rounds=4, samples_per_prompt=8, improve_passes=passes,
                         improve_steps=10 // passes, batch_size=16, threshold_start=0.5, threshold_step=0.25)
    arm.sampling = ConfigDict(c.ppo.sampling.to_dict())
    match_rft(c, arm, match)
    arm.eval_every = arm.improve_passes * arm.improve_steps
    arm.checkpoint_every = arm.eval_every
    c[name] = arm
  c.bon = defaults.stage("best_of_n", ns=BON_NS, num_prompts=min(c.evaluation.num_prompts, 64))
  for name in set(ARMS) - set(arms):
    del c[name]
  c.eval.policies = ("sft",) + tuple(arms)
  c.stages = "tokenizer,pretrain,sft,label,reward," + ",".join(arms) + ",bon,eval"
  return c


def curve(workdir: str, name: str) -> list[dict[str, float]]:
  """The in-loop eval points of an arm: step, gold, RM reward, KL."""
  return [{"step": r["step"], "gold": r["eval/gold_reward"], "rm": r.get("eval/rm_reward"), "kl": r["eval/kl"]}
          for r in read_metrics(workdir, name) if "eval/gold_reward" in r and "eval/kl" in r]


def collect(workdir: str, arms=ARMS) -> dict:
  """One seed's results: per arm (and SFT, best-of-n) its final metrics, compute and curve."""
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  ev = summary["eval"]
  out = {}
  for name in ("sft",) + tuple(arms):
    out[name] = {k.split("/", 1)[1]: v for k, v in ev.items() if k.startswith(name + "/eval/")}
    out[name]["compute"] = {k: v for k, v in summary.get(name, {}).items() if k.startswith("compute/")}
    out[name]["curve"] = curve(workdir, name) if name != "sft" else []
  sft_gold = out["sft"]["eval/gold_reward"]
  bon = summary["bon"]
  out["bon"] = {int(n): {"eval/gold_reward": bon[f"bon/{n}/gold_reward"], "eval/rm_reward": bon[f"bon/{n}/rm_reward"],
                         "eval/kl": bon[f"bon/{n}/kl_formula"], "kl_estimate": bon[f"bon/{n}/kl_estimate"],
                         "samples_per_prompt": n} for n in BON_NS}
  out["sft"]["eval/gold_reward"] = sft_gold
  return out


def fit_gao(d: np.ndarray, r: np.ndarray, form: str) -> tuple[float, float]:
  """Least-squares (a, b) of Gao et al.'s R(d) = d (a - b d) ("bon") or d (a - b log d) ("rl"); d = sqrt(KL)."""
  keep = d > 0
  d, r = d[keep], r[keep]
  second = d * d if form == "bon" else d * np.log(d)
  design = np.stack([d, -second], axis=1)
  (a, b), *_ = np.linalg.lstsq(design, r, rcond=None)
  return float(a), float(b)


def mean_std(values, digits: int = 3) -> str:
  values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
  if not values:
    return "-"
  if np.std(values) == 0:
    return f"{values[0]:.{digits}f}"
  return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def arms_of(runs: list[dict]) -> tuple[str, ...]:
  """The arms the runs hold, in ``ARMS`` order."""
  return tuple(a for a in ARMS if a in runs[0])


def table(runs: list[dict]) -> str:
  """Markdown table, mean +/- std over seeds."""
  head = ("| method | gold reward | RM reward | KL to SFT (nats) | win rate vs SFT | samples drawn | grad steps | "
          "TFLOPs |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
  lines = [head]
  for name in ("sft",) + arms_of(runs):
    entries = [r[name] for r in runs]
    get = lambda key: mean_std([e.get(key) for e in entries])  # noqa: E731
    comp = lambda key, scale=1.0, digits=0: mean_std(  # noqa: E731
        [e["compute"].get(key, 0.0) * scale for e in entries], digits)
    lines.append(f"| {LABELS[name]} | {get('eval/gold_reward')} | {get('eval/rm_reward')} | {get('eval/kl')} | "
                 f"{get('eval/win_rate_vs_sft')} | {comp('compute/samples')} | {comp('compute/grad_steps')} | "
                 f"{comp('compute/flops', 1e-12, 2)} |")
  for n in TABLE_BON_NS:
    entries = [r["bon"][n] for r in runs]
    get = lambda key: mean_std([e.get(key) for e in entries])  # noqa: E731
    lines.append(f"| best-of-{n} of SFT (KL formula; estimate {get('kl_estimate')}) | {get('eval/gold_reward')} | "
                 f"{get('eval/rm_reward')} | {get('eval/kl')} | - | {n} per prompt | 0 | - |")
  return "\n".join(lines)


def plot(runs: list[dict], path: str) -> dict:
  """Gold (solid) and RM (dashed) reward gain over SFT against sqrt(KL), with Gao et al.'s fits."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 5.5))
  colors = {"ppo": "tab:blue", "ppo_ptx": "tab:cyan", "rloo": "tab:purple", "grpo": "tab:pink",
            "dpo": "tab:brown", "dpo_online": "tab:orange", "rft_bon": "tab:green", "rft_rest": "tab:olive",
            "bon": "tab:red"}
  fits = {}
  series = {}
  for name in arms_of(runs):
    # Every arm starts at the SFT policy: KL 0, no gain.
    pts = [(0.0, 0.0, 0.0)] + [(math.sqrt(max(p["kl"], 0.0)), p["gold"] - run["sft"]["eval/gold_reward"],
                                p["rm"] - run["sft"]["eval/rm_reward"]) for run in runs for p in run[name]["curve"]]
    series[name] = pts
  series["bon"] = [(math.sqrt(max(run["bon"][n]["eval/kl"], 0.0)),
                    run["bon"][n]["eval/gold_reward"] - run["bon"][1]["eval/gold_reward"],
                    run["bon"][n]["eval/rm_reward"] - run["bon"][1]["eval/rm_reward"]) for run in runs for n in BON_NS]
  for name, pts in series.items():
    if not pts:
      continue
    d, gold, rm = (np.array([p[i] if p[i] is not None else np.nan for p in pts], float) for i in range(3))
    order = np.argsort(d)
    label = "best-of-n (SFT)" if name == "bon" else LABELS[name]
    ax.plot(d[order], gold[order], "o", color=colors[name], label=f"{label}: gold", alpha=0.8)
    ax.plot(d[order], rm[order] * 0.1, "x", color=colors[name], alpha=0.5)
    form = "bon" if name == "bon" else "rl"
    if name in ("bon", "ppo") and len(d) >= 3:
      a, b = fit_gao(d, gold, form)
      fits[name] = {"form": "d(a - b d)" if form == "bon" else "d(a - b log d)", "a": a, "b": b}
      grid = np.linspace(max(d.min(), 1e-3), d.max(), 100)
      fit = grid * (a - b * (grid if form == "bon" else np.log(grid)))
      ax.plot(grid, fit, "-", color=colors[name], lw=1.5, label=f"{label}: Gao fit {fits[name]['form']}")
      a_rm, b_rm = fit_gao(d[~np.isnan(rm)], rm[~np.isnan(rm)] * 0.1, form)
      ax.plot(grid, grid * (a_rm - b_rm * (grid if form == "bon" else np.log(grid))), "--", color=colors[name],
              lw=1.2, label=f"{label}: RM reward x0.1 (fit)")
  ax.axhline(0.0, color="grey", lw=0.5)
  ax.set_xlabel("sqrt(KL to SFT)  [sqrt(nats)]")
  ax.set_ylabel("gold reward gain over SFT (RM reward x0.1 dashed)")
  ax.set_title("RLHF methods at matched compute: gold (o) and proxy RM (x, dashed) reward")
  ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return fits


def budgets(config: ConfigDict, arms) -> str:
  """One line: what each arm was given to match the PPO arm."""
  parts = []
  for name in arms:
    arm = config[name]
    if arm.kind == "ppo":
      parts.append(f"{name} {arm.iterations}x{arm.prompts_per_iteration}x{arm.samples_per_prompt} samples")
    elif arm.kind == "dpo":
      parts.append(f"{name} {arm.steps} steps")
    else:
      parts.append(f"{name} {arm.rounds}x{arm.prompts_per_round}x{arm.samples_per_prompt} samples")
  return ", ".join(parts)


def run_ablation(base: ConfigDict, workdir: str, seeds: int, preset: str, match: str, arms=ARMS) -> dict:
  """Runs (or resumes) every seed, then writes ablation.json, .md and .png; returns the JSON content."""
  os.makedirs(workdir, exist_ok=True)
  runs = []
  for seed in range(seeds):
    sub = os.path.join(workdir, f"seed_{seed}")
    config = arm_config(base, seed, preset, match, arms)
    print(f"[ablation] seed {seed}: {sub} ({budgets(config, arms)})", flush=True)
    pipeline.run(config, sub)
    runs.append(collect(sub, arms))
  fits = plot(runs, os.path.join(workdir, "ablation.png"))
  result = {"preset": preset, "match": match, "seeds": seeds, "arms": list(arms), "runs": runs, "gao_fits": fits}
  with open(os.path.join(workdir, "ablation.json"), "w") as f:
    json.dump(result, f, indent=1)
  md = (f"# RL vs RFT vs the critic-free and direct methods ({preset} preset, matched on {match}, {seeds} seeds, mean ± std)\n\n"
        + table(runs) + "\n")
  with open(os.path.join(workdir, "ablation.md"), "w") as f:
    f.write(md)
  print(md, flush=True)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  arms = tuple(a for a in ARMS if a in FLAGS.arms)
  if set(FLAGS.arms) - set(ARMS):
    raise app.UsageError(f"unknown arms {sorted(set(FLAGS.arms) - set(ARMS))}; choose from {', '.join(ARMS)}")
  run_ablation(FLAGS.config, FLAGS.workdir, FLAGS.seeds, FLAGS.preset, FLAGS.match, arms)


if __name__ == "__main__":
  host_memory.reexec_with_hugepages()  # every arm's stages run in this process
  sys.exit(app.run(main))
