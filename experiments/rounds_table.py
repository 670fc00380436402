"""The per-round table of an iterated-RLHF workdir (configs/iterated.py), as markdown.

  python experiments/rounds_table.py --workdir=DIR

Round r: the policy ppo_r on held-out prompts (gold reward, KL to SFT, win rate vs SFT, from the eval
instance), the reward model reward_r on its held-out comparisons, and reward_r on the samples of ppo_r
(label_{r+1}/label/rm_accuracy: how well the RM ranks the current policy's samples, against the labelers
and against gold, beside the labelers' own agreement with gold on those samples).
"""

from __future__ import annotations

import json
import os

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of an iterated run.")


def rounds_table(summary: dict) -> str:
  """Markdown rows, one per round, from a summary.json of configs/iterated.py."""
  ev = summary["eval"]
  head = ("| round | policy | gold reward | KL to SFT | win rate vs SFT | RM held-out acc. | "
          "RM acc. on this policy's samples (labels / gold) | labelers vs gold there |")
  lines = [head, "|" + " --- |" * 8,
           f"| 0 | sft | {ev['sft/eval/gold_reward']:.3f} | 0 | 0.5 | - | - | - |"]
  r = 1
  while f"ppo_{r}" in summary:
    probe = summary.get(f"label_{r + 1}", {})
    rm = summary.get(f"reward_{r}", {})
    lines.append(
        f"| {r} | ppo_{r} | {ev[f'ppo_{r}/eval/gold_reward']:.3f} | {ev[f'ppo_{r}/eval/kl']:.2f} | "
        f"{ev[f'ppo_{r}/eval/win_rate_vs_sft']:.3f} | {rm.get('eval/rm_accuracy', float('nan')):.3f} | "
        f"{probe.get('label/rm_accuracy', float('nan')):.3f} / {probe.get('label/rm_gold_accuracy', float('nan')):.3f}"
        f" | {probe.get('label/labeler_gold_agreement', float('nan')):.3f} |")
    r += 1
  return "\n".join(lines)


def main(argv):
  del argv
  with open(os.path.join(FLAGS.workdir, "summary.json")) as f:
    print(rounds_table(json.load(f)))


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
