"""In-process A/B timing of the working tree against a git revision, for a loaded machine.

  python experiments/benchmarks/ab.py [--base=HEAD] [--only=sft_step,reward_step] [--pairs=7] [--size=bench-small]
                                     [--matmul_dtype=bfloat16] [--set=gen_new=448]

The base revision's ``rlhf_jax`` and ``experiments/benchmarks`` are exported (``git archive``) to a temporary
directory and imported under other names, so both libraries live in one process. Each benchmark of both
suites is built once; the thunk it would time is captured instead, warmed up, and then the two thunks are
called alternately (A B B A ...) ``pairs`` times. Prints one JSON line per benchmark with both medians and
the median of the per-pair ratios ``base_s / new_s`` (> 1: the working tree is faster), the same for the
process's CPU seconds (the work done, which other processes on a shared machine disturb less than wall
time) and the load average, which a shared machine moves from one pair to the next.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from rlhf_jax import cpu_devices, host_memory  # noqa: E402

host_memory.reexec_with_hugepages()  # both sides under the malloc the command line runs with

from absl import app, flags  # noqa: E402

BASE = flags.DEFINE_string("base", "HEAD", "git revision to compare the working tree with")
ONLY = flags.DEFINE_string("only", "sft_step,reward_step",
                           "comma-separated benchmark names; NEW=BASE compares two benchmarks")
PAIRS = flags.DEFINE_integer("pairs", 7, "timed A/B pairs per benchmark")
SIZE = flags.DEFINE_string("size", "bench-small", "benchmark size")
MATMUL_DTYPE = flags.DEFINE_string("matmul_dtype", "", "model.matmul_dtype on both sides ('': the size's own)")
OVERRIDES = flags.DEFINE_string("set", "", "comma-separated key=value changes to the size on both sides "
                                "(rl_new=448, model.attention_block=0; see run.py)")


def export_base(rev: str, into: pathlib.Path) -> None:
  """``rlhf_jax`` -> ``rlhf_base`` and ``experiments`` -> ``experiments_base`` of ``rev`` under ``into``."""
  tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "rlhf_jax", "experiments/benchmarks"],
                       check=True, capture_output=True).stdout
  subprocess.run(["tar", "-x", "-C", str(into)], input=tar, check=True)
  (into / "rlhf_jax").rename(into / "rlhf_base")
  (into / "experiments").rename(into / "experiments_base")
  (into / "experiments_base" / "__init__.py").touch()
  for path in into.rglob("*.py"):
    text = path.read_text()
    text = re.sub(r"\brlhf_jax\b", "rlhf_base", text)
    text = re.sub(r"\bexperiments\.benchmarks\b", "experiments_base.benchmarks", text)
    path.write_text(text)


def capture(suite, env, name):
  """Runs benchmark ``name`` with ``bench`` replaced by a recorder -> the first thunk it would have timed."""
  thunks = []

  def fake_bench(fn, reps, warmup=1):
    thunks.append(fn)
    return {"first_s": 0.0, "median_s": 1.0, "min_s": 1.0, "compile_s": 0.0}

  real = suite.bench
  suite.bench = fake_bench
  try:
    suite.BENCHMARKS[name](env)
  finally:
    suite.bench = real
  return thunks[0]


def main(argv):
  del argv
  import jax  # noqa: F401  (after flags: the env var XLA_FLAGS is read once)
  cpu_devices.configure(0)  # both sides on the devices a run of the command line has (RLHF_JAX_CPU_DEVICES)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="ab_"))
  try:
    export_base(BASE.value, tmp)
    sys.path.insert(0, str(tmp))
    run_pairs()
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def run_pairs():
  from experiments.benchmarks import sizes as new_sizes, suite as new_suite
  from experiments.benchmarks.timing import timed
  base_suite = importlib.import_module("experiments_base.benchmarks.suite")
  base_sizes = importlib.import_module("experiments_base.benchmarks.sizes")
  for spec in [n for n in ONLY.value.split(",") if n]:
    # "NEW=BASE" times benchmark NEW of the working tree against BASE of the base revision.
    name, _, base_name = spec.partition("=")
    # The working tree's with_matmul_dtype and with_overrides set either side's size (a base revision may not
    # have them); a key the base's size lacks is named.
    base_size = new_sizes.with_overrides(
        new_sizes.with_matmul_dtype(base_sizes.SIZES[SIZE.value], MATMUL_DTYPE.value), OVERRIDES.value)
    base = capture(base_suite, base_suite.make_env(base_size, 1), base_name or name)
    new_size = new_sizes.with_overrides(
        new_sizes.with_matmul_dtype(new_sizes.SIZES[SIZE.value], MATMUL_DTYPE.value), OVERRIDES.value)
    new = capture(new_suite, new_suite.make_env(new_size, 1), name)
    for fn in (base, new, base, new):
      timed(fn)
    times = {"base": [], "new": []}
    cpu = {"base": [], "new": []}
    loads = []
    for i in range(PAIRS.value):
      order = (("base", base), ("new", new)) if i % 2 == 0 else (("new", new), ("base", base))
      for key, fn in order:
        start = time.process_time()
        times[key].append(timed(fn)[0])
        cpu[key].append(time.process_time() - start)
      loads.append(os.getloadavg()[0])
    ratios = [b / n for b, n in zip(times["base"], times["new"])]
    cpu_ratios = [b / n for b, n in zip(cpu["base"], cpu["new"])]
    print(json.dumps({"name": spec, "base": BASE.value, **({"set": OVERRIDES.value} if OVERRIDES.value else {}), "base_s": round(statistics.median(times["base"]), 4),
                      "new_s": round(statistics.median(times["new"]), 4),
                      "speedup": round(statistics.median(ratios), 3),
                      "speedup_min_max": [round(min(ratios), 3), round(max(ratios), 3)],
                      # Under load the fastest call of each is the least disturbed one.
                      "base_min_s": round(min(times["base"]), 4), "new_min_s": round(min(times["new"]), 4),
                      "speedup_of_mins": round(min(times["base"]) / min(times["new"]), 3),
                      # CPU seconds of this process (all threads): the work done, whoever else ran.
                      "base_cpu_s": round(statistics.median(cpu["base"]), 4),
                      "new_cpu_s": round(statistics.median(cpu["new"]), 4),
                      "cpu_speedup": round(statistics.median(cpu_ratios), 3),
                      "pairs": PAIRS.value, "load_avg_1m": [round(min(loads), 2), round(max(loads), 2)]}),
          flush=True)


if __name__ == "__main__":
  app.run(main)
