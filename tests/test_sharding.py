"""Sharded training on 8 fake CPU devices equals one device; parameters are sharded as the rules say."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec

from rlhf_jax import sharding

HERE = pathlib.Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def sharded_run():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(HERE / "sharded_train_check.py")], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_mesh_training_matches_single_device(sharded_run, flavour):
  run = sharded_run[flavour]
  assert len(run["losses_8"]) == 3
  for a, b in zip(run["losses_8"], run["losses_1"]):
    assert abs(a - b) < 1e-5
  assert run["losses_8"][-1] < run["losses_8"][0]
  assert run["max_param_diff"] < 1e-5


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
