"""The PyTorch/TRL peer (``../shared/peers/trl_bench.py``) with torch's float32 matmul precision set.

  ~/.cache/rlhf-peers/venv/bin/python experiments/benchmarks/peer_matmul_precision.py --precision=medium \
      [--only=generate,sft_step,reward_step,rloo_iter]

``torch.set_float32_matmul_precision("medium")`` lets a float32 model's products run on bf16 operands with
float32 accumulation (oneDNN on a CPU with bf16 units), everything else staying float32: the peer of
``run.py --matmul_dtype=bfloat16``. The peer's own ``matmul_peak`` line then times the same bf16 product. The
other arguments go to the peer unchanged; its JSON lines gain ``"matmul_precision"``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import runpy
import sys
import tempfile

import torch

PEER = pathlib.Path(__file__).resolve().parents[3] / "shared" / "peers" / "trl_bench.py"
PRECISIONS = ("highest", "high", "medium")


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description="the peer under torch's float32 matmul precision")
  parser.add_argument("--precision", choices=PRECISIONS, default="highest")
  args, rest = parser.parse_known_args(argv)  # the rest goes to the peer
  precision = args.precision
  if not PEER.exists():
    raise SystemExit(f"the peer benchmark is not at {PEER}")
  torch.set_float32_matmul_precision(precision)
  os.chdir(tempfile.mkdtemp())  # the peer writes results.jsonl where it runs, as run.sh has it
  out = io.StringIO()
  sys.argv = [str(PEER), *rest]
  status = 0
  try:
    with contextlib.redirect_stdout(out):
      runpy.run_path(str(PEER), run_name="__main__")
  except SystemExit as e:  # the peer ends with sys.exit
    status = e.code
  finally:
    for line in out.getvalue().splitlines():
      if line.startswith("{"):
        line = json.dumps({**json.loads(line), "matmul_precision": precision})
      print(line, flush=True)
  sys.exit(status)


if __name__ == "__main__":
  main(sys.argv[1:])
