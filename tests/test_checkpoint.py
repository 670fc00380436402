"""Tests for rlhf_jax.checkpoint (Orbax wrapper)."""

import os
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fake_devices import cpu_env
from rlhf_jax.checkpoint import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@flax.struct.dataclass
class _State:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def _make_state(seed: int = 0) -> _State:
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {
      "embed": jax.random.normal(k1, (16, 8)),
      "block": {"w": jax.random.normal(k2, (8, 8)).astype(jnp.bfloat16),
                "b": jnp.arange(8, dtype=jnp.int32)},
  }
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)  # non-trivial mu/nu/count
  return _State(step=jnp.asarray(7, jnp.int32), params=params, opt_state=opt_state)


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _run_script(code: str, *args: str, devices: int = 1) -> subprocess.CompletedProcess:
  env = cpu_env(devices, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                        env=env, capture_output=True, text=True, timeout=120)


def test_round_trip_values_dtypes_structure_extra(tmp_path):
  state = _make_state()
  extra = {"data_position": np.int64(96), "kl_coef": np.float32(0.5),
           "fingerprint": "abc123", "nested": {"epoch": 2}}
  with Checkpointer(tmp_path / "ckpt", save_every=1, keep=3) as ckpt:
    assert ckpt.save(7, state, extra)
    ckpt.wait()
    assert ckpt.latest_step() == 7
    restored, restored_extra = ckpt.restore(_abstract(state))
  assert isinstance(restored, _State)
  _assert_tree_equal(restored, state)
  assert restored_extra == {"data_position": 96, "kl_coef": 0.5,
                            "fingerprint": "abc123", "nested": {"epoch": 2}}


def test_restore_onto_concrete_target_and_nnx_state(tmp_path):
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  state = nnx.state(model)
  with Checkpointer(tmp_path, keep=1, async_save=False) as ckpt:
    ckpt.save(0, state)
    target = nnx.state(nnx.Linear(4, 3, rngs=nnx.Rngs(1)))  # different values
    restored, extra = ckpt.restore(target)
  assert extra == {}
  _assert_tree_equal(restored, state)


def test_save_every_force_and_duplicate_step(tmp_path):
  state = {"x": jnp.ones(3)}
  with Checkpointer(tmp_path, save_every=5, keep=10) as ckpt:
    assert not ckpt.save(3, state)
    assert ckpt.save(5, state)
    assert ckpt.save(7, state, force=True)
    assert not ckpt.save(7, state, force=True)  # already saved: skipped
    assert ckpt.save(10, state)
    ckpt.wait()
    assert ckpt.all_steps() == [5, 7, 10]


def test_keeps_last_k(tmp_path):
  with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
    for step in range(5):
      ckpt.save(step, {"x": jnp.full(3, step)}, {"step": step})
  with Checkpointer(tmp_path, keep=2, read_only=True) as ckpt:
    assert ckpt.all_steps() == [3, 4]
    state, extra = ckpt.restore({"x": jax.ShapeDtypeStruct((3,), jnp.int32)}, step=3)
  np.testing.assert_array_equal(state["x"], [3, 3, 3])
  assert extra == {"step": 3}


def test_latest_step_ignores_temporary_dir(tmp_path):
  with Checkpointer(tmp_path, keep=5) as ckpt:
    ckpt.save(2, {"x": jnp.ones(3)})
  # What an interrupted save leaves behind: a step directory not yet renamed.
  partial = tmp_path / "4.orbax-checkpoint-tmp-1234"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "junk").write_bytes(b"\0" * 10)
  with Checkpointer(tmp_path, read_only=True) as ckpt:
    assert ckpt.latest_step() == 2
    assert ckpt.all_steps() == [2]
    with pytest.raises(FileNotFoundError, match="step 4"):
      ckpt.restore({"x": jax.ShapeDtypeStruct((3,), jnp.float32)}, step=4)


