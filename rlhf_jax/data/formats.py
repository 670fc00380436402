"""JSONL record formats that users supply (and that stages write back).

One JSON object per line, UTF-8. Kinds and their fields:

* ``pretraining``:    ``{"text": str}``
* ``demonstrations``: ``{"prompt": str, "response": str}``
* ``comparisons``:    ``{"prompt": str, "responses": [str] * K,
  "ranking": [int] * K}`` with 2 <= K <= 9 and ``ranking`` the response
  indices, best first. Pairs may be written ``{"prompt", "chosen",
  "rejected"}``; they are normalised to ``responses=[chosen, rejected],
  ranking=[0, 1]``.
* ``scored``:         ``{"prompt": str, "response": str, "score": float}``
* ``prompts``:        ``{"prompt": str}``

Keys other than these are ignored. Every record that comes out of this module
is normalised: exactly the keys above, Python ``str`` / ``list`` / ``float``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

from etils import epath

from rlhf_jax.atomic_file import write_atomic

KINDS = ("pretraining", "demonstrations", "comparisons", "scored", "prompts")
MIN_RESPONSES = 2
MAX_RESPONSES = 9


class DataError(ValueError):
  """A record (or a file of records) does not match its declared kind."""


def _text(record: Mapping[str, Any], key: str, *, non_empty: bool) -> str:
  if key not in record:
    raise DataError(f"missing field {key!r}")
  value = record[key]
  if not isinstance(value, str):
    raise DataError(
        f"field {key!r} must be a string, got {type(value).__name__}")
  if non_empty and not value:
    raise DataError(f"field {key!r} is empty")
  return value


def _comparison(record: Mapping[str, Any]) -> dict[str, Any]:
  prompt = _text(record, "prompt", non_empty=True)
  if "responses" not in record and "chosen" in record:
    return {
        "prompt": prompt,
        "responses": [
            _text(record, "chosen", non_empty=False),
            _text(record, "rejected", non_empty=False),
        ],
        "ranking": [0, 1],
    }
  for key in ("responses", "ranking"):
    if key not in record:
      raise DataError(f"missing field {key!r}")
    if not isinstance(record[key], list):
      raise DataError(
          f"field {key!r} must be a list, got {type(record[key]).__name__}")
  responses, ranking = record["responses"], record["ranking"]
  k = len(responses)
  if not MIN_RESPONSES <= k <= MAX_RESPONSES:
    raise DataError(f"field 'responses' has {k} entries; need "
                    f"{MIN_RESPONSES} to {MAX_RESPONSES}")
  for i, r in enumerate(responses):
    if not isinstance(r, str):
      raise DataError(f"field 'responses'[{i}] must be a string, "
                      f"got {type(r).__name__}")
  # bool is an int subclass; true/false in a ranking is a user mistake.
  if any(not isinstance(i, int) or isinstance(i, bool) for i in ranking):
    raise DataError("field 'ranking' must hold integers")
  if sorted(ranking) != list(range(k)):
    raise DataError(f"field 'ranking' {ranking} is not a permutation of "
                    f"range({k})")
  return {"prompt": prompt, "responses": list(responses),
          "ranking": list(ranking)}


def _score(record: Mapping[str, Any]) -> float:
  if "score" not in record:
    raise DataError("missing field 'score'")
  value = record["score"]
  if not isinstance(value, (int, float)) or isinstance(value, bool):
    raise DataError(
        f"field 'score' must be a number, got {type(value).__name__}")
  if not math.isfinite(value):
    raise DataError(f"field 'score' is not finite: {value}")
  return float(value)


def normalize_record(record: Any, kind: str) -> dict[str, Any]:
  """Validates one record of `kind`; returns it with exactly the kind's keys.

  Raises:
    DataError: naming the offending key (without a location; callers add it).
    ValueError: if `kind` is unknown.
  """
  if kind not in KINDS:
    raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
  if not isinstance(record, Mapping):
    raise DataError(
        f"record must be a JSON object, got {type(record).__name__}")
  if kind == "pretraining":
    return {"text": _text(record, "text", non_empty=True)}
  if kind == "prompts":
    return {"prompt": _text(record, "prompt", non_empty=True)}
  if kind == "comparisons":
    return _comparison(record)
  out = {"prompt": _text(record, "prompt", non_empty=True),
         "response": _text(record, "response", non_empty=False)}
  if kind == "scored":
    out["score"] = _score(record)
  return out


def normalize_records(records: Iterable[Any], kind: str,
                      source: str = "<records>") -> list[dict[str, Any]]:
  """`normalize_record` over an iterable; errors name `source` and the index."""
  out = []
  for i, record in enumerate(records):
    try:
      out.append(normalize_record(record, kind))
    except DataError as e:
      raise DataError(f"{source}, record {i}: {e}") from None
  return out


def read_records(path: str | os.PathLike[str],
                 kind: str) -> list[dict[str, Any]]:
  """Reads and validates a JSONL file of `kind`; blank lines are skipped.

  Raises:
    DataError: message names the file and the 1-based line number.
  """
  if kind not in KINDS:
    raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
  out = []
  with epath.Path(path).open(encoding="utf-8") as f:  # local or gs://
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f"malformed JSON ({e.msg})") from None
        out.append(normalize_record(record, kind))
      except DataError as e:
        raise DataError(f"{os.fspath(path)}, line {lineno}: {e}") from None
  return out


def write_records(path: str | os.PathLike[str], kind: str,
                  records: Iterable[Mapping[str, Any]]) -> None:
  """Validates `records` of `kind`, then writes them as JSONL atomically.

  The file appears under `path` only once fully written (sibling temp file,
  fsync, `os.replace`); a crash leaves any previous file intact.
  """
  path = os.fspath(path)
  records = normalize_records(records, kind, source=f"records for {path}")
  write_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
