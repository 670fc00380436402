"""Runs the quickstart pipeline in a fresh workdir and prints one JSON line: wall time and per-stage results.

  python experiments/quickstart_benchmark.py [--seed=N] [--workdir=DIR] [--config.KEY=VALUE ...]

Targets (issue 5): whole pipeline <= 300 s on 2 CPU cores; PPO eval/win_rate_vs_sft >= 0.65.
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile
import time

from rlhf_jax import host_memory, pipeline
from rlhf_jax.config_io import apply_overrides, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> None:
  workdir = None
  overrides = []
  for arg in argv:
    key, _, value = arg.partition("=")
    if key == "--workdir":
      workdir = value
    elif key == "--seed":
      overrides.append(("seed", value))
    elif key.startswith("--config."):
      overrides.append((key[len("--config."):], value))
    else:
      raise SystemExit(f"unknown argument {arg!r}")
  config = apply_overrides(load_config(str(ROOT / "configs" / "quickstart.py")), overrides)
  workdir = workdir or tempfile.mkdtemp(prefix="quickstart-")
  start = time.time()
  summary = pipeline.run(config, workdir)
  result = {"benchmark": "quickstart", "seed": config.seed, "workdir": workdir,
            "wall_seconds": round(time.time() - start, 1),
            "stage_seconds": {k: v["time/stage_seconds"] for k, v in summary.items() if "time/stage_seconds" in v},
            "eval": summary.get("eval", {}),
            "rm_accuracy": summary.get("reward", {}).get("eval/rm_accuracy"),
            "labeler_gold_agreement": summary.get("reward", {}).get("eval/labeler_gold_agreement")}
  print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  host_memory.reexec_with_hugepages()  # timed as the rlhf-jax command runs
  main(sys.argv[1:])
