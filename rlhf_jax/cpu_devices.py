"""How many devices JAX's CPU backend shows: by default one per usable core (at most ``AUTO_MAX``).

On one CPU device XLA runs each operation on the cores its own thread pool finds work for, and the small
products of sampling (a decode step's [32, 256] x [256, 1024] matmuls, its batched attention reads) mostly
run on one core. With one device per core the mesh's ``data`` axis splits every batch over the cores, each
core computes its rows, and the same programs run side by side. Measured on 2 cores (bench-small): sampling
1.43x, forward passes 1.2x, training steps even (their large products used both cores already); 4 devices on
2 cores lose on all of them, so the count follows the cores. Results match one device up to float rounding
(batch reductions add in another order).

The count is fixed when the backend starts: ``configure`` must run before the first JAX operation; after it,
it leaves the process as it is. A count the caller chose already wins: ``JAX_NUM_CPU_DEVICES`` or
``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``, then ``RLHF_JAX_CPU_DEVICES``, then the config.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

import jax

ENV = "RLHF_JAX_CPU_DEVICES"
AUTO_MAX = 8  # measured at 2 cores; past 8 the rows per device get few and the padding to fit the mesh grows


def usable_cores() -> int:
  """Cores this process may run on (its CPU affinity), at least 1."""
  try:
    return max(len(os.sched_getaffinity(0)), 1)
  except AttributeError:  # not Linux
    return max(os.cpu_count() or 1, 1)


def requested_count(setting: int, environ: Mapping[str, str], cores: int) -> int | None:
  """The CPU device count to ask JAX for, or None where the caller's environment fixed it already.

  setting: the config's ``cpu_devices`` (0: one per core, at most ``AUTO_MAX``; n > 0: n).
  ``RLHF_JAX_CPU_DEVICES`` in ``environ`` replaces the setting.
  """
  if "JAX_NUM_CPU_DEVICES" in environ or "xla_force_host_platform_device_count" in environ.get("XLA_FLAGS", ""):
    return None
  source = "config key cpu_devices"
  if environ.get(ENV, "").strip():
    source = f"environment variable {ENV}"
    try:
      setting = int(environ[ENV])
    except ValueError:
      raise ValueError(f"{source} must be an integer (0: one per core), got {environ[ENV]!r}") from None
  if setting < 0:
    raise ValueError(f"{source} must be >= 0 (0: one device per core, at most {AUTO_MAX}), got {setting}")
  return setting if setting > 0 else min(cores, AUTO_MAX)


def configure(setting: int = 0) -> int | None:
  """Asks JAX for ``requested_count`` CPU devices before its backend starts; returns the count asked for,
  or None when the environment fixed it or the backend had started already (then nothing changes)."""
  count = requested_count(setting, os.environ, usable_cores())
  if count is None:
    return None
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # the backend started: an in-process caller (a notebook, a test) keeps its devices
    if setting > 0:
      logging.warning("cpu_devices=%d not applied: JAX started before the run", setting)
    return None
  return count
