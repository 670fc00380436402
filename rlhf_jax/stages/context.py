"""What every stage needs from the run: mesh, tokenizer, task, datasets, model init and param hand-off.

Stages hand models to each other through ``WORKDIR/STAGE/params/`` (the
final parameters, an Orbax checkpoint restored straight into the reading
stage's shardings), so a later stage never depends on an earlier stage's
optimizer or mesh.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Callable

import jax
import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from rlhf_jax import distributed, rng, sharding, state as state_lib, tasks
from rlhf_jax.atomic_file import is_remote
from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.config_groups import sampling_from_config
from rlhf_jax.decode_layout import DecodeLayout
from rlhf_jax.generate import SamplingConfig
from rlhf_jax.data import formats, hf_tokenizer, tfds_datasets
from rlhf_jax.data.loader import BatchLoader
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.metrics import MetricsWriter
from rlhf_jax.models import Decoder, DecoderConfig, ScalarModel
from rlhf_jax.models import hf as hf_models

# Record kinds a stage can ask for, and the config key of the user file for each.
USER_FILE_KEYS = {"pretraining": "pretraining_file", "demonstrations": "demonstrations_file",
                  "comparisons": "comparisons_file", "scored": "scored_file", "prompts": "prompts_file"}
# Dataset names of a label instance's comparisons: INSTANCE + suffix.
COMPARISONS_SUFFIX = "_comparisons"
# A user file has no split of its own: every HELD_OUT_EVERY-th record is held out as "test".
HELD_OUT_EVERY = 10
# The workdir file where ``sharding.decode: auto`` keeps the layouts it timed (decode_layout.view_pays).
DECODE_LAYOUT_RECORD = "decode_layout.json"


class StageError(RuntimeError):
  """A stage cannot run with what the workdir and config give it."""


@dataclasses.dataclass
class StageContext:
  """Shared plumbing for one run of the pipeline (one per process)."""

  config: ConfigDict
  workdir: str
  mesh: Mesh
  metrics: MetricsWriter
  _reported: set = dataclasses.field(default_factory=set, init=False, repr=False)

  @property
  def rules(self) -> tuple:
    return tuple(tuple(r) for r in self.config.sharding.rules)

  @property
  def decode_layout(self) -> DecodeLayout:
    """Where samplers keep the weights while decoding (``config.sharding.decode``; see ``decode_layout``)."""
    sharding_cfg = self.config.sharding  # a workdir's config.json from before the key has no "decode"
    return DecodeLayout(self.mesh, self.rules, sharding_cfg["decode"] if "decode" in sharding_cfg else "auto",
                        record=os.path.join(self.workdir, DECODE_LAYOUT_RECORD))

  @property
  def is_primary(self) -> bool:
    """Process 0 of a multi-host run (the only one that writes logs, metrics and files other than
    checkpoints); always true on one host."""
    return distributed.is_primary()

  def stage_dir(self, stage: str) -> str:
    return os.path.join(self.workdir, stage)

  # --- task and tokenizer -------------------------------------------------

  @functools.cached_property
  def task(self) -> tasks.Task:
    """The built-in task (simulated labelers and gold score), seeded by ``config.seed``."""
    options = {k: v for k, v in self.config.task.items() if k != "name" and v >= 0}
    try:
      return tasks.get(self.config.task.name, seed=self.config.seed, **options)
    except (TypeError, ValueError) as e:
      raise StageError(f"config.task: {e}") from e

  @property
  def tokenizer_path(self) -> str:
    return self.config.tokenizer.path or os.path.join(self.stage_dir("tokenizer"), "spm.model")

  @functools.cached_property
  def hf_sources(self) -> list[str]:
    """Hugging Face checkpoint directories that stage inputs name as "hf:PATH" (``sft.init_from``,
    ``ppo.policy``, ...), in config order. The first one's tokenizer is the run's, and its config.json
    fixes the model shape (``config.model`` must agree; see ``model_config``)."""
    from rlhf_jax.stages.graph import instances  # graph imports nothing of the pipeline
    paths = []
    for inst in instances(self.config).values():
      for key in inst.kind.inputs:
        paths += [hf_models.hf_path(n) for n in inst.input_names(key) if hf_models.hf_path(n)]
    return list(dict.fromkeys(paths))

  @property
  def hf_source(self) -> str | None:
    """The checkpoint directory the run's tokenizer and model shape come from, or None."""
    return self.hf_sources[0] if self.hf_sources else None

  @functools.cached_property
  def tokenizer(self) -> Tokenizer:
    if self.hf_source:
      if self.config.tokenizer.path:
        raise StageError(f"tokenizer.path={self.config.tokenizer.path!r} conflicts with hf:{self.hf_source}: a run "
                         "from a Hugging Face checkpoint uses that checkpoint's tokenizer; leave tokenizer.path empty")
      try:
        return hf_tokenizer.load(self.hf_source)
      except (ValueError, FileNotFoundError, ImportError) as e:
        raise StageError(f"tokenizer of hf:{self.hf_source}: {e}") from e
    path = self.tokenizer_path
    if not epath.Path(path).is_file():
      raise StageError(f"no tokenizer at {path}: run the 'tokenizer' stage first or set tokenizer.path")
    return Tokenizer.load(path)

  @functools.cached_property
  def local_dir(self) -> str:
    """A fresh local directory of this process, for what must be on local disk when the workdir is on an
    object store (``gs://``): the TFDS datasets."""
    path = tempfile.mkdtemp(prefix="rlhf_jax-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path

  # --- data ---------------------------------------------------------------

  def _records_for(self, kind: str) -> dict[str, list[dict]]:
    user_file = self.config.data[USER_FILE_KEYS[kind]] if kind in USER_FILE_KEYS else ""
    if user_file:
      records = formats.read_records(user_file, kind)
      test = records[HELD_OUT_EVERY - 1::HELD_OUT_EVERY]
      train = [r for i, r in enumerate(records) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
      if not train or not test:
        raise formats.DataError(f"{user_file}: needs at least {HELD_OUT_EVERY} records to hold some out")
      return {"train": train, "test": test}
    if kind == "pretraining":
      return {s: [{"text": t} for t in self.task.pretraining_text(s)] for s in ("train", "test")}
    if kind == "demonstrations":
      return {s: self.task.demonstrations(s) for s in ("train", "test")}
    if kind == "prompts":
      return {s: [{"prompt": p} for p in self.task.prompts(s)] for s in ("train", "test")}
    if kind == "scored":
      raise StageError("direct-score reward training needs data.scored_file (JSONL of prompt, response, score)")
    if kind.endswith(COMPARISONS_SUFFIX):
      source = kind[:-len(COMPARISONS_SUFFIX)]
      path = os.path.join(self.stage_dir(source), "comparisons.jsonl")
      if not epath.Path(path).is_file():
        raise StageError(f"no comparisons from '{source}': run that label stage first (missing {path}) "
                         "or set data.comparisons_file")
      records = formats.read_records(path, "comparisons")
      held = min(self.held_out_comparisons, max(len(records) // 5, 1))
      return {"train": records[held:], "test": records[:held]}
    raise StageError(f"unknown data kind {kind!r}")

  def records(self, kind: str, split: str) -> tfds_datasets.RecordSource:
    """A random-access source of ``kind`` records for ``split``, built once as a TFDS dataset: in
    ``WORKDIR/data`` by process 0, or, when the workdir is on an object store, by every process on its
    own local disk (records are functions of the config and the workdir's files, so the copies agree)."""
    remote = is_remote(self.workdir)
    data_dir = os.path.join(self.local_dir if remote else self.workdir, "data")
    path = tfds_datasets.dataset_path(data_dir, kind)
    if not os.path.isdir(path):
      if self.is_primary or remote:
        tfds.disable_progress_bar()
        record_kind = "comparisons" if kind.endswith(COMPARISONS_SUFFIX) else kind
        tfds_datasets.build_dataset(self._records_for(kind), record_kind, data_dir, kind)
      else:
        # Not a barrier: process 0 may be building it inside code only it runs (the tokenizer stage), or
        # may have built it before this process looked. The dataset appears whole (renamed into place).
        wait_for_path(path, f"dataset '{kind}' (built by process 0)")
    return tfds_datasets.load_data_source(data_dir, kind, split)

  @property
  def held_out_comparisons(self) -> int:
    """Comparisons held out of each label instance's output (the reward kind's ``eval_comparisons``)."""
    sections = [v for v in self.config.values() if isinstance(v, ConfigDict) and v.get("kind") == "reward"]
    return max((s.eval_comparisons for s in sections), default=128)

  def comparisons(self, sources: tuple[str, ...] | list[str], split: str):
    """Comparison records of ``split`` from label instances ``sources`` (or ``data.comparisons_file``)."""
    if self.config.data.comparisons_file:
      return self.records("comparisons", split)
    if not sources:
      raise StageError("no comparisons named: set the reward instance's 'comparisons' to label instance(s)")
    return ConcatSource([self.records(source + COMPARISONS_SUFFIX, split) for source in sources])

  def put(self, batch: dict[str, np.ndarray], with_valid: bool = False) -> dict[str, jax.Array]:
    """Places this host's rows of a batch on the mesh, padded with zero rows to fit the data axes.

    Padded rows have every mask 0 (mask-normalised losses ignore them); per-row means and counts must
    use ``valid`` (``with_valid=True`` adds it; ``real_rows`` drops padded rows on the host). See
    ``sharding.put_batch``.
    """
    return sharding.put_batch(batch, self.mesh, self.rules, with_valid=with_valid)

  @staticmethod
  def host(x: Any) -> Any:
    """The whole value of a device array (or pytree of them) as numpy, on every process: the way to read
    a result on the host (``np.asarray`` fails on an array spread over several hosts). A collective on a
    multi-host run: call it on every process, never in code only process 0 runs."""
    return distributed.to_host(x)

  @staticmethod
  def real_rows(x: Any, valid: Any) -> np.ndarray:
    """The real rows of a padded device array [B_padded, ...] as numpy (``valid`` from ``put``); see
    ``host``."""
    return distributed.to_host(x)[distributed.to_host(valid).astype(bool)]

  @property
  def data_parallel_size(self) -> int:
    """Ways batch rows are split over the mesh (data x fsdp with the default rules)."""
    return sharding.data_parallel_size(self.mesh, self.rules)

  def batch_shardings(self, batch: Any) -> Any:
    """Shardings of a host batch pytree (arrays or shape structs) as ``put`` places it: rows split as the
    ``batch`` rule says (``put`` pads them to fit)."""
    return jax.tree.map(lambda x: sharding.batch_sharding(self.mesh, self.rules, x.ndim), batch)

  def device_batch_shardings(self, batch: Any) -> Any:
    """Shardings of a batch made on the device with a fixed row count (never padded): rows split as the
    ``batch`` rule says where the data axes divide them, else replicated."""
    return jax.tree.map(lambda x: sharding.rows_sharding(self.mesh, self.rules, x.shape), batch)

  def loader(self, source, batch_size: int) -> BatchLoader:
    """Deterministic global batches of ``source`` seeded by the run's seed: the same indices on every
    process (``put`` copies each process's rows to its devices)."""
    return BatchLoader(len(source), batch_size, seed=self.config.seed)

  def key(self, stream: str, instance: str = "") -> jax.Array:
    """The PRNG key of one named use (see ``rlhf_jax.rng.STREAMS``) by one stage instance."""
    return rng.key(self.config.seed, stream, instance)

  def sampling(self, section: ConfigDict) -> SamplingConfig:
    """The sampler of a config section's ``sampling`` group, with this run's EOS and padding ids."""
    return sampling_from_config(section.sampling, self.tokenizer.eos_id, self.tokenizer.pad_id)

  # --- models -------------------------------------------------------------

  @functools.cached_property
  def model_config(self) -> DecoderConfig:
    values = self.config.model.to_dict()
    if self.hf_source:
      return self._hf_model_config(values)
    values["vocab_size"] = self.tokenizer.vocab_size
    return DecoderConfig.from_mapping(values)

  def _hf_model_config(self, values: dict) -> DecoderConfig:
    """The checkpoint's architecture (config.model's shape keys must match it) with the run's dtypes,
    dropout, remat and scan_layers; every "hf:" source of the run must have the same shape."""
    runtime = {k: v for k, v in values.items() if k not in (*hf_models.SHAPE_KEYS, "vocab_size")}
    try:
      configs = {p: hf_models.decoder_config(hf_models.read_config(p), **runtime) for p in self.hf_sources}
      cfg = configs[self.hf_source]
      for path, other in configs.items():
        if other != cfg:
          raise StageError(f"hf:{path} and hf:{self.hf_source} differ in architecture ({other} vs {cfg}); one "
                           "run has one model shape")
      hf_models.check_shape_keys(values, cfg, self.hf_source)
    except hf_models.HFError as e:
      raise StageError(str(e)) from e
    if self.tokenizer.vocab_size > cfg.vocab_size:
      raise StageError(f"the tokenizer of hf:{self.hf_source} has {self.tokenizer.vocab_size} tokens, more than the "
                       f"model's vocab_size {cfg.vocab_size}")
    return cfg

  def model_factory(self, kind: str, head_std: float = 0.0) -> Callable[[nnx.Rngs], nnx.Module]:
    """``make(rngs)`` for a ``"lm"`` decoder or a ``"scalar"`` (reward/value) model."""
    return model_factory(self.model_config, kind, head_std)

  def init_model(self, kind: str, key: jax.Array, head_std: float = 0.0) -> tuple[nnx.GraphDef, dict, dict]:
    """Sharded init -> (graphdef, params as a plain dict, matching shardings)."""
    graphdef, params = sharding.init_sharded(self.model_factory(kind, head_std), key, self.mesh, self.rules,
                                             abstract=self.abstract_model(kind))
    return graphdef, params.to_pure_dict(), self.param_shardings(kind)

  def abstract_model(self, kind: str) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, state of ShapeDtypeStructs)`` of a ``kind`` model of this run (no arrays made)."""
    return _abstract_model(self.model_config, kind)

  def param_shardings(self, kind: str) -> dict:
    abstract = self.abstract_model(kind)[1]
    self._report_replicated(kind, abstract)
    return state_lib.param_shardings(abstract, self.mesh, self.rules)

  def _report_replicated(self, kind: str, abstract: nnx.State) -> None:
    """Once per run and model kind: logs the parameters whose dimensions the mesh cannot split (e.g. 4
    heads on tensor=8, which then stay replicated there) and records their count as the metrics row
    ``stage="mesh"`` / ``summary.json["mesh"]``: ``mesh/replicated_params`` (and ``..._scalar`` for the
    reward/value model), with the mesh shape, so a "tensor=8" run that really was replicated shows."""
    if kind in self._reported:
      return
    self._reported.add(kind)
    found = sharding.replicated_params(abstract, self.mesh, self.rules)
    if found and self.is_primary:
      logging.warning("mesh %s cannot split %d %s parameter(s), replicated along those axes: %s",
                      dict(self.mesh.shape), len(found), kind,
                      "; ".join(f"{path} ({why})" for path, why in found.items()))
    suffix = "" if kind == "lm" else f"_{kind}"
    row = {f"mesh/replicated_params{suffix}": float(len(found)),
           **{f"mesh/{axis}": float(size) for axis, size in self.mesh.shape.items()},
           "mesh/data_parallel": float(self.data_parallel_size)}
    if self.metrics is not None:  # None for commands outside a run (``rlhf-jax sample``)
      self.metrics.write("mesh", 0, row)
      self.metrics.write_summary("mesh", row)

  def graphdef(self, kind: str) -> nnx.GraphDef:
    return self.abstract_model(kind)[0]

  # --- hand-off between stages ---------------------------------------------

  def save_params(self, stage: str, params: dict, extra: dict | None = None) -> None:
    """Writes a stage's final params (and JSON ``extra``) to ``STAGE/params``."""
    with Checkpointer(os.path.join(self.stage_dir(stage), "params"), save_every=1, keep=1,
                      async_save=False) as ckpt:
      ckpt.save(0, params, extra or {}, force=True)

  def load_params(self, stage: str, kind: str) -> tuple[dict, dict]:
    """Restores ``STAGE/params`` onto this run's mesh -> (params, extra).

    ``stage`` "hf:PATH" reads a Hugging Face checkpoint instead (a causal LM for ``kind`` "lm", a one-label
    sequence-classification model for "scalar"), straight into this run's shardings; extra is empty."""
    source = hf_models.hf_path(stage)
    if source:
      try:
        return hf_models.read_params(source, self.model_config, kind, self.mesh, self.rules), {}
      except (hf_models.HFError, ImportError) as e:
        raise StageError(f"{stage}: {e}") from e
    directory = os.path.join(self.stage_dir(stage), "params")
    if not epath.Path(directory).is_dir():
      raise StageError(f"missing params of stage instance '{stage}' ({directory}): run that stage first")
    shardings = self.param_shardings(kind)
    abstract = self.abstract_model(kind)[1].to_pure_dict()
    target = state_lib.abstract_like(abstract, shardings)
    with Checkpointer(directory, read_only=True) as ckpt:
      return ckpt.restore(target)


@functools.lru_cache(maxsize=16)
def _abstract_model(cfg: DecoderConfig, kind: str) -> tuple[nnx.GraphDef, nnx.State]:
  """Traces a model's construction once per process and shape: each trace draws every parameter's key from
  ``nnx.Rngs`` (~0.2 s for the tiny decoder), and a run asks for the same shapes in every stage. Callers
  only read the state (shapes, dtypes, logical axes) or copy it (``to_pure_dict``, ``tree.map``)."""
  make = model_factory(cfg, kind)
  return nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))


@functools.lru_cache(maxsize=16)
def model_factory(cfg: DecoderConfig, kind: str, head_std: float = 0.0) -> Callable[[nnx.Rngs], nnx.Module]:
  """``make(rngs)`` for a ``"lm"`` decoder or a ``"scalar"`` (reward/value) model of shape ``cfg`` (the same
  function for equal arguments, so a sharded init of it compiles once per process)."""
  if kind == "lm":
    return lambda rngs: Decoder(cfg, rngs=rngs)
  if kind == "scalar":
    return lambda rngs: ScalarModel(cfg, head_std, rngs=rngs)
  raise ValueError(kind)


class ConcatSource:
  """Random access over several record sources, one after the other."""

  def __init__(self, sources):
    self.sources = list(sources)
    self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < len(self):
      raise IndexError(index)
    which = int(np.searchsorted(self.offsets, index, side="right")) - 1
    return self.sources[which][index - int(self.offsets[which])]


def sync(name: str) -> None:
  """Barrier across hosts (no-op on one host)."""
  distributed.sync(name)


# How long a process waits for a file that process 0 writes (a dataset it builds), in seconds.
WAIT_FOR_PRIMARY_S = 1800


def wait_for_path(path: str, what: str, timeout: float = WAIT_FOR_PRIMARY_S) -> None:
  """Polls until ``path`` exists; raises ``StageError`` after ``timeout`` seconds. (If process 0 died
  meanwhile, JAX's coordination service stops this process sooner.)"""
  deadline = time.monotonic() + timeout
  delay = 0.05
  while not os.path.exists(path):
    if time.monotonic() > deadline:
      raise StageError(f"waited {timeout:.0f}s for {what} at {path}")
    time.sleep(delay)
    delay = min(delay * 2, 2.0)
