"""Atomic file writes: a file appears complete under its name, or not at all."""

from __future__ import annotations

import os
import uuid


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> None:
  """Writes ``data`` to a sibling temp file, fsyncs it and renames it over ``path``.

  A crash leaves any previous file at ``path`` intact and no partial file behind it.
  """
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  payload = data.encode("utf-8") if isinstance(data, str) else data
  try:
    with open(tmp, "xb") as f:
      f.write(payload)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
