"""Results computed once per test run and shared by the xdist workers.

A module-scoped fixture is computed in every worker that runs one of its module's tests, and xdist splits a
module's tests across workers (its ``loadgroup`` mode, which would keep them together, does not group under
pytest 9). ``once`` computes a JSON value once for the whole run, under a file lock in the run's shared
directory (``SHARED_ENV``, made by conftest in pytest's main process and removed when it ends); without that
directory (a script run outside pytest) it just computes.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable

import filelock

SHARED_ENV = "RLHF_JAX_TEST_SHARED_DIR"


def once(name: str, compute: Callable[[pathlib.Path], Any]) -> Any:
  """``compute(directory)``'s JSON value, computed by the first caller of this ``name`` in the run and read
  back by the rest. ``directory`` is fresh, kept for the run: a result may name files in it, which callers
  must only read. A computation that raises writes nothing, so the next caller tries again."""
  shared = os.environ.get(SHARED_ENV)
  if not shared:
    directory = pathlib.Path(tempfile.mkdtemp(prefix=f"{name}_"))
    return json.loads(json.dumps(compute(directory)))
  root = pathlib.Path(shared)
  result = root / f"{name}.json"
  with filelock.FileLock(str(root / f"{name}.lock")):
    if not result.exists():
      directory = root / name
      if directory.exists():  # left by a caller whose computation raised
        shutil.rmtree(directory)
      directory.mkdir()
      result.write_text(json.dumps(compute(directory)))
    return json.loads(result.read_text())
