"""How the test run compiles: one persistent XLA compilation cache, and XLA flags that compile faster.

Most of the suite's time is compiling the same tiny programs again: every pipeline, kill -9 / resume and
preset test runs the quickstart's stages in fresh processes. The cache directory is made once by the first
process that loads this file (pytest's main process, before xdist starts its workers, which inherit the
environment) and removed when that process ends. A cached executable is the one a fresh compile gives, so
results do not change. ``RLHF_JAX_TEST_XLA_CACHE=off`` runs without it (and without the user cache that runs
turn on by default, ``compilation_cache_dir``); a ``JAX_COMPILATION_CACHE_DIR`` set by the caller is used as it is.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from run_once import SHARED_ENV

_VAR = "RLHF_JAX_TEST_XLA_CACHE"
_OWNED: list[str] = []  # the run-wide directories this process made: it removes them at the end


def _run_directory(var: str, prefix: str) -> None:
  """``os.environ[var]``: a fresh temporary directory unless a parent process set it already."""
  if var not in os.environ:
    os.environ[var] = tempfile.mkdtemp(prefix=prefix)
    _OWNED.append(os.environ[var])


if os.environ.get(_VAR) != "off" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _run_directory(_VAR, "rlhf_jax_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_VAR]
  # Tiny programs compile in well under the default 1 s threshold; cache them all.
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
elif os.environ.get(_VAR) == "off":
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "")  # set and empty: the pipeline's cache stays off

# The directory of results computed once per run and shared by the xdist workers (run_once.py).
_run_directory(SHARED_ENV, "rlhf_jax_test_shared_")


# Tests compile far more than they compute (most of the suite's time is XLA compiling tiny programs), so XLA's
# LLVM backend runs without its optimisation passes (compiling takes ~40% less) and fusions are emitted by the
# elemental IR emitter instead of the MLIR fusion emitters, whose per-fusion pass pipelines cost another ~30%
# on these small programs. The programs compute the same values up to float rounding. Subprocesses inherit
# the flags (``fake_devices.cpu_env`` keeps them when it sets a device count).
# ``RLHF_JAX_TEST_FAST_COMPILE=off`` compiles as runs do.
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")
if os.environ.get("RLHF_JAX_TEST_FAST_COMPILE") != "off" and FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

# Runs (in-process and the command-line subprocesses) use one CPU device, as the tests' expectations were
# set on, unless a test asks otherwise; the default of one device per core (cpu_devices.py) has its own tests.
os.environ.setdefault("RLHF_JAX_CPU_DEVICES", "1")


def pytest_unconfigure(config) -> None:
  for directory in _OWNED:
    shutil.rmtree(directory, ignore_errors=True)
