"""Timing helpers: first call (compile + run) apart from the median of timed repetitions."""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any, Callable

import jax


def peak_rss_mb() -> float:
  """Peak resident memory of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
  """Runs ``fn()`` and waits for its arrays -> (seconds, result)."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - start, out


def bench(fn: Callable[[], Any], reps: int, warmup: int = 1) -> dict[str, float]:
  """Times ``fn`` (a thunk that runs the compiled work once).

  Returns ``{"first_s", "median_s", "min_s", "compile_s"}``: the first call includes tracing and
  compilation; ``compile_s`` is the first call minus the median. ``warmup`` further untimed calls follow it.
  """
  first, _ = timed(fn)
  for _ in range(warmup):
    timed(fn)
  times = [timed(fn)[0] for _ in range(reps)]
  med = statistics.median(times)
  return {"first_s": first, "median_s": med, "min_s": min(times), "compile_s": max(first - med, 0.0)}
