"""Training steps across processes: the gradient summed as one flat psum against XLA's own all-reduces.

  python experiments/benchmarks/gradient_sum.py [--steps=sft_step,reward_step] [--processes=2] [--reps=14]
                                                [--size=bench-small]

Starts ``--processes`` local processes (one CPU device each, joined by ``jax.distributed`` with gloo
collectives over loopback TCP, as a multi-host CPU run is) on a data-parallel mesh over all of them. Each
step is compiled twice from the library's step makers: with its mesh, so the model pass is a
``data_parallel.rows_call`` (one psum of the flat gradient), and without it (plain autodiff: XLA all-reduces
each weight's gradient, twice where the reward model computes a shared prompt once). The two alternate
``--reps`` times; process 0 prints one JSON line per step with both medians (ms) and the median per-pair
ratio plain / rows_call (> 1: the one psum is faster). Batches as ``run.py``'s at ``--size``: sft_step
``sft_batch`` x ``sft_len`` tokens (bench-small: 16 x 128); reward_step ``rm_pairs`` pairs of ``rm_len``
tokens whose first half is a prompt computed once per pair.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from absl import app, flags  # noqa: E402

STEPS = flags.DEFINE_list("steps", ["sft_step", "reward_step"], "steps to time: sft_step, reward_step")
PROCESSES = flags.DEFINE_integer("processes", 2, "local processes, one CPU device each")
REPS = flags.DEFINE_integer("reps", 14, "timed calls of each version (after 2 warm-up calls each)")
SIZE = flags.DEFINE_string("size", "bench-small", "benchmark size (experiments/benchmarks/sizes.py)")
WORKER = flags.DEFINE_integer("worker", -1, "internal: this process's id")
COORDINATOR = flags.DEFINE_string("coordinator", "", "internal: host:port of process 0")


def host_batch(name: str, size) -> dict:
  """The step's batch at ``size`` (a ``sizes.Size``), the same on every process."""
  import numpy as np
  rng = np.random.default_rng(0)
  vocab = size.model.vocab_size
  if name == "sft_step":
    tokens = rng.integers(4, vocab, (size.sft_batch, size.sft_len)).astype(np.int32)
    return {"tokens": tokens, "mask": np.ones_like(tokens), "loss_mask": np.ones(tokens.shape, np.float32)}
  pairs, half = size.rm_pairs, size.rm_len // 2
  prompt = np.repeat(rng.integers(4, vocab, (pairs, 1, half)), 2, axis=1)
  tokens = np.concatenate([prompt, rng.integers(4, vocab, (pairs, 2, size.rm_len - half))], -1).astype(np.int32)
  return {"tokens": tokens, "mask": np.ones_like(tokens), "prompt_mask": np.ones((pairs, half), np.int32),
          "ranks": np.tile(np.arange(2, dtype=np.int32), (pairs, 1)), "response_mask": np.ones((pairs, 2), np.int32)}


def time_step(name: str) -> dict:
  """Both versions of one step on the mesh over every process -> medians and ratio."""
  import jax
  import optax

  from experiments.benchmarks import sizes
  from rlhf_jax import sharding, state as state_lib
  from rlhf_jax.algorithms.lm import make_lm_step
  from rlhf_jax.algorithms.reward import make_reward_step
  from rlhf_jax.models import Decoder, ScalarModel

  size = sizes.SIZES[SIZE.value]
  cfg = size.model
  rules = sharding.DEFAULT_RULES
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  if name == "sft_step":
    model, make = "policy", lambda r: Decoder(cfg, rngs=r)
    make_step = lambda graphdef, tx, m: make_lm_step(graphdef, tx, mesh=m)  # noqa: E731
  else:
    model, make = "reward", lambda r: ScalarModel(cfg, 0.1, rngs=r)
    make_step = lambda graphdef, tx, m: make_reward_step(graphdef, tx, "ranking", 0.0, mesh=m)  # noqa: E731
  graphdef, params = sharding.init_sharded(make, jax.random.key(0), mesh, rules)
  params = params.to_pure_dict()
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  batch = sharding.put_batch(host_batch(name, size), mesh, rules)
  batch_sh = jax.tree.map(lambda x: x.sharding, batch)
  tx = optax.adamw(1e-4)
  versions = {}
  for version, step_mesh in (("rows_call", mesh), ("plain", None)):
    state, state_sh = state_lib.create_train_state({model: jax.tree.map(lambda x: x.copy(), params)}, {model: tx},
                                                   {model: param_sh}, mesh, seed=0)
    versions[version] = [state_lib.compile_step(make_step(graphdef, tx, step_mesh), state_sh, batch_sh, None, mesh),
                         state]
  times = {version: [] for version in versions}
  for i in range(REPS.value + 2):
    for version in ("rows_call", "plain") if i % 2 == 0 else ("plain", "rows_call"):
      step, state = versions[version]
      start = time.perf_counter()
      state, _ = step(state, batch, None)
      jax.block_until_ready(state.params)
      if i >= 2:
        times[version].append(time.perf_counter() - start)
      versions[version][1] = state
  ratios = [p / r for p, r in zip(times["plain"], times["rows_call"])]
  return {"name": name, "processes": jax.process_count(), "devices": jax.device_count(),
          "rows_call_ms": round(1e3 * statistics.median(times["rows_call"]), 1),
          "plain_ms": round(1e3 * statistics.median(times["plain"]), 1),
          "speedup": round(statistics.median(ratios), 3), "reps": REPS.value}


def worker() -> None:
  os.environ["JAX_NUM_CPU_DEVICES"] = "1"
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(COORDINATOR.value, num_processes=PROCESSES.value, process_id=WORKER.value)
  for name in STEPS.value:
    record = time_step(name)
    if WORKER.value == 0:
      print(json.dumps(record), flush=True)
  jax.distributed.shutdown()


def main(argv) -> None:
  del argv
  unknown = set(STEPS.value) - {"sft_step", "reward_step"}
  if unknown:
    raise app.UsageError(f"--steps: unknown {sorted(unknown)}; choose from sft_step, reward_step")
  if WORKER.value >= 0:
    worker()
    return
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  args = [sys.executable, __file__, f"--steps={','.join(STEPS.value)}", f"--processes={PROCESSES.value}",
          f"--reps={REPS.value}", f"--size={SIZE.value}", f"--coordinator=localhost:{port}"]
  procs = [subprocess.Popen(args + [f"--worker={i}"], stdout=None if i == 0 else subprocess.DEVNULL)
           for i in range(PROCESSES.value)]
  codes = [p.wait() for p in procs]
  if any(codes):
    raise SystemExit(f"worker exit codes {codes}")


if __name__ == "__main__":
  app.run(main)
