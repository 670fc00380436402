"""Sharded training on 8 fake CPU devices equals one device; parameters are sharded as the rules say."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from fake_devices import cpu_env
from probes import run_probe
from rlhf_jax import sharding

HERE = pathlib.Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def sharded_run():
  return run_probe("sharded_train_check.py", 8)


@pytest.mark.parametrize("flavour", ["gpt2", "llama", "llama_bf16"])
def test_mesh_training_matches_single_device(sharded_run, flavour):
  run = sharded_run[flavour]
  assert len(run["losses_8"]) == 3
  # With bf16 operands a float32 sum that lands on the other side of a bf16 rounding boundary (the shards
  # add in another order) moves an operand by up to 2^-9 of itself; after two steps at lr 1e-2 the loss is
  # ~1e-4 off (measured), well under bf16's unit roundoff (2^-8).
  loss_tol, param_tol = (1e-3, 1e-3) if flavour.endswith("bf16") else (1e-5, 1e-4)
  for a, b in zip(run["losses_8"], run["losses_1"]):
    assert abs(a - b) < loss_tol
  assert run["losses_8"][-1] < run["losses_8"][0]
  # Looser than the losses: Adam scales float noise in near-zero gradients (attention key biases, whose
  # exact gradient is 0) up to learning-rate-sized steps, differently for each reduction order.
  assert run["max_param_diff"] < param_tol
  if flavour.endswith("bf16"):  # the bf16 products did run: training moved away from the float32 run
    assert abs(run["losses_1"][-1] - sharded_run["llama"]["losses_1"][-1]) > 1e-3


def test_parameters_sharded_as_rules_say(sharded_run):
  gpt2 = sharded_run["gpt2"]["specs"]
  # embed -> fsdp, mlp -> tensor, vocab -> tensor, heads -> tensor, norms replicated.
  assert gpt2["['policy']['trunk']['blocks'][0]['mlp']['w_in']"] == str(PartitionSpec("fsdp", "tensor"))
  assert gpt2["['policy']['trunk']['blocks'][0]['mlp']['w_out']"] == str(PartitionSpec("tensor", "fsdp"))
  assert gpt2["['policy']['trunk']['blocks'][0]['attn']['wq']"] == str(PartitionSpec("fsdp", "tensor", None))
  assert gpt2["['policy']['trunk']['embed']"] == str(PartitionSpec("tensor", "fsdp"))
  assert gpt2["['policy']['trunk']['final_norm']['scale']"] == str(PartitionSpec(None))
  llama = sharded_run["llama"]["specs"]
  # Scanned layers: a leading replicated 'layers' axis.
  assert llama["['policy']['trunk']['blocks']['attn']['wk']"] == str(PartitionSpec(None, "fsdp", "tensor", None))
  assert llama["['policy']['lm_head']"] == str(PartitionSpec("fsdp", "tensor"))


def test_ppo_update_splits_its_work_over_the_data_axes(sharded_run):
  """Each of 8 devices (data 4 x fsdp 2) computes 1/8 of a PPO update, plus the optimizer and the collectives:
  the minibatches cut from the rows by a random permutation stay split (replicated, each device did ~0.57)."""
  ratio = sharded_run["ppo_update_work"]
  assert 0.1 < ratio < 0.2, ratio


def test_mesh_errors_are_clear():
  with pytest.raises(ValueError, match="needs 3 devices, but 8"):
    sharding.mesh_shape({"data": 3, "fsdp": 1, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="unknown axes"):
    sharding.mesh_shape({"model": 2}, 8)
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)


def test_indivisible_dimension_stays_replicated():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  spec = sharding.logical_to_spec(("vocab", "embed"), (61, 32), mesh, sharding.DEFAULT_RULES)
  assert spec == PartitionSpec(None, None)


def test_pad_batch_appends_zero_rows_and_a_validity_mask():
  batch = {"tokens": np.arange(10, dtype=np.int32).reshape(5, 2) + 1, "mask": np.ones((5, 2), np.int32),
           "active": np.asarray(1, np.int32)}
  padded, valid = sharding.pad_batch(batch, 4)
  assert padded["tokens"].shape == (8, 2) and padded["mask"].shape == (8, 2)
  np.testing.assert_array_equal(padded["tokens"][:5], batch["tokens"])
  assert not padded["tokens"][5:].any() and not padded["mask"][5:].any()  # masks are 0 on padded rows
  assert padded["active"].shape == ()  # scalars are not rows
  np.testing.assert_array_equal(valid, [1, 1, 1, 1, 1, 0, 0, 0])
  same, valid = sharding.pad_batch(batch, 5)
  assert same["tokens"].shape == (5, 2) and valid.all()
  with pytest.raises(ValueError, match="differ in rows"):
    sharding.pad_batch({"a": np.zeros(3), "b": np.zeros(4)}, 2)


def test_take_rows_keeps_real_rows_in_order():
  x = jnp.arange(8) * 10
  valid = jnp.asarray([1, 0, 1, 1, 0, 1, 0, 0])
  np.testing.assert_array_equal(sharding.take_rows({"x": x}, valid, 4)["x"], [0, 20, 30, 50])


# Run with 8 fake devices in a subprocess (the device count is fixed when JAX starts).
MESH_SCRIPT = r"""
import json, jax, numpy as np
from flax import nnx
from rlhf_jax import sharding
from rlhf_jax.models import Decoder, DecoderConfig
out = {}
for shape in ((2, 2, 2), (8, 1, 1), (1, 2, 4), (1, 1, 8)):
  mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))
  rules = sharding.DEFAULT_RULES
  put = sharding.put_batch({"tokens": np.ones((13, 5), np.int32), "n": np.asarray(3)}, mesh, rules, with_valid=True)
  cfg = DecoderConfig(vocab_size=64, num_layers=1, d_model=32, num_heads=4, d_ff=64, max_len=16)
  abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))[1]
  out["x".join(map(str, shape))] = {
      "rows": put["tokens"].shape[0], "valid": int(put["valid"].sum()), "spec": str(put["tokens"].sharding.spec),
      "dp": sharding.data_parallel_size(mesh, rules),
      "fixed_rows_spec": str(sharding.rows_sharding(mesh, rules, (13, 5)).spec),
      "replicated": sharding.replicated_params(abstract, mesh, rules)}
print(json.dumps(out))
"""


def test_any_row_count_fits_any_mesh_and_unsplittable_params_are_named():
  env = cpu_env(8)
  proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                        cwd=HERE.parent)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  for name, dp in (("2x2x2", 4), ("8x1x1", 8), ("1x2x4", 2), ("1x1x8", 1)):
    got = out[name]
    assert got["dp"] == dp and got["valid"] == 13 and got["rows"] == -(-13 // dp) * dp, (name, got)
    # A device-made batch of 13 rows cannot be split: replicated (except on a mesh without data axes).
    assert got["fixed_rows_spec"] == str(PartitionSpec()) or dp == 1
  # 4 heads cannot split over tensor=8 (64 mlp columns and vocab can); tensor=4 splits everything.
  assert out["1x2x4"]["replicated"] == {}
  replicated = out["1x1x8"]["replicated"]
  assert any("wq" in path for path in replicated) and all("on tensor" in why for why in replicated.values())
  assert any("heads=4" in why for why in replicated.values())
