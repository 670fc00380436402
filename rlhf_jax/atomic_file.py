"""Atomic file writes: a file appears complete under its name, or not at all; local paths or gs://.

Paths with a scheme (``gs://bucket/...``, any path ``etils.epath`` opens) are object stores, where an
object written in one request appears whole; ``is_remote`` tells them from local paths.
"""

from __future__ import annotations

import os
import uuid

from etils import epath


def is_remote(path: str | os.PathLike[str]) -> bool:
  """Whether ``path`` names an object store (``gs://...``) rather than a local (or mounted) file."""
  return "://" in os.fspath(path)


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> None:
  """Writes ``data`` to a sibling temp file, fsyncs it and renames it over ``path`` (on an object store:
  one write of the whole object).

  A crash leaves any previous file at ``path`` intact and no partial file behind it.
  """
  path = os.fspath(path)
  payload = data.encode("utf-8") if isinstance(data, str) else data
  if is_remote(path):
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(payload)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  try:
    with open(tmp, "xb") as f:
      f.write(payload)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
