"""The environment of a subprocess that runs JAX on ``n`` fake CPU devices."""

from __future__ import annotations

import os
import re

_COUNT = re.compile(r"--xla_force_host_platform_device_count=\S*")


def cpu_env(devices: int, **extra: object) -> dict[str, str]:
  """This process's environment with JAX on the CPU backend split into ``devices`` devices, the rest of
  ``XLA_FLAGS`` kept (conftest's compile settings), then ``extra`` set."""
  flags = _COUNT.sub("", os.environ.get("XLA_FLAGS", "")).split()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]))
  env.update({k: str(v) for k, v in extra.items()})
  return env
