"""JSONL formats: validation errors name file, line and key; atomic writes."""

import json
import os

import pytest

from rlhf_jax.data import formats


def _write_lines(path, lines):
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


_GOOD = {
    "pretraining": {"text": "some text"},
    "demonstrations": {"prompt": "p", "response": "r"},
    "comparisons": {"prompt": "p", "responses": ["a", "b", "c"],
                    "ranking": [2, 0, 1]},
    "scored": {"prompt": "p", "response": "r", "score": -1.5},
    "prompts": {"prompt": "p"},
}


@pytest.mark.parametrize("kind", formats.KINDS)
def test_round_trip_each_kind(tmp_path, kind):
  records = [_GOOD[kind], dict(_GOOD[kind])]
  path = tmp_path / f"{kind}.jsonl"
  formats.write_records(path, kind, records)
  assert formats.read_records(path, kind) == records


def test_blank_lines_skipped_and_extra_keys_dropped(tmp_path):
  path = _write_lines(tmp_path / "p.jsonl", [
      "", json.dumps({"prompt": "你好", "id": 7}), "   ",
      json.dumps({"prompt": "b"})])
  assert formats.read_records(path, "prompts") == [{"prompt": "你好"},
                                                    {"prompt": "b"}]


def test_pairs_are_normalised(tmp_path):
  path = _write_lines(tmp_path / "c.jsonl", [
      json.dumps({"prompt": "p", "chosen": "good", "rejected": "bad"})])
  assert formats.read_records(path, "comparisons") == [
      {"prompt": "p", "responses": ["good", "bad"], "ranking": [0, 1]}]


_BAD = [
    ("malformed json", "pretraining", '{"text": "x"', "malformed JSON"),
    ("not an object", "pretraining", '["x"]', "JSON object"),
    ("missing field", "demonstrations", '{"prompt": "p"}', "'response'"),
    ("wrong type", "demonstrations", '{"prompt": "p", "response": 3}',
     "'response'"),
    ("empty prompt", "prompts", '{"prompt": ""}', "'prompt'"),
    ("empty text", "pretraining", '{"text": ""}', "'text'"),
    ("ranking not permutation", "comparisons",
     '{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}',
     "'ranking'"),
    ("ranking too short", "comparisons",
     '{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1]}',
     "'ranking'"),
    ("ranking bools", "comparisons",
     '{"prompt": "p", "responses": ["a", "b"], "ranking": [true, false]}',
     "'ranking'"),
    ("k too small", "comparisons",
     '{"prompt": "p", "responses": ["a"], "ranking": [0]}', "'responses'"),
    ("k too large", "comparisons",
     json.dumps({"prompt": "p", "responses": ["r"] * 10,
                 "ranking": list(range(10))}), "'responses'"),
    ("response not str", "comparisons",
     '{"prompt": "p", "responses": ["a", 1], "ranking": [0, 1]}',
     "'responses'"),
    ("pair missing rejected", "comparisons",
     '{"prompt": "p", "chosen": "a"}', "'rejected'"),
    ("nan score", "scored",
     '{"prompt": "p", "response": "r", "score": NaN}', "'score'"),
    ("inf score", "scored",
     '{"prompt": "p", "response": "r", "score": -Infinity}', "'score'"),
    ("string score", "scored",
     '{"prompt": "p", "response": "r", "score": "1.0"}', "'score'"),
]


@pytest.mark.parametrize("name,kind,line,key", _BAD, ids=[b[0] for b in _BAD])
def test_errors_name_file_line_and_key(tmp_path, name, kind, line, key):
  del name
  good = json.dumps(_GOOD[kind])
  path = _write_lines(tmp_path / "data.jsonl", [good, "", line, good])
  with pytest.raises(formats.DataError) as err:
    formats.read_records(path, kind)
  message = str(err.value)
  assert str(path) in message
  assert "line 3" in message
  assert key in message
  assert isinstance(err.value, ValueError)


def test_unknown_kind(tmp_path):
  with pytest.raises(ValueError, match="unknown record kind"):
    formats.read_records(tmp_path / "x.jsonl", "chat")


def test_write_validates_first_and_keeps_old_file(tmp_path):
  path = tmp_path / "p.jsonl"
  formats.write_records(path, "prompts", [{"prompt": "old"}])
  with pytest.raises(formats.DataError, match="record 1"):
    formats.write_records(path, "prompts", [{"prompt": "new"}, {"prompt": ""}])
  assert formats.read_records(path, "prompts") == [{"prompt": "old"}]
  assert os.listdir(tmp_path) == ["p.jsonl"]


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
  path = tmp_path / "p.jsonl"
  formats.write_records(path, "prompts", [{"prompt": "old"}])

  def failing_fsync(fd):
    raise OSError("disk full")

  monkeypatch.setattr(os, "fsync", failing_fsync)
  with pytest.raises(OSError, match="disk full"):
    formats.write_records(path, "prompts", [{"prompt": "new"}] * 100)
  monkeypatch.undo()
  assert formats.read_records(path, "prompts") == [{"prompt": "old"}]
  assert os.listdir(tmp_path) == ["p.jsonl"]


def test_write_normalises_pairs_and_unicode(tmp_path):
  path = tmp_path / "c.jsonl"
  formats.write_records(path, "comparisons",
                        [{"prompt": "问", "chosen": "好", "rejected": "坏"}])
  # Stored as UTF-8 text, not \u escapes.
  assert "问" in path.read_text(encoding="utf-8")
  assert formats.read_records(path, "comparisons") == [
      {"prompt": "问", "responses": ["好", "坏"], "ranking": [0, 1]}]
