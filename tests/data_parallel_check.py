"""Run by test_data_parallel.py in a subprocess with 2 fake CPU devices; prints one JSON line.

On a data=2 mesh, each training step (next-token on plain and on packed rows, reward ranking with a shared
prompt, DPO, a PPO update with shared prompts, a separate value model and pretraining rows) is compiled
three times: with its mesh (the model passes are ``data_parallel.rows_call``s), summing leaf by leaf as in
one process and as one flat vector as across processes (``flat_sum``), and without (plain autodiff, XLA's own
gradient all-reduces).
For each it reports the largest parameter difference after one SGD step (and the largest step), and the
floats and tensors each version's compiled program all-reduces.
"""

import json
import os
import re
import sys

assert "xla_force_host_platform_device_count=2" in os.environ.get("XLA_FLAGS", "")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from rlhf_jax import data_parallel, sharding, state as state_lib  # noqa: E402
from rlhf_jax.algorithms import dpo, ppo  # noqa: E402
from rlhf_jax.algorithms.lm import make_lm_step  # noqa: E402
from rlhf_jax.algorithms.reward import make_reward_step  # noqa: E402
from rlhf_jax.data import packing  # noqa: E402
from rlhf_jax.generate import SamplingConfig  # noqa: E402
from rlhf_jax.models import Decoder, DecoderConfig, ScalarModel  # noqa: E402
from probes import shared_prompt_experience  # noqa: E402

RULES = sharding.DEFAULT_RULES
MESH = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 1})
CFG = DecoderConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_len=32)
RNG = np.random.default_rng(0)


def all_reduced(hlo: str) -> dict:
  """Floats and tensors (scalars left out) that the compiled program's all-reduces carry."""
  floats = tensors = 0
  for line in hlo.splitlines():
    match = re.search(r"= (.*) all-reduce(?:-start)?\(", line)
    for dims in re.findall(r"f32\[([0-9,]+)\]", match.group(1) if match else ""):
      floats += int(np.prod([int(d) for d in dims.split(",")]))
      tensors += 1
  return {"floats": floats, "tensors": tensors}


def init(make, seed):
  graphdef, params = sharding.init_sharded(make, jax.random.key(seed), MESH, RULES)
  return graphdef, params.to_pure_dict()


def run_both(make_step, params: dict, batch: dict, frozen=None, extra_passes=()) -> dict:
  """One step of ``make_step(mesh)`` and of ``make_step(None)`` from the same state -> the comparison.

  ``extra_passes``: names of models that a second rows_call runs on other rows (PPO's pretraining rows).
  Plain SGD, so the step is the gradient (Adam would blow float noise in zero gradients up to a full step:
  an attention key bias's gradient is exactly 0 in exact arithmetic)."""
  tx = optax.sgd(0.1)
  shardings = {name: jax.tree.map(lambda x: x.sharding, p) for name, p in params.items()}
  batch_sh = jax.tree.map(lambda x: sharding.rows_sharding(MESH, RULES, x.shape), batch)
  batch = jax.device_put(batch, batch_sh)
  frozen_sh = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)
  out, after = {}, {}
  one_process_flat_sum = data_parallel.flat_sum
  for name, mesh, flat in (("rows_call", MESH, False), ("rows_call_flat", MESH, True), ("plain", None, False)):
    # One process sums leaf by leaf; "flat" compiles the multi-process form (one flat vector) here too.
    data_parallel.flat_sum = (lambda m: True) if flat else one_process_flat_sum
    jax.clear_caches()  # equal step arguments give back one memoised jitted step: trace it again under this form
    state, state_sh = state_lib.create_train_state(jax.tree.map(jnp.copy, params), {k: tx for k in params},
                                                   shardings, MESH, seed=0)
    step = state_lib.compile_step(make_step(tx, mesh), state_sh, batch_sh, frozen_sh, MESH)
    out[name] = all_reduced(step.lower(state, batch, frozen).compile().as_text())
    state, _ = step(state, batch, frozen)
    after[name] = state.params
  data_parallel.flat_sum = one_process_flat_sum
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), after["plain"], params)
  for name in ("rows_call", "rows_call_flat"):
    diffs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), after[name], after["plain"])
    out[f"max_param_diff_{name}"] = max(jax.tree.leaves(diffs))
  out["max_param_step"] = max(jax.tree.leaves(moved))
  out["params"] = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  passes = [params, *(params[m] for m in extra_passes)]
  out["expected_floats"] = sum(int(np.size(x)) for x in jax.tree.leaves(passes))
  out["expected_flat_tensors"] = len(passes)
  # A per-leaf sum of a scalar parameter (the reward head's bias) is not counted with the scalars.
  out["expected_leaf_floats"] = sum(int(np.size(x)) for x in jax.tree.leaves(passes) if np.ndim(x))
  return out


