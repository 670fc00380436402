"""Speed benchmarks of rlhf_jax's own code paths; one JSON object per line on stdout.

  python experiments/benchmarks/run.py [--only=generate,sft_step] [--size=bench-small|tiny|gpu-350m] [--reps=5]
                                      [--cpu_devices=0]

Names: matmul_peak, mem_bandwidth, generate, sft_step, reward_step, rl_iter, rl_iter_shared. The ceilings
(matmul_peak, mem_bandwidth) are always measured first: MFU and the generation bound are relative to them.
"""

from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from rlhf_jax import cpu_devices, host_memory  # noqa: E402

host_memory.reexec_with_hugepages()  # time the library as its command line runs it

from absl import app, flags  # noqa: E402

from experiments.benchmarks import sizes, suite  # noqa: E402

FLAGS = flags.DEFINE_string("only", "", "comma-separated benchmark names (default: all)")
SIZE = flags.DEFINE_enum("size", "bench-small", list(sizes.SIZES), "benchmark size")
REPS = flags.DEFINE_integer("reps", 5, "timed repetitions per benchmark (the median is reported)")
CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "JAX CPU devices, as the config key cpu_devices: 0 one "
                                   "per core (the command line's default), n: n")

CEILINGS = ("matmul_peak", "mem_bandwidth")


def selected(only: str) -> list[str]:
  names = [n for n in only.split(",") if n] or list(suite.BENCHMARKS)
  unknown = sorted(set(names) - set(suite.BENCHMARKS))
  if unknown:
    raise app.UsageError(f"unknown benchmarks {unknown}; known: {list(suite.BENCHMARKS)}")
  return [n for n in CEILINGS if n not in names] + names


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  cpu_devices.configure(CPU_DEVICES.value)  # the devices a run of the command line would have
  env = suite.make_env(sizes.SIZES[SIZE.value], REPS.value)
  for name in selected(FLAGS.value):
    record = suite.BENCHMARKS[name](env)
    print(json.dumps({**record, "size": SIZE.value}), flush=True)


if __name__ == "__main__":
  app.run(main)
