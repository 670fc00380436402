"""Runs the stage instances a config lists, in order, in one workdir; resumes; records config and summary.

An instance is finished when ``WORKDIR/NAME/DONE.json`` exists (written last,
atomically); finished instances are skipped on a re-run, an interrupted one
resumes from its own last checkpoint. A workdir made by a different config is
refused, except for keys that shaped no finished work (see
``check_or_write_config``), so results stay traceable to one config.
"""

from __future__ import annotations

import json
import logging
import os
import time

from etils import epath
from ml_collections import ConfigDict

from rlhf_jax import compile_cache, cpu_devices, defaults, distributed, sharding
from rlhf_jax.atomic_file import write_atomic
from rlhf_jax.config_io import ConfigError, config_to_json
from rlhf_jax.metrics import MetricsWriter
from rlhf_jax.stages import context as context_lib
from rlhf_jax.stages import graph

# Keys that may change between runs in one workdir: which stages, where they run (a checkpoint restores
# onto any mesh) and where compiled programs are cached.
FREE_KEYS = ("stages", "mesh", "sharding", "distributed", "compilation_cache_dir", "cpu_devices")


def check_or_write_config(config: ConfigDict, workdir: str) -> None:
  """Writes ``config.json``, or checks an existing one against this config.

  Besides ``FREE_KEYS``, the sections of stage instances that have not started
  yet (no ``WORKDIR/NAME``) may differ, and new instances may be added, so one
  SFT and RM can serve several PPO settings or further rounds; anything that
  shaped finished work must match. A key that an older version did not write
  is no difference while it holds its default (``_diff``).
  """
  path = os.path.join(workdir, "config.json")
  resolved = json.loads(config_to_json(config))
  if epath.Path(path).exists():
    with epath.Path(path).open() as f:
      try:
        previous = json.load(f)
      except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); it was not written by rlhf-jax") from e
    names = set(graph.instances(config)) | {k for k, v in previous.items() if isinstance(v, dict) and "kind" in v}
    free = set(FREE_KEYS) | {n for n in names if not epath.Path(workdir, n).exists()}
    diffs = sorted(d for d in _diff(previous, resolved, _defaults_like(resolved))
                   if d.split(".", 1)[0].split(" ", 1)[0] not in free)
    if diffs:
      raise ConfigError(f"workdir {workdir} was made by a different config (differs at {', '.join(diffs[:8])}); "
                        "use a new --workdir, or the same config to resume")
  write_atomic(path, json.dumps(resolved, indent=2, sort_keys=True))


def _defaults_like(resolved: dict) -> dict:
  """The default value of every key of a resolved config, as JSON: a stage instance's section from its kind's
  defaults, anything else from ``defaults.base_config()``."""
  base = json.loads(config_to_json(defaults.base_config()))
  out = {}
  for key, value in resolved.items():
    if isinstance(value, dict) and "kind" in value:
      try:
        out[key] = json.loads(config_to_json(defaults.stage(value["kind"])))
      except ValueError:  # an unknown kind: parse_stages names it
        pass
    elif key in base:
      out[key] = base[key]
  return out


def _diff(a, b, default, prefix=""):
  """Paths where a recorded config ``a`` and this one ``b`` differ. A key ``a`` lacks (written by an older
  version) is no difference when ``b`` holds its ``default``: the older code behaved as the default."""
  if isinstance(a, dict) and isinstance(b, dict):
    default = default if isinstance(default, dict) else {}
    for k in set(a) | set(b):
      if k not in a and k in default and b.get(k) == default[k]:
        continue
      yield from _diff(a.get(k), b.get(k), default.get(k), f"{prefix}{k}.")
  elif a != b:
    yield f"{prefix[:-1]} ({a!r} -> {b!r})"


def say(line: str) -> None:
  """A progress line on stdout, from process 0 only (every process runs the same stages)."""
  if distributed.is_primary():
    print(line, flush=True)


def run(config: ConfigDict, workdir: str) -> dict:
  """Runs the instances of ``config.stages`` in ``workdir``; returns ``summary.json``'s content."""
  chain = graph.parse_stages(config)
  graph.check_order(chain, workdir)
  # Orbax and TFDS log routine notes (read-only restores, progress bars) at WARNING.
  logging.getLogger("absl").setLevel(logging.ERROR)
  compile_cache.enable(config.compilation_cache_dir)
  cpu_devices.configure(config.get("cpu_devices", 0))
  # Before anything touches a device: join the other processes of a multi-host run (if this is one).
  distributed.initialize(config.distributed)
  primary = distributed.is_primary()
  if primary:
    check_or_write_config(config, workdir)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  say(f"[rlhf-jax] mesh {' '.join(f'{k}={v}' for k, v in mesh.shape.items())} over {mesh.devices.size} "
      f"{mesh.devices.flat[0].platform} device(s)")
  with MetricsWriter(workdir, is_primary=primary) as metrics, distributed.peer_loss_explained():
    ctx = context_lib.StageContext(config=config, workdir=workdir, mesh=mesh, metrics=metrics)
    for instance in chain:
      name = instance.name
      done = os.path.join(workdir, name, "DONE.json")
      if epath.Path(done).exists():
        logging.info("stage %s already finished (%s): skipped", name, done)
        say(f"[rlhf-jax] {name}: already finished, skipped")
        continue
      label = name if name == instance.kind.name else f"{name} ({instance.kind.name})"
      say(f"[rlhf-jax] {label}: running")
      start = time.time()
      final = instance.kind.runner()(ctx, instance) or {}
      final = {**final, "time/stage_seconds": round(time.time() - start, 2)}
      metrics.write_summary(name, final)
      if primary:
        write_atomic(done, json.dumps(final, indent=2, sort_keys=True))
      distributed.sync(f"done-{name}")
      say(f"[rlhf-jax] {name}: done in {time.time() - start:.1f}s "
          + " ".join(f"{k}={v:.4g}" for k, v in final.items() if k.startswith("eval/")))
  distributed.sync("summary")  # process 0 wrote it last
  summary_path = os.path.join(workdir, "summary.json")
  if epath.Path(summary_path).exists():
    return json.loads(epath.Path(summary_path).read_text())
  return {}
