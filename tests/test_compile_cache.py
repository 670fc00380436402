"""The persistent compilation cache a run turns on (``compilation_cache_dir``): where it writes, and that a
caller's choice (``JAX_COMPILATION_CACHE_DIR``, empty = off) wins. Each case runs in a fresh process: JAX
settles its cache at the first compilation."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
import jax, jax.numpy as jnp
from rlhf_jax import compile_cache
used = compile_cache.enable(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # the probe compiles in milliseconds
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
print(json.dumps({"used": used, "config": jax.config.jax_compilation_cache_dir}))
"""


def probe(directory: str, home: pathlib.Path, **env) -> dict:
  environ = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR",
                                                               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
  environ.update(HOME=str(home), JAX_PLATFORMS="cpu", **env)
  out = subprocess.run([sys.executable, "-c", PROBE, directory], capture_output=True, text=True, check=True,
                       env=environ, cwd=ROOT, timeout=300).stdout
  return json.loads(out.strip().splitlines()[-1])


def test_a_run_caches_compiled_programs_in_its_configured_directory(tmp_path):
  got = probe("~/cache", tmp_path)
  assert got["used"] == got["config"] == str(tmp_path / "cache")
  assert any((tmp_path / "cache").iterdir())  # the probe's executable was written


@pytest.mark.parametrize("env_dir", ["elsewhere", ""])
def test_the_callers_jax_compilation_cache_dir_wins(tmp_path, env_dir):
  chosen = str(tmp_path / env_dir) if env_dir else ""
  got = probe(str(tmp_path / "configured"), tmp_path, JAX_COMPILATION_CACHE_DIR=chosen)
  assert got["used"] == (chosen or None) and got["config"] == chosen
  assert not (tmp_path / "configured").exists()
  if chosen:
    assert any(pathlib.Path(chosen).iterdir())


def test_an_empty_directory_leaves_the_cache_off(tmp_path):
  got = probe("", tmp_path)
  assert got["used"] is None and got["config"] in ("", None)
  assert not (tmp_path / ".cache").exists()