def lm_run():
  graphdef, params = init(lambda r: Decoder(CFG, rngs=r), 0)
  tokens = RNG.integers(4, 64, (8, 16)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[:3, :5] = 0  # left padding
  batch = {"tokens": tokens, "mask": mask, "loss_mask": mask.astype(np.float32)}
  return run_both(lambda tx, mesh: make_lm_step(graphdef, tx, mesh=mesh), {"policy": params}, batch)


def lm_packed_run():
  """The next-token step on packed rows (``data.pack_width``): segments travel with the rows."""
  graphdef, params = init(lambda r: Decoder(CFG, rngs=r), 6)
  tokens = RNG.integers(4, 64, (8, 16)).astype(np.int32)
  mask = (np.arange(16)[None] < np.array([5, 9, 3, 12, 7, 4, 6, 10])[:, None]).astype(np.int32)
  loss_mask = mask.astype(np.float32)
  loss_mask[:, 0] = 0
  packed = packing.pack({"tokens": tokens, "mask": mask, "loss_mask": loss_mask}, 16, 0)
  packed = sharding.pad_batch(packed, 2)[0]  # whole rows per device
  assert len(packed["tokens"]) < 8 and packed["segments"].max() > 1
  return run_both(lambda tx, mesh: make_lm_step(graphdef, tx, mesh=mesh), {"policy": params}, packed)


def comparison_batch(pairs=4, k=2, prompt_len=6, width=14):
  prompt = np.repeat(RNG.integers(4, 64, (pairs, 1, prompt_len)), k, axis=1)
  tokens = np.concatenate([prompt, RNG.integers(4, 64, (pairs, k, width - prompt_len))], -1).astype(np.int32)
  return {"tokens": tokens, "mask": np.ones_like(tokens), "prompt_mask": np.ones((pairs, prompt_len), np.int32),
          "ranks": np.tile(np.arange(k, dtype=np.int32), (pairs, 1)), "response_mask": np.ones((pairs, k), np.int32)}


def reward_run():
  graphdef, params = init(lambda r: ScalarModel(CFG, 0.1, rngs=r), 1)
  return run_both(lambda tx, mesh: make_reward_step(graphdef, tx, "ranking", 0.0, mesh=mesh), {"reward": params},
                  comparison_batch())


def reward_packed_run():
  """The ranking step on packed comparisons (``reward.pack_width``): the examples travel with their rows."""
  graphdef, params = init(lambda r: ScalarModel(CFG, 0.1, rngs=r), 7)
  batch = comparison_batch(pairs=6, k=3)
  batch["mask"][:, :, :2] = 0  # left-padded prompts
  batch["mask"][::2, :, 11:] = 0  # short responses
  packed = sharding.pad_batch(packing.pack_comparisons(batch, 48, 0), 2)[0]  # whole rows per device
  assert len(packed["tokens"]) < 6 and packed["segments"].max() > 1
  return run_both(lambda tx, mesh: make_reward_step(graphdef, tx, "ranking", 0.0, mesh=mesh), {"reward": params},
                  packed)


def dpo_run():
  graphdef, params = init(lambda r: Decoder(CFG, rngs=r), 2)
  reference = jax.tree.map(lambda x: x * 1.01, params)
  batch = comparison_batch()
  del batch["prompt_mask"]
  settings, sampling = dpo.DPOSettings(beta=0.1), SamplingConfig(max_new_tokens=8, temperature=1.0)
  return run_both(lambda tx, mesh: dpo.make_dpo_step(graphdef, tx, settings, 6, sampling, mesh, RULES),
                  {"policy": params}, batch, {"reference": reference})


def ppo_run(k=2, rows=8):
  pg, policy = init(lambda r: Decoder(CFG, rngs=r), 3)
  vg, value = init(lambda r: ScalarModel(CFG, 0.1, rngs=r), 4)
  pcfg = ppo.PPOConfig(sampling=SamplingConfig(max_new_tokens=8, eos_id=3), epochs=2, minibatches=2, ptx_coef=0.5)
  exp = shared_prompt_experience(pg, policy, vg, value, pcfg, MESH, rows, k)
  ptx = RNG.integers(4, 64, (4, 12)).astype(np.int32)
  ptx = {"tokens": ptx, "mask": np.ones_like(ptx), "loss_mask": np.ones(ptx.shape, np.float32)}
  return run_both(lambda tx, mesh: ppo.make_ppo_update(pg, vg, tx, tx, pcfg, "separate", mesh, RULES),
                  {"policy": policy, "value": value}, {"experience": exp, "ptx": ptx}, extra_passes=("policy",))


def fallback_run():
  """Rows that do not split into whole groups per device: the plain call, same values."""
  graphdef, params = init(lambda r: Decoder(CFG, rngs=r), 5)

  def logits(p, rows):
    return nnx.merge(graphdef, p)(*rows)[0]

  split = data_parallel.rows_call(logits, MESH, RULES, row_group=2)
  tokens = RNG.integers(4, 64, (6, 8)).astype(np.int32)  # 3 rows a device: not whole groups of 2
  rows = (tokens, np.ones_like(tokens))
  loss = lambda f: lambda p: f(p, rows).mean()  # noqa: E731
  grads = [jax.jit(jax.grad(loss(f)))(params) for f in (split, logits)]
  return max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), *grads)))


applies = {name: data_parallel.applies(sharding.make_mesh(axes), RULES) for name, axes in (
    ("data2", {"data": 2, "fsdp": 1, "tensor": 1}), ("fsdp2", {"data": 1, "fsdp": 2, "tensor": 1}),
    ("tensor2", {"data": 1, "fsdp": 1, "tensor": 2}))}
applies["one_device"] = data_parallel.applies(
    sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1]), RULES)
json.dump({"lm": lm_run(), "lm_packed": lm_packed_run(), "reward": reward_run(),
           "reward_packed": reward_packed_run(), "dpo": dpo_run(), "ppo": ppo_run(),
           "fallback_grad_diff": fallback_run(), "applies": applies}, sys.stdout)
