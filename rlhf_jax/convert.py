"""``rlhf-jax convert``: Hugging Face checkpoints in and out.

  rlhf-jax convert --from-hf=HF_DIR --out=DIR            # a GPT-2 / Llama-family checkpoint -> our params
  rlhf-jax convert --to-hf --from=WORKDIR/INSTANCE --out=DIR   # a trained policy or reward model -> HF

``--from-hf`` reads ``config.json`` + safetensors (``rlhf_jax.models.hf``) and writes ``DIR/params`` (an
Orbax checkpoint, as a stage instance writes its final params), ``DIR/model.json`` (our ``config.model``
keys and the model kind) and the checkpoint's tokenizer files. ``--to-hf`` takes a stage instance of a
workdir (its final ``params``; a reward instance becomes a one-label ``*ForSequenceClassification``), or a
directory written by ``--from-hf``, and writes ``config.json``, ``model.safetensors`` (sharded past 5 GB)
and the run's tokenizer files, so that ``transformers``' ``from_pretrained(DIR)`` loads it.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from absl import flags

from rlhf_jax import sharding, state as state_lib
from rlhf_jax.atomic_file import write_atomic
from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.config_io import ConfigError, read_workdir_config
from rlhf_jax.data import hf_tokenizer
from rlhf_jax.models import hf, hf_export
from rlhf_jax.models.decoder import DecoderConfig
from rlhf_jax.stages.context import StageContext, StageError
from rlhf_jax.stages.graph import KINDS, REWARD

USAGE = ("usage: rlhf-jax convert --from-hf=HF_DIR --out=DIR\n"
         "       rlhf-jax convert --to-hf --from=WORKDIR/INSTANCE --out=DIR")
FLAGS = ["from-hf", "to-hf", "from", "out", "dtype", "scan_layers"]
MODEL_JSON = "model.json"


def make_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_string("from-hf", None, "A Hugging Face checkpoint directory (config.json + safetensors) to read.",
                      flag_values=fv)
  flags.DEFINE_bool("to-hf", False, "Write a Hugging Face checkpoint of --from.", flag_values=fv)
  flags.DEFINE_string("from", None, "With --to-hf: a stage instance of a workdir (WORKDIR/INSTANCE, e.g. "
                      "/tmp/run/ppo; or its params/ directory), or a directory written by --from-hf.", flag_values=fv)
  flags.DEFINE_string("out", None, "Output directory.", flag_values=fv)
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Dtype of the written weights (default: "
                    "float32 for --from-hf; the params' dtype for --to-hf).", flag_values=fv)
  flags.DEFINE_bool("scan_layers", False, "With --from-hf: stack the layers for a scan_layers run.", flag_values=fv)
  return fv


def run(fv: flags.FlagValues) -> int:
  """Runs the parsed ``convert`` flags; user errors raise ``ConfigError``/``StageError``."""
  if bool(fv["from-hf"].value) == bool(fv["to-hf"].value):
    raise ConfigError(f"give exactly one of --from-hf=HF_DIR or --to-hf --from=...\n{USAGE}")
  if not fv.out:
    raise ConfigError(f"--out required\n{USAGE}")
  try:
    if fv["from-hf"].value:
      summary = from_hf(fv["from-hf"].value, fv.out, param_dtype=fv.dtype or "float32", scan_layers=fv.scan_layers)
    else:
      if not fv["from"].value:
        raise ConfigError(f"--to-hf needs --from=WORKDIR/INSTANCE\n{USAGE}")
      summary = to_hf(fv["from"].value, fv.out, dtype=fv.dtype)
  except (hf.HFError, ImportError) as e:
    raise StageError(str(e)) from e
  print(json.dumps(summary))
  return 0


def _count(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def from_hf(path: str, out: str, *, param_dtype: str = "float32", scan_layers: bool = False) -> dict:
  """HF checkpoint ``path`` -> ``out/params`` (Orbax), ``out/model.json`` and its tokenizer files."""
  config = hf.read_config(path)
  kind = "scalar" if hf.is_reward_checkpoint(path) else "lm"
  cfg = hf.decoder_config(config, param_dtype=param_dtype, dtype=param_dtype, scan_layers=scan_layers)
  mesh = sharding.make_mesh({"fsdp": -1})
  params = hf.read_params(path, cfg, kind, mesh, sharding.DEFAULT_RULES, config)
  os.makedirs(out, exist_ok=True)
  with Checkpointer(os.path.join(out, "params"), save_every=1, keep=1, async_save=False) as ckpt:
    ckpt.save(0, params, {"source": os.path.abspath(path)}, force=True)
  values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
  values.update(param_dtype=param_dtype, dtype=param_dtype)
  write_atomic(os.path.join(out, MODEL_JSON), json.dumps({"kind": kind, "model": values}, indent=2))
  copied = hf_export.copy_tokenizer(out, tokenizer_dir=path)
  if os.path.isfile(os.path.join(path, "config.json")):
    write_atomic(os.path.join(out, "config.json"), json.dumps(config, indent=2))  # the source's, for the tokenizer
  return {"out": out, "kind": kind, "flavour": cfg.flavour, "params": _count(params), "num_layers": cfg.num_layers,
          "d_model": cfg.d_model, "vocab_size": cfg.vocab_size, "tokenizer_files": copied}


def _restore(directory: str, cfg: DecoderConfig, kind: str) -> dict:
  """Params of a ``kind`` model written at ``directory`` (an Orbax params checkpoint) onto all devices."""
  mesh = sharding.make_mesh({"fsdp": -1})
  _, abstract = hf.abstract_params(cfg, kind)
  shardings = state_lib.param_shardings(abstract, mesh, sharding.DEFAULT_RULES)
  target = state_lib.abstract_like(abstract.to_pure_dict(), shardings)
  with Checkpointer(directory, read_only=True) as ckpt:
    return ckpt.restore(target)[0]


def to_hf(source: str, out: str, *, dtype: str | None = None) -> dict:
  """A stage instance ``WORKDIR/INSTANCE`` (or a ``--from-hf`` output directory) -> a HF checkpoint at ``out``."""
  source = os.path.normpath(source)
  if os.path.basename(source) == "params":
    source = os.path.dirname(source)
  if os.path.isfile(os.path.join(source, MODEL_JSON)):
    with open(os.path.join(source, MODEL_JSON)) as f:
      spec = json.load(f)
    kind = spec["kind"]
    cfg = DecoderConfig.from_mapping(spec["model"])
    params = _restore(os.path.join(source, "params"), cfg, kind)
    tokenizer_dir = source if hf_tokenizer.has_tokenizer(source) else None
    tokenizer = hf_tokenizer.load(source) if tokenizer_dir else None
  else:
    workdir, instance = os.path.dirname(source) or ".", os.path.basename(source)
    config = read_workdir_config(workdir)
    if instance not in config or not hasattr(config[instance], "get") or config[instance].get("kind") not in KINDS:
      raise StageError(f"{source}: '{instance}' is no stage instance of the run in {workdir}")
    if not os.path.isdir(os.path.join(source, "params")):
      raise StageError(f"{source}: no final params (the stage writes {source}/params when it finishes)")
    kind = "scalar" if KINDS[config[instance].kind].produces == REWARD else "lm"
    ctx = StageContext(config=config, workdir=workdir, mesh=sharding.make_mesh({"fsdp": -1}), metrics=None)
    params, _ = ctx.load_params(instance, kind)
    cfg, tokenizer, tokenizer_dir = ctx.model_config, ctx.tokenizer, ctx.hf_source
  files = hf_export.save(out, cfg, params, kind, tokenizer=tokenizer, tokenizer_dir=tokenizer_dir, dtype=dtype)
  config = hf.read_config(out)
  return {"out": out, "architecture": config["architectures"][0], "params": _count(params), "files": files}


def main_help(flags_help) -> str:
  """The ``convert --help`` text (``flags_help(fv, names)`` formats the flags)."""
  return f"{USAGE}\n\n{__doc__.strip().splitlines()[0]}\n\nflags:\n{flags_help(make_flags(), FLAGS)}"