def test_process_killed_mid_save_leaves_previous_checkpoint(tmp_path):
  # Step 2's final rename (the commit) is held until the process is killed, so
  # the kill lands deterministically after the data and before finalisation.
  code = """
      import os, signal, sys, threading
      import jax.numpy as jnp
      from rlhf_jax.checkpoint import Checkpointer
      committing = threading.Event()
      real_rename = os.rename
      def rename(src, dst, *a, **k):
        if os.path.basename(os.fspath(dst)) == "2":
          committing.set()
          threading.Event().wait()
        return real_rename(src, dst, *a, **k)
      os.rename = rename
      ckpt = Checkpointer(sys.argv[1], keep=3, async_save=True)
      ckpt.save(1, {"w": jnp.zeros((256, 256))}, {"pos": 1})
      ckpt.wait()
      ckpt.save(2, {"w": jnp.ones((256, 256))}, {"pos": 2})
      if not committing.wait(timeout=60):
        sys.exit("step 2 never reached its commit")
      print(sorted(os.listdir(sys.argv[1])), flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
  """
  result = _run_script(code, str(tmp_path))
  assert result.returncode == -9, result.stderr
  # Step 2 was written but never finalised: it must not count as complete.
  assert any(n.startswith("2.orbax-checkpoint-tmp") for n in os.listdir(tmp_path)), result.stdout
  abstract = {"w": jax.ShapeDtypeStruct((256, 256), jnp.float32)}
  with Checkpointer(tmp_path, read_only=True) as ckpt:
    assert ckpt.latest_step() == 1
    state, extra = ckpt.restore(abstract)
  assert extra == {"pos": 1} and float(state["w"].sum()) == 0.0
  # A resumed writer cleans up and can save step 2 again.
  with Checkpointer(tmp_path, keep=3) as ckpt:
    assert ckpt.save(2, {"w": jnp.ones((256, 256))}, {"pos": 2})
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2]
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_restore_onto_different_meshes(tmp_path):
  code = """
      import sys
      import jax, jax.numpy as jnp, numpy as np, optax
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding
      from rlhf_jax.checkpoint import Checkpointer
      assert jax.device_count() == 8
      devices = np.array(jax.devices())
      mesh = Mesh(devices.reshape(2, 2, 2), ("data", "fsdp", "tensor"))
      specs = {"w": P("fsdp", "tensor"), "v": P(None, ("data", "fsdp"))}
      params = {"w": jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8),
                "v": jnp.arange(4 * 16, dtype=jnp.float32).reshape(4, 16).astype(jnp.bfloat16)}
      params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
      opt_state = optax.adamw(1e-3).init(params)
      state = {"params": params, "opt_state": opt_state}
      with Checkpointer(sys.argv[1], keep=1) as ckpt:
        ckpt.save(10, state, {"pos": 3})

      def target(sharding_for):
        def leaf(path, x):
          return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_for(x))
        return jax.tree_util.tree_map_with_path(leaf, state)

      mesh_18 = Mesh(devices.reshape(1, 8), ("data", "fsdp"))
      mesh_42 = Mesh(devices.reshape(4, 2), ("fsdp", "tensor"))
      layouts = {
          "1x8": lambda x: NamedSharding(mesh_18, P("fsdp") if x.ndim and x.shape[0] % 8 == 0 else P()),
          "4x2": lambda x: NamedSharding(mesh_42, P(*("fsdp", "tensor")[:x.ndim]) if x.ndim == 2 and x.shape[0] % 4 == 0 else P()),
          "single": lambda x: SingleDeviceSharding(jax.devices()[5]),
      }
      with Checkpointer(sys.argv[1], read_only=True) as ckpt:
        for name, sharding_for in layouts.items():
          abstract = target(sharding_for)
          restored, extra = ckpt.restore(abstract)
          assert extra == {"pos": 3}
          assert jax.tree.structure(restored) == jax.tree.structure(state)
          for a, r, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(restored), jax.tree.leaves(state)):
            assert r.sharding == a.sharding, (name, r.sharding, a.sharding)
            assert r.dtype == s.dtype
            np.testing.assert_array_equal(np.asarray(r), np.asarray(s))
          print("ok", name, restored["params"]["w"].sharding)
  """
  result = _run_script(code, str(tmp_path), devices=8)
  assert result.returncode == 0, result.stderr[-4000:]
  assert result.stdout.count("ok ") == 3, result.stdout


def test_missing_checkpoint_errors(tmp_path):
  missing = tmp_path / "nope" / "checkpoints"
  abstract = {"x": jax.ShapeDtypeStruct((3,), jnp.float32)}
  ckpt = Checkpointer(missing, read_only=True)
  assert ckpt.latest_step() is None
  with pytest.raises(FileNotFoundError, match=str(missing)):
    ckpt.restore(abstract)
  assert not missing.exists()  # read-only never creates it
  with Checkpointer(tmp_path / "empty") as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match="No complete checkpoint"):
      ckpt.restore(abstract)


def test_closed_and_read_only_refuse_to_save(tmp_path):
  ckpt = Checkpointer(tmp_path)
  ckpt.close()
  with pytest.raises(RuntimeError, match="closed"):
    ckpt.save(0, {"x": jnp.ones(1)}, force=True)
  with pytest.raises(RuntimeError, match="read-only"):
    Checkpointer(tmp_path, read_only=True).save(0, {"x": jnp.ones(1)}, force=True)
