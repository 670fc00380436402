"""Loading a script of experiments/ as a module in a test, without keeping its absl flags.

Each script defines its flags on absl's global FLAGS; two scripts defining the same name (``workdir``)
in one test process would collide, so the flags a script adds are removed once it is loaded.
"""

import importlib.util
import pathlib
import types

from absl import flags

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def load_script(name: str) -> types.ModuleType:
  """``experiments/NAME.py`` as a module; the flags it defined are taken off ``absl.flags.FLAGS``."""
  before = set(flags.FLAGS)
  spec = importlib.util.spec_from_file_location(f"experiments_{name}", EXPERIMENTS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  finally:
    for flag in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, flag)
  return module
