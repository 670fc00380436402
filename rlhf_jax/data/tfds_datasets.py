"""Record datasets stored as TFDS `array_record` and read by random access.

Layout: ``DATA_DIR/NAME/1.0.0/{dataset_info.json, features.json,
NAME-SPLIT.array_record-XXXXX-of-YYYYY}``, readable with plain TFDS
(``tfds.builder_from_directory(...).as_data_source(split)``).

Writing goes through a `tfds.core.GeneratorBasedBuilder` with
``file_format="array_record"``; TFDS serialises examples with its own bundled
protos, so TensorFlow is never imported. The whole dataset is written under a
hidden temporary directory in DATA_DIR and renamed into place last, so an
interrupted build never leaves a directory that looks complete. Building needs
a local (or mounted) filesystem; reading goes through TFDS and `etils.epath`.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data import formats

VERSION = "1.0.0"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def _features(kind: str) -> tfds.features.FeaturesDict:
  text = tfds.features.Text
  if kind == "pretraining":
    spec = {"text": text()}
  elif kind == "prompts":
    spec = {"prompt": text()}
  elif kind == "demonstrations":
    spec = {"prompt": text(), "response": text()}
  elif kind == "scored":
    # tf.Example float lists are float32; raw bytes keep float64 scores exact.
    spec = {"prompt": text(), "response": text(),
            "score": tfds.features.Tensor(
                shape=(), dtype=np.float64,
                encoding=tfds.features.Encoding.BYTES)}
  elif kind == "comparisons":
    spec = {"prompt": text(),
            "responses": tfds.features.Sequence(text()),
            "ranking": tfds.features.Sequence(
                tfds.features.Scalar(dtype=np.int32))}
  else:
    raise ValueError(
        f"unknown record kind {kind!r}; expected one of {formats.KINDS}")
  return tfds.features.FeaturesDict(spec)


class _RecordsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes in-memory, already validated records; one instance per build."""

  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, name: str, kind: str,
               records_by_split: Mapping[str, Sequence[dict[str, Any]]],
               data_dir: str):
    self.name = name
    self._kind = kind
    self._records_by_split = records_by_split
    super().__init__(data_dir=data_dir, file_format="array_record")

  # TFDS looks for a checksums file next to the builder's source; on Python
  # >= 3.9 that lookup imports `importlib_resources`, which TFDS does not
  # declare (tensorflow/datasets#11212). These datasets download nothing.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None

  # TFDS prints "Downloading and preparing dataset Unknown size ..." and
  # "Dataset ... downloaded and prepared ..." to stdout for every build; these
  # in-memory datasets download nothing, so the lines are only noise.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"rlhf_jax '{self._kind}' records.",
        features=_features(self._kind),
        # Keep the caller's order; BatchLoader does the shuffling.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(records)
            for split, records in self._records_by_split.items()}

  def _generate_examples(self, records):
    yield from enumerate(records)


def dataset_path(data_dir: str | os.PathLike[str], name: str) -> str:
  """Directory holding the finished dataset `name` (exists once complete)."""
  return os.path.join(os.fspath(data_dir), name, VERSION)


def build_dataset(
    records_by_split: Mapping[str, Iterable[Mapping[str, Any]]],
    kind: str,
    data_dir: str | os.PathLike[str],
    name: str,
    overwrite: bool = False,
) -> str:
  """Validates records of `kind` and writes them as a TFDS dataset.

  Args:
    records_by_split: split name ("train", "test", ...) -> records with the
      JSONL keys of `kind` (see `formats`); pairs may use chosen/rejected.
    kind: one of `formats.KINDS`.
    data_dir: parent directory of datasets.
    name: dataset name, lower snake case.
    overwrite: replace an existing dataset of that name instead of raising
      `FileExistsError`; the new copy appears in a single rename.

  Returns:
    `dataset_path(data_dir, name)`.

  Raises:
    formats.DataError: a record is invalid or a split is empty.
  """
  if not _NAME_RE.match(name):
    raise ValueError(f"dataset name {name!r} must match {_NAME_RE.pattern}")
  if not records_by_split:
    raise ValueError("records_by_split has no splits")
  data_dir = os.fspath(data_dir)
  final = dataset_path(data_dir, name)
  if os.path.exists(final) and not overwrite:
    raise FileExistsError(f"dataset already exists: {final}")
  normalized = {}
  for split, records in records_by_split.items():
    normalized[split] = formats.normalize_records(
        records, kind, source=f"dataset {name!r} split {split!r}")
    if not normalized[split]:
      raise formats.DataError(f"dataset {name!r} split {split!r} is empty")

  os.makedirs(data_dir, exist_ok=True)
  tmp_root = os.path.join(data_dir, f".tmp-{name}-{uuid.uuid4().hex}")
  try:
    builder = _RecordsBuilder(name=name, kind=kind, records_by_split=normalized,
                              data_dir=tmp_root)
    builder.download_and_prepare(
        download_dir=os.path.join(tmp_root, "downloads"))
    built = os.path.join(tmp_root, name, VERSION)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    if os.path.exists(final):
      # Move the old copy aside first: os.replace cannot replace a non-empty
      # directory, and the new copy must appear in one rename.
      os.replace(final, os.path.join(tmp_root, "old"))
    os.replace(built, final)
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)
  return final


def build_dataset_from_files(
    files_by_split: Mapping[str, str | os.PathLike[str]],
    kind: str,
    data_dir: str | os.PathLike[str],
    name: str,
    overwrite: bool = False,
) -> str:
  """`build_dataset` from JSONL files (split -> path); see `formats`."""
  records = {split: formats.read_records(path, kind)
             for split, path in files_by_split.items()}
  return build_dataset(records, kind, data_dir, name, overwrite=overwrite)


def _to_python(value: Any) -> Any:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, (np.ndarray, np.generic)):
    return _to_python(value.tolist())
  if isinstance(value, (list, tuple)):
    return [_to_python(v) for v in value]
  return value


class RecordSource(Sequence[dict[str, Any]]):
  """Random-access view of one split; items are plain Python records."""

  def __init__(self, source: Any, path: str, split: str):
    self._source = source
    self.path = path
    self.split = split

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
    if not isinstance(index, (int, np.integer)):
      raise TypeError(f"RecordSource indices must be integers, got {index!r}")
    index = int(index)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} records")
    return {k: _to_python(v) for k, v in self._source[index].items()}

  def __repr__(self) -> str:
    return f"RecordSource({self.path!r}, split={self.split!r}, len={len(self)})"


def load_data_source(data_dir: str | os.PathLike[str], name: str,
                     split: str) -> RecordSource:
  """Opens split `split` of dataset `name` for random access (no TF)."""
  path = dataset_path(data_dir, name)
  if not epath.Path(path).is_dir():
    raise FileNotFoundError(f"no dataset at {path}")
  builder = tfds.builder_from_directory(path)
  return RecordSource(builder.as_data_source(split), path, split)


def split_sizes(data_dir: str | os.PathLike[str], name: str) -> dict[str, int]:
  """Number of records in each split of dataset `name`."""
  builder = tfds.builder_from_directory(dataset_path(data_dir, name))
  return {s: info.num_examples for s, info in builder.info.splits.items()}
