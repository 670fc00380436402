"""Speed benchmarks of rlhf_jax's own code paths; one JSON object per line on stdout.

  python experiments/benchmarks/run.py [--only=generate,sft_step] [--size=bench-small|tiny|gpu-350m] [--reps=5]
                                      [--cpu_devices=0] [--matmul_dtype=bfloat16] [--decode=auto]
                                      [--set=rl_new=448,model.attention_block=0]

Names: matmul_peak, mem_bandwidth, generate, sft_step, reward_step, rl_iter, rl_iter_shared. The ceilings
(matmul_peak, mem_bandwidth) are always measured first: MFU and the generation bound are relative to them.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from rlhf_jax import cpu_devices, host_memory  # noqa: E402

host_memory.reexec_with_hugepages()  # time the library as its command line runs it

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments.benchmarks import sizes, suite  # noqa: E402
from rlhf_jax.decode_layout import timed_choices  # noqa: E402

FLAGS = flags.DEFINE_string("only", "", "comma-separated benchmark names (default: all)")
SIZE = flags.DEFINE_enum("size", "bench-small", list(sizes.SIZES), "benchmark size")
REPS = flags.DEFINE_integer("reps", 5, "timed repetitions per benchmark (the median is reported)")
MATMUL_DTYPE = flags.DEFINE_enum("matmul_dtype", "", ["", "float32", "bfloat16"],
                                 "model.matmul_dtype for every benchmark ('': the size's own); bfloat16 also "
                                 "times matmul_peak as a bf16 x bf16 -> f32 product")
DECODE = flags.DEFINE_enum("decode", "auto", ["auto", "tensor", "as_trained"],
                           "config.sharding.decode for the samplers: where the weights sit while decoding")
OVERRIDES = flags.DEFINE_string("set", "", "comma-separated key=value changes to the size: its fields "
                                "(rl_new=448) or its model's (model.attention_block=0)")
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
  try:
    size = sizes.with_overrides(sizes.with_matmul_dtype(sizes.SIZES[SIZE.value], MATMUL_DTYPE.value), OVERRIDES.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  env = suite.make_env(size, REPS.value)
  env.decode = DECODE.value
  matmul_dtype = jnp.dtype(size.model.matmul_dtype or size.model.dtype).name
  for name in selected(FLAGS.value):
    # The library memoises its jitted steps, so a program an earlier benchmark compiled would read as free here.
    jax.clear_caches()
    timed_before = len(timed_choices())
    record = suite.BENCHMARKS[name](env)
    # What "auto" timed for this benchmark's samplers (a shape timed earlier in the run is not timed again).
    choices = [dataclasses.asdict(c) for c in timed_choices()[timed_before:]]
    print(json.dumps({**record, "size": SIZE.value, "model_matmul_dtype": matmul_dtype, "decode": DECODE.value,
                      **({"decode_timed": choices} if choices else {}),
                      **({"set": OVERRIDES.value} if OVERRIDES.value else {})}), flush=True)


if __name__ == "__main__":
  app.run(main)
