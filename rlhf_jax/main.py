"""Command line: ``rlhf-jax --config=configs/NAME.py[:ARG] --workdir=DIR [--config.a.b=value ...]``."""

from __future__ import annotations

import sys

from rlhf_jax.config_io import ConfigError, apply_overrides, load_config
from rlhf_jax.data.formats import DataError
from rlhf_jax.stages.context import StageError

USAGE = "usage: rlhf-jax --config=configs/NAME.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]"


def parse_args(argv: list[str]) -> tuple[str, str, list[tuple[str, str]]]:
  """-> (config spec, workdir, overrides as (dotted key, text))."""
  config = workdir = None
  overrides = []
  for arg in argv:
    key, eq, value = arg.partition("=")
    if not eq:
      raise ConfigError(f"argument {arg!r} is not of the form --name=value\n{USAGE}")
    if key == "--config":
      config = value
    elif key == "--workdir":
      workdir = value
    elif key.startswith("--config."):
      overrides.append((key[len("--config."):], value))
    else:
      raise ConfigError(f"unknown argument {key!r}\n{USAGE}")
  if not config or not workdir:
    raise ConfigError(f"--config and --workdir are required\n{USAGE}")
  return config, workdir, overrides


def main(argv: list[str]) -> int:
  try:
    spec, workdir, overrides = parse_args(argv)
    config = apply_overrides(load_config(spec), overrides)
    from rlhf_jax import pipeline
    pipeline.run(config, workdir)
  except (ConfigError, DataError, StageError, FileNotFoundError) as e:
    print(f"rlhf-jax: error: {e}", file=sys.stderr)
    return 2
  return 0


def run_cli() -> None:
  sys.exit(main(sys.argv[1:]))
