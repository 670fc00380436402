"""Command line.

  rlhf-jax --config=configs/NAME.py[:ARG] --workdir=DIR [--config.a.b=value ...]
  rlhf-jax sample --workdir=DIR --policy=NAME --prompt=TEXT [--prompt=TEXT ...] [--num_samples=K]
  rlhf-jax convert --from-hf=HF_DIR --out=DIR | --to-hf --from=WORKDIR/INSTANCE --out=DIR

Flags are absl flags and the config is an ``ml_collections.config_flags``
config file, so ``--config.a.b=value``, ``--flagfile=FILE`` and ``--help``
behave as in other JAX programs. ``main(argv)`` takes the arguments without
the program name and returns the exit code; each call builds its own
``FlagValues`` because the config flag defines one flag per override it
sees, and absl refuses to define a flag twice.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import re
import sys
import textwrap
from typing import Callable

import jax
import numpy as np
from absl import flags
from ml_collections import ConfigDict, config_flags

from rlhf_jax import compile_cache, cpu_devices, distributed, pipeline, sharding
from rlhf_jax.config_io import (ConfigError, check_override_key, fix_tuple_overrides, flat_items, load_config,
                                read_workdir_config)
from rlhf_jax.data import batching, bucketing
from rlhf_jax.data.formats import DataError
from rlhf_jax.generate import SamplingConfig, make_sampler
from rlhf_jax.stages.context import StageContext, StageError

PROG = "rlhf-jax"
USAGE = f"usage: {PROG} --config=configs/NAME.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]"
# Failures a user can fix from the command line: one line on stderr and exit code 2, no traceback.
USER_ERRORS = (ConfigError, DataError, StageError, FileNotFoundError)
HELP_ARGS = ("--help", "-help", "-h", "--helpshort", "--helpfull", "-?")
_OVERRIDE_RE = re.compile(r"^--?(?:no)?config\.([^=]+)")


@dataclasses.dataclass(frozen=True)
class Command:
  """A subcommand: ``run(argv) -> exit code`` (argv after the command's name) and its --help line."""

  run: Callable[[list[str]], int]
  summary: str


def main(argv: list[str]) -> int:
  """Runs the command line ``argv`` (without the program name); returns the exit code."""
  try:
    if argv and not argv[0].startswith("-"):
      return _command(argv[0]).run(argv[1:])
    return run_command(argv)
  except USER_ERRORS as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2


def run_cli() -> None:
  """Console-script entry point (``rlhf-jax``)."""
  sys.exit(main(sys.argv[1:]))


def _command(name: str) -> Command:
  if name not in COMMANDS:
    close = difflib.get_close_matches(name, COMMANDS, n=1)
    hint = f"; did you mean {close[0]}?" if close else f"; commands: {', '.join(COMMANDS)}"
    raise ConfigError(f"unknown command {name!r}{hint}")
  return COMMANDS[name]


# --- shared flag handling ------------------------------------------------------


def _wants_help(argv: list[str]) -> bool:
  return any(arg in HELP_ARGS for arg in argv)


def _one_line(error: Exception) -> str:
  """An absl error message (some span lines) as one line."""
  return " ".join(str(error).split()) or type(error).__name__


def _flags_help(fv: flags.FlagValues, names: list[str]) -> str:
  """``--name: help (default)`` lines for ``names``, then --flagfile."""
  lines = []
  for name in names:
    flag = fv[name]
    default = "" if flag.default is None or flag.default == [] else f" (default: {flag.default_as_str})"
    lines.append(f"--{name}: {' '.join(flag.help.split())}{default}")
  lines.append("--flagfile: read more flags from this file, one per line (absl)")
  return "\n".join(textwrap.fill(line, 100, initial_indent="  ", subsequent_indent="      ") for line in lines)


def _parse(fv: flags.FlagValues, argv: list[str], prog: str) -> None:
  """Parses ``argv`` into ``fv``; absl errors and stray positional arguments raise ``ConfigError``."""
  try:
    rest = fv([prog, *argv])
  except flags.Error as e:
    raise ConfigError(f"{_one_line(e)} (see {prog} --help)") from e
  if rest[1:]:
    raise ConfigError(f"unexpected argument(s) {rest[1:]}; flags are --name=value (see {prog} --help)")


def _require(fv: flags.FlagValues, names: list[str], prog: str) -> None:
  missing = [f"--{n}" for n in names if fv[n].value is None or fv[n].value == []]
  if missing:
    raise ConfigError(f"{' and '.join(missing)} required (see {prog} --help)")


# --- the main job: run config.stages in a workdir --------------------------------


class _ConfigFileParser(flags.ArgumentParser):
  """Parses ``--config=path.py[:ARG]`` with our loader: ``get_config(ARG or None)``, our errors, locked."""

  def parse(self, argument: str) -> ConfigDict:
    return load_config(argument)

  def flag_type(self) -> str:
    return "config file"


def _run_flags(argv: list[str]) -> flags.FlagValues:
  """``--config`` (with its ``--config.*`` overrides found in ``argv``) and ``--workdir``."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
      "config", None, "Config file path.py or path.py:ARG (its get_config(ARG) returns a ConfigDict); "
      "--config.a.b=value overrides one key.", flag_values=fv, sys_argv=argv)
  # One loader for the command line and for code that calls load_config: a file whose get_config(arg)
  # has no default still loads without :ARG, and a missing file fails at once instead of at first use.
  fv["config"].parser = _ConfigFileParser()
  flags.DEFINE_string("workdir", None, "Run directory: config.json, metrics, checkpoints, params of every stage. "
                      "Re-running the same command there resumes.", flag_values=fv)
  # One process per host (e.g. GPU nodes): the same as JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  # JAX_PROCESS_ID (rlhf_jax.distributed); not needed on Cloud TPU, under SLURM or Open MPI.
  flags.DEFINE_string("coordinator", None, "Multi-process run: host:port of process 0's coordinator, the same for "
                      "every process (with --num_processes and --process_id).", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Multi-process run: how many processes (one per host).", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "Multi-process run: this process's index, 0 to num_processes - 1.",
                       flag_values=fv)
  return fv


def _config_spec(fv: flags.FlagValues, argv: list[str]) -> str | None:
  """The last ``--config`` value in ``argv`` (flagfiles expanded), before any parsing."""
  args = fv.read_flags_from_files(argv)
  spec = None
  for i, arg in enumerate(args):
    name, eq, value = arg.lstrip("-").partition("=")
    if arg.startswith("-") and name == "config":
      spec = value if eq else (args[i + 1] if i + 1 < len(args) else None)
  return spec


def _override_keys(fv: flags.FlagValues, argv: list[str]) -> list[str]:
  """Dotted keys of every ``--config.KEY`` in ``argv`` (flagfiles expanded)."""
  return [m.group(1) for m in map(_OVERRIDE_RE.match, fv.read_flags_from_files(argv)) if m]


def _check_overrides(fv: flags.FlagValues, argv: list[str]) -> None:
  """After a failed parse: raises our ``ConfigError`` for the first override that names no leaf of the config.

  ml_collections names only the misspelt last part of a key; ours names the
  whole path and the closest full keys.
  """
  spec = _config_spec(fv, argv)
  try:
    config = load_config(spec) if spec else None
  except Exception:  # the error being explained already says why the config does not load
    return
  for key in _override_keys(fv, argv) if config else []:
    check_override_key(config, key)


def parse_run_args(argv: list[str]) -> tuple[ConfigDict, str]:
  """``--config=...[--config.a.b=v ...] --workdir=DIR`` -> (locked config with overrides, workdir)."""
  fv = _run_flags([PROG, *argv])
  try:
    _parse(fv, argv, PROG)
  except (ConfigError, KeyError, AttributeError):  # ml_collections' unknown-key errors are not flag errors
    _check_overrides(fv, argv)
    raise
  _require(fv, ["config", "workdir"], PROG)
  config = fv.config
  for key in fv["config"].override_values:
    check_override_key(config, key)  # a dict literal may not replace a whole group
  fix_tuple_overrides(config, fv["config"].override_values)
  distributed.set_launch_env(fv.coordinator, fv.num_processes, fv.process_id)
  return config, fv.workdir


LAUNCH_FLAGS = ["coordinator", "num_processes", "process_id"]


def _run_help(argv: list[str]) -> str:
  """``--help`` text; with ``--config`` also every key of that config with its value."""
  fv = _run_flags([PROG])
  commands = "\n".join(f"  {name:8s} {c.summary}" for name, c in COMMANDS.items())
  text = (f"{USAGE}\n       {PROG} COMMAND --help\n\n"
          "Runs the stages that config.stages names, in order, in one workdir; finished stages are skipped.\n\n"
          f"flags:\n{_flags_help(fv, ['config', 'workdir', *LAUNCH_FLAGS])}\n\ncommands:\n{commands}\n")
  spec = _config_spec(fv, argv)
  if spec:
    keys = "\n".join(f"  --config.{k}={v}" for k, v in flat_items(load_config(spec)))
    return f"{text}\nkeys of {spec} (set with --config.KEY=VALUE):\n{keys}\n"
  return f"{text}\n{PROG} --config=FILE --help lists the keys of that config.\n"


def run_command(argv: list[str]) -> int:
  """The main job: load the config, then ``pipeline.run(config, workdir)``."""
  if _wants_help(argv):
    print(_run_help(argv))
    return 0
  config, workdir = parse_run_args(argv)
  pipeline.run(config, workdir)
  return 0


# --- sample: responses of a trained policy ---------------------------------------


def _sample_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "Workdir of an rlhf-jax run.", flag_values=fv)
  flags.DEFINE_string("policy", None, "Stage instance to sample, e.g. sft or ppo (its WORKDIR/NAME/params).",
                      flag_values=fv)
  flags.DEFINE_multi_string("prompt", None, "Prompt text.", flag_values=fv)
  flags.DEFINE_integer("num_samples", 1, "Responses per prompt.", lower_bound=1, flag_values=fv)
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 is greedy.", lower_bound=0.0, flag_values=fv)
  flags.DEFINE_integer("max_new_tokens", None, "Longest response in tokens (default: the run's data.response_len).",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0 is off.", lower_bound=0,
                       flag_values=fv)
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1 is off.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
  flags.DEFINE_bool("json", False, "Print one JSON object per prompt (policy, prompt, responses).", flag_values=fv)
  return fv


SAMPLE_FLAGS = ["workdir", "policy", "prompt", "num_samples", "temperature", "max_new_tokens", "top_k", "top_p",
                "seed", "json"]


def instances_with_params(workdir: str) -> list[str]:
  """Stage instances of ``workdir`` that wrote final params (``WORKDIR/NAME/params``)."""
  if not os.path.isdir(workdir):
    return []
  return sorted(e.name for e in os.scandir(workdir) if os.path.isdir(os.path.join(e.path, "params")))


def _load_policy(ctx: StageContext, name: str) -> dict:
  """The language-model params of instance ``name``; a missing or non-LM instance raises ``StageError``."""
  if not os.path.isdir(os.path.join(ctx.workdir, name, "params")):
    found = ", ".join(instances_with_params(ctx.workdir)) or "none"
    raise StageError(f"no params of policy '{name}' in {ctx.workdir}; instances with params: {found}")
  try:
    params, _ = ctx.load_params(name, "lm")
  except ValueError as e:  # Orbax: the stored tree is not a decoder's
    raise StageError(f"'{name}' in {ctx.workdir} holds no language-model params (its checkpoint does not match "
                     "the run's decoder: a reward or value model?)") from e
  return params


def _rows_per_shard(ctx: StageContext) -> int:
  """How many devices a batch's rows are split over, so the row count can be padded to a multiple."""
  axes = sharding.batch_sharding(ctx.mesh, ctx.rules, 1).spec[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(ctx.mesh.shape[a] for a in axes)


def sample_policy(workdir: str, policy: str, prompts: list[str], *, num_samples: int = 1, temperature: float = 1.0,
                  max_new_tokens: int | None = None, top_k: int = 0, top_p: float = 1.0,
                  seed: int = 0) -> list[list[str]]:
  """Samples ``num_samples`` responses to each prompt from ``WORKDIR/POLICY/params`` -> texts per prompt.

  The model and tokenizer come from the run's recorded ``config.json``;
  prompts are cut to its ``data.prompt_len`` like training prompts (oldest
  tokens first), and responses default to ``data.response_len`` tokens.
  """
  config = read_workdir_config(workdir)
  compile_cache.enable(config.get("compilation_cache_dir", ""))  # "": a workdir from before the key
  cpu_devices.configure(config.get("cpu_devices", 0))
  ctx = StageContext(config=config, workdir=workdir, mesh=sharding.make_mesh(config.mesh.to_dict()), metrics=None)
  params = _load_policy(ctx, policy)
  tok = ctx.tokenizer
  if max_new_tokens is None:
    max_new_tokens = config.data.response_len
  try:
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         eos_id=tok.eos_id, pad_id=tok.pad_id)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  rows = [p for p in prompts for _ in range(num_samples)]
  padding = -len(rows) % _rows_per_shard(ctx)
  batch, stats = batching.prompt_batch(tok, rows + rows[:1] * padding, config.data.prompt_len)
  batch = bucketing.trim_prompts(batch, config.data.min_bucket_len)
  if stats.prompts_truncated:
    print(f"{PROG}: note: prompts longer than data.prompt_len={config.data.prompt_len} tokens keep their "
          "newest tokens", file=sys.stderr)
  batch = ctx.put(batch)
  sampler = make_sampler(ctx.graphdef("lm"), cfg, num_samples, ctx.decode_layout)
  sample = sampler(params, batch["tokens"], batch["mask"], jax.random.key(seed))
  tokens, mask = np.asarray(sample.tokens)[:len(rows)], np.asarray(sample.mask)[:len(rows)]
  texts = [tok.decode(int(t) for t in row[m > 0]) for row, m in zip(tokens, mask)]
  return [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]


def _format_text(prompts: list[str], responses: list[list[str]]) -> str:
  blocks = []
  for prompt, texts in zip(prompts, responses):
    blocks.append("\n".join([f"prompt: {prompt}", *(f"  [{i}] {t}" for i, t in enumerate(texts, 1))]))
  return "\n\n".join(blocks)


def sample_command(argv: list[str]) -> int:
  """``rlhf-jax sample``: prints prompts and sampled responses of one policy of a workdir."""
  prog = f"{PROG} sample"
  fv = _sample_flags()
  if _wants_help(argv):
    print(f"usage: {prog} --workdir=DIR --policy=NAME --prompt=TEXT [--prompt=TEXT ...] [--num_samples=K]\n\n"
          f"Samples responses from a trained policy of a workdir.\n\nflags:\n{_flags_help(fv, SAMPLE_FLAGS)}")
    return 0
  _parse(fv, argv, prog)
  _require(fv, ["workdir", "policy", "prompt"], prog)
  # Orbax logs routine notes about read-only restores at WARNING.
  logging.getLogger("absl").setLevel(logging.ERROR)
  responses = sample_policy(fv.workdir, fv.policy, fv.prompt, num_samples=fv.num_samples,
                            temperature=fv.temperature, max_new_tokens=fv.max_new_tokens, top_k=fv.top_k,
                            top_p=fv.top_p, seed=fv.seed)
  if fv.json:
    for prompt, texts in zip(fv.prompt, responses):
      print(json.dumps({"policy": fv.policy, "prompt": prompt, "responses": texts}))
  else:
    print(_format_text(fv.prompt, responses))
  return 0


# --- convert: Hugging Face checkpoints in and out (rlhf_jax/convert.py) ---------------


def convert_command(argv: list[str]) -> int:
  """``rlhf-jax convert``: a Hugging Face checkpoint to our params, or a trained instance to one."""
  from rlhf_jax import convert  # imports the HF reader/writer only for this command

  prog = f"{PROG} convert"
  if _wants_help(argv):
    print(convert.main_help(_flags_help))
    return 0
  fv = convert.make_flags()
  _parse(fv, argv, prog)
  logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's routine notes
  return convert.run(fv)


COMMANDS = {"sample": Command(sample_command, "sample responses of a trained policy of a workdir"),
            "convert": Command(convert_command, "Hugging Face checkpoints in (--from-hf) and out (--to-hf)")}
