"""Metrics sinks of a workdir: `metrics.jsonl`, `tensorboard/STAGE/`, `summary.json`.

`metrics.jsonl` holds one JSON object per line: `{"stage": ..., "step": ...,
"<metric name>": value, ...}`. Values are Python ints/floats/bools; NaN and
infinities are written as `null` so every line is standard JSON (TensorBoard
still receives the raw non-finite value). Only newline-terminated lines count:
a final partial line left by a killed process is ignored by `read_metrics`
and dropped when a writer reopens the file.

The workdir may be on an object store (`gs://...`), where a file cannot be
appended to: there the writer keeps the lines and writes the whole file at
most every `REMOTE_FLUSH_S` seconds, on `flush()` (the train loop calls it
before each checkpoint, so no line of a checkpointed step is lost) and on
`close()`.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from rlhf_jax.atomic_file import is_remote, write_atomic

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"
_RESERVED = ("stage", "step")
# On an object store, metrics.jsonl is rewritten at most this often (and on flush/close).
REMOTE_FLUSH_S = 30.0


def summary_writer_class() -> type:
  """tensorboardX's ``SummaryWriter``, imported on first use and without torch.

  tensorboardX imports torch whenever it is installed, only to accept torch tensors as values: ~2.5 s of a
  run's start-up on 2 cores, where this writer is only ever given Python floats. Unless torch is loaded
  already, its import is refused (``sys.modules["torch"] = None``) while tensorboardX loads, then
  allowed again, so a later ``import torch`` anywhere works as usual.
  """
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    if sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]
  return SummaryWriter


def _scalar(name: str, value: Any) -> int | float | bool:
  """Converts a Python/numpy/jax scalar to a Python number."""
  if hasattr(value, "__array__") and not isinstance(value, np.generic):
    value = np.asarray(value)
    if value.size != 1:
      raise ValueError(f"metric {name!r} is not a scalar (shape {value.shape})")
    value = value.reshape(())[()]
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, (numbers.Real, np.generic)):
    try:  # np.generic covers ml_dtypes scalars such as bfloat16
      return float(value)
    except (TypeError, ValueError):
      pass
  raise TypeError(f"metric {name!r} has non-numeric value {value!r}")


def _json_value(value: int | float | bool) -> int | float | bool | None:
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _complete_lines(path: str) -> tuple[list[str], int]:
  """Newline-terminated lines of `path` and the byte length they span."""
  data = epath.Path(path).read_bytes()
  end = data.rfind(b"\n") + 1
  return data[:end].decode("utf-8").splitlines(), end


def read_metrics(workdir: str | os.PathLike[str], stage: str | None = None) -> list[dict[str, Any]]:
  """Parses `workdir/metrics.jsonl` (optionally one stage's lines).

  A final line without a newline (a process killed mid-write) is ignored;
  any other malformed line raises ValueError.
  """
  path = os.path.join(os.fspath(workdir), METRICS_FILE)
  if not epath.Path(path).exists():
    return []
  lines, _ = _complete_lines(path)
  rows = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{i + 1}: malformed metrics line") from e
    if stage is None or row.get("stage") == stage:
      rows.append(row)
  return rows


class MetricsWriter:
  """Appends metrics to a workdir's JSONL and TensorBoard files.

  With `is_primary=False` (non-zero processes of a multi-host run) every
  method is a no-op and nothing is created on disk.
  """

  def __init__(self, workdir: str | os.PathLike[str], is_primary: bool = True):
    self.workdir = os.fspath(workdir)
    self.is_primary = is_primary
    self._path = os.path.join(self.workdir, METRICS_FILE)
    self._file = None
    self._tb: dict[str, Any] = {}
    # Object store: the complete lines, written whole by _upload (None when local: appended to the file).
    self._remote_lines: list[str] | None = [] if is_remote(self.workdir) else None
    self._uploaded_at = time.monotonic()
    if is_primary:
      epath.Path(self.workdir).mkdir(parents=True, exist_ok=True)
      self._open()

  def _open(self) -> None:
    if self._remote_lines is not None:
      if epath.Path(self._path).exists():
        self._remote_lines = [line + "\n" for line in _complete_lines(self._path)[0]]
      self._file = self._remote_lines
      return
    if os.path.exists(self._path):
      _, end = _complete_lines(self._path)
      if end != os.path.getsize(self._path):
        os.truncate(self._path, end)  # drop a partial line from a killed run
    self._file = open(self._path, "a", encoding="utf-8")

  def _require_open(self) -> Any:
    if self._file is None:
      raise RuntimeError(f"MetricsWriter for {self.workdir} is closed")
    return self._file

  def _tensorboard(self, stage: str, purge_step: int | None = None) -> Any:
    if stage not in self._tb or purge_step is not None:
      if stage in self._tb:
        self._tb.pop(stage).close()
      self._tb[stage] = summary_writer_class()(
          logdir=os.path.join(self.workdir, TENSORBOARD_DIR, stage),
          purge_step=purge_step,
          flush_secs=10,
      )
    return self._tb[stage]

  def write(self, stage: str, step: int, metrics: Mapping[str, Any]) -> None:
    """Appends one line `{stage, step, **metrics}` and logs scalars to TensorBoard."""
    if not self.is_primary:
      return
    if clash := [k for k in metrics if k in _RESERVED]:
      raise ValueError(f"metric names {clash} are reserved")
    step = int(step)
    values = {k: _scalar(k, v) for k, v in metrics.items()}
    row = {"stage": stage, "step": step}
    row.update((k, _json_value(v)) for k, v in values.items())
    line = json.dumps(row, allow_nan=False) + "\n"
    if self._remote_lines is not None:
      self._require_open().append(line)
      if time.monotonic() - self._uploaded_at >= REMOTE_FLUSH_S:
        self._upload()
    else:
      self._require_open().write(line)
      self._file.flush()
    tb = self._tensorboard(stage)
    for k, v in values.items():
      tb.add_scalar(k, float(v), step)

  def truncate_after(self, stage: str, step: int) -> None:
    """Drops `stage` lines with a step greater than `step` (call on resume).

    Other stages' lines are kept in order; the file is rewritten atomically.
    TensorBoard events of `stage` after `step` are purged (hidden) as well.
    """
    if not self.is_primary:
      return
    if self._remote_lines is not None:
      lines = [line[:-1] for line in self._require_open()]
    else:
      self._require_open().close()
      lines, _ = _complete_lines(self._path) if os.path.exists(self._path) else ([], 0)
    kept = []
    for line in lines:
      row = json.loads(line) if line.strip() else None
      if row is not None and not (row.get("stage") == stage and row.get("step", -1) > step):
        kept.append(line + "\n")
    write_atomic(self._path, "".join(kept))
    self._open()
    self._tensorboard(stage, purge_step=int(step) + 1)

  def write_summary(self, stage: str, metrics: Mapping[str, Any]) -> None:
    """Merges `metrics` into `summary.json[stage]` atomically; other stages are kept.

    Keys already present for `stage` and absent from `metrics` are kept.
    """
    if not self.is_primary:
      return
    path = os.path.join(self.workdir, SUMMARY_FILE)
    summary: dict[str, Any] = {}
    if epath.Path(path).exists():
      summary = json.loads(epath.Path(path).read_text(encoding="utf-8"))
    entry = dict(summary.get(stage, {}))
    entry.update((k, _json_value(_scalar(k, v))) for k, v in metrics.items())
    summary[stage] = entry
    write_atomic(path, json.dumps(summary, indent=2, sort_keys=True, allow_nan=False) + "\n")

  def _upload(self) -> None:
    """Object store: writes the whole metrics.jsonl."""
    write_atomic(self._path, "".join(self._remote_lines))
    self._uploaded_at = time.monotonic()

  def flush(self) -> None:
    """Flushes TensorBoard event files, and metrics.jsonl on an object store (locally it is flushed on
    every write)."""
    if self._remote_lines is not None and self._file is not None:
      self._upload()
    for tb in self._tb.values():
      tb.flush()

  def close(self) -> None:
    """Closes all files; further writes are errors."""
    if self._file is not None:
      if self._remote_lines is not None:
        self._upload()
      else:
        self._file.close()
      self._file = None
    for tb in self._tb.values():
      tb.close()
    self._tb.clear()

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()
