"""Run by test_sharding.py in a subprocess with 8 fake CPU devices; prints one JSON line.

Trains the same tiny LM for a few steps on a data=2, fsdp=2, tensor=2 mesh and on one device (both flavours,
and llama with bf16 products; llama's attention in query blocks), and compares
the work (XLA's FLOP count of the compiled per-device program) of one PPO update on a data=4 x fsdp=2 mesh
with one device's.
"""

import json
import os
import sys

assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import optax  # noqa: E402

from rlhf_jax import sharding, state as state_lib  # noqa: E402
from rlhf_jax.algorithms import ppo  # noqa: E402
from rlhf_jax.algorithms.lm import make_lm_step  # noqa: E402
from rlhf_jax.generate import SamplingConfig  # noqa: E402
from rlhf_jax.models import Decoder, DecoderConfig, ScalarModel  # noqa: E402
from probes import shared_prompt_experience  # noqa: E402


def train(mesh, flavour, steps=3, matmul_dtype=""):
  rules = sharding.DEFAULT_RULES
  cfg = DecoderConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_len=32,
                      flavour=flavour, num_kv_heads=2 if flavour == "llama" else 0,
                      scan_layers=flavour == "llama", matmul_dtype=matmul_dtype,
                      attention_block=4 if flavour == "llama" else 0)  # llama: rows of 16 in 4 query blocks
  graphdef, params = sharding.init_sharded(lambda r: Decoder(cfg, rngs=r), jax.random.key(0), mesh, rules)
  abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))[1]
  p_sh = state_lib.param_shardings(abstract, mesh, rules)
  params = params.to_pure_dict()
  tx = state_lib.make_optimizer(dict(lr=1e-2, grad_clip=1.0, weight_decay=0.1), steps)
  st, st_sh = state_lib.create_train_state({"policy": params}, {"policy": tx}, {"policy": p_sh}, mesh, seed=0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, 64, size=(8, 16)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[:2, 12:] = 0
  loss_mask = mask.astype(np.float32)
  loss_mask[:, 0] = 0
  batch = sharding.put_batch({"tokens": tokens, "mask": mask, "loss_mask": loss_mask}, mesh, rules)
  batch_sh = jax.tree.map(lambda x: x.sharding, batch)
  step = state_lib.compile_step(make_lm_step(graphdef, tx), st_sh, batch_sh, None, mesh)
  losses = []
  for _ in range(steps):
    st, metrics = step(st, batch, None)
    losses.append(float(metrics["train/loss"]))
  flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(st.params)}
  specs = {jax.tree_util.keystr(p): str(v.sharding.spec) for p, v in jax.tree_util.tree_leaves_with_path(st.params)}
  return losses, flat, specs


def ppo_update_flops(mesh, samples_per_prompt, minibatches, rows=16):
  """FLOPs of the compiled per-device program of one PPO update (separate value model) on ``mesh``."""
  rules = sharding.DEFAULT_RULES
  cfg = DecoderConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_len=32)
  k = samples_per_prompt
  pg, policy = sharding.init_sharded(lambda r: Decoder(cfg, rngs=r), jax.random.key(0), mesh, rules)
  vg, value = sharding.init_sharded(lambda r: ScalarModel(cfg, 0.1, rngs=r), jax.random.key(1), mesh, rules)
  policy, value = policy.to_pure_dict(), value.to_pure_dict()
  pcfg = ppo.PPOConfig(sampling=SamplingConfig(max_new_tokens=8, eos_id=3), epochs=1, minibatches=minibatches)
  exp = shared_prompt_experience(pg, policy, vg, value, pcfg, mesh, rows, k)
  tx = optax.adam(1e-3)
  st, st_sh = state_lib.create_train_state(
      {"policy": policy, "value": value}, {"policy": tx, "value": tx},
      {"policy": jax.tree.map(lambda x: x.sharding, policy), "value": jax.tree.map(lambda x: x.sharding, value)},
      mesh, seed=0)
  exp_batch = {"experience": exp, "ptx": None}
  batch_sh = jax.tree.map(lambda x: sharding.rows_sharding(mesh, rules, x.shape), exp_batch)
  update = ppo.make_ppo_update(pg, vg, tx, tx, pcfg, "separate", mesh, rules)
  step = state_lib.compile_step(update, st_sh, batch_sh, None, mesh)
  return step.lower(st, jax.device_put(exp_batch, batch_sh), None).compile().cost_analysis()["flops"]


out = {}
# Two samples per prompt (the update's shared-prompt path) in two minibatches.
one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
dp8 = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
out["ppo_update_work"] = ppo_update_flops(dp8, 2, 2) / ppo_update_flops(one, 2, 2)
# llama_bf16: model.matmul_dtype=bfloat16 (weight and attention products on bf16 operands, their transposed
# copies cut along unsharded axes) with heads, ff and vocab split over the tensor axis.
RUNS = (("gpt2", "gpt2", ""), ("llama", "llama", ""), ("llama_bf16", "llama", "bfloat16"))
for name, flavour, matmul_dtype in RUNS:
  big = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  l8, p8, specs = train(big, flavour, matmul_dtype=matmul_dtype)
  l1, p1, _ = train(one, flavour, matmul_dtype=matmul_dtype)
  out[name] = {"losses_8": l8, "losses_1": l1,
               "max_param_diff": max(float(np.abs(p8[k] - p1[k]).max()) for k in p1),
               "specs": specs}
json.dump(out, sys.stdout)
