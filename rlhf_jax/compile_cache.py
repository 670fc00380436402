"""JAX's persistent compilation cache, on by default: a program compiled once (same HLO, options, backend and
JAX version) is read back in every later process instead of compiled again. A resumed run, the next round of
an iterated experiment, a sweep's trials and an ablation's arms all compile the same steps at the same shapes.
"""

from __future__ import annotations

import os

import jax

# Programs that compile faster than this are not written: reading one back costs a file read, and the
# pipeline's many small jitted helpers would fill the cache for little.
MIN_COMPILE_SECONDS = 0.2
ENV = "JAX_COMPILATION_CACHE_DIR"


def enable(directory: str) -> str | None:
  """Turns the cache on in ``directory`` (``~`` expanded; a ``gs://`` path works, shared by every host)
  unless the caller chose already: ``JAX_COMPILATION_CACHE_DIR`` in the environment (empty: off) or
  ``jax.config``'s directory is kept. "" leaves it off. Call it before the first compilation. Returns the
  directory in use, or None."""
  if ENV in os.environ or jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir or None
  if not directory:
    return None
  if "://" not in directory:
    directory = os.path.expanduser(directory)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  return directory
