"""TFDS array_record round trips for every kind, without TensorFlow."""

import json
import os
import sys

import pytest
import tensorflow_datasets as tfds

from rlhf_jax.data import formats
from rlhf_jax.data import tfds_datasets

_RECORDS = {
    "pretraining": [{"text": "plain text"}, {"text": "中文\n第二行"}],
    "prompts": [{"prompt": "Write a poem."}, {"prompt": "写一首诗。"}],
    "demonstrations": [{"prompt": "p1", "response": "r1"},
                       {"prompt": "提示", "response": ""}],
    "scored": [{"prompt": "p", "response": "r", "score": 0.1},
               {"prompt": "p", "response": "s", "score": -3e300}],
    "comparisons": [
        {"prompt": "p", "responses": ["a", "b"], "ranking": [1, 0]},
        {"prompt": "q", "responses": ["x", "y", "z", "w", "v", "u", "t", "s",
                                      "r"], "ranking": [8, 0, 7, 1, 6, 2, 5,
                                                        3, 4]},
        {"prompt": "问", "responses": ["甲", "乙", "丙"], "ranking": [2, 0, 1]},
    ],
}


@pytest.mark.parametrize("kind", formats.KINDS)
def test_round_trip_from_records(tmp_path, kind):
  records = _RECORDS[kind]
  path = tfds_datasets.build_dataset(
      {"train": records, "test": records[:1]}, kind, tmp_path, "ds")
  assert path == tfds_datasets.dataset_path(tmp_path, "ds")
  train = tfds_datasets.load_data_source(tmp_path, "ds", "train")
  assert len(train) == len(records)
  assert [train[i] for i in range(len(train))] == records
  assert train[-1] == records[-1]
  assert tfds_datasets.split_sizes(tmp_path, "ds") == {
      "train": len(records), "test": 1}
  # Plain TFDS reads it too.
  plain = tfds.builder_from_directory(path).as_data_source("test")
  assert len(plain) == 1


@pytest.mark.parametrize("kind", formats.KINDS)
def test_round_trip_from_jsonl_files(tmp_path, kind):
  path = tmp_path / "train.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in _RECORDS[kind]),
                  encoding="utf-8")
  tfds_datasets.build_dataset_from_files({"train": path}, kind,
                                         tmp_path / "data", "from_file")
  source = tfds_datasets.load_data_source(tmp_path / "data", "from_file",
                                          "train")
  assert list(source) == _RECORDS[kind]


def test_pairs_order_and_types(tmp_path):
  records = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"}
             for i in range(50)]
  tfds_datasets.build_dataset({"train": records}, "comparisons", tmp_path,
                              "pairs")
  source = tfds_datasets.load_data_source(tmp_path, "pairs", "train")
  for i in (0, 17, 49):
    record = source[i]
    assert record == {"prompt": f"p{i}", "responses": [f"c{i}", f"r{i}"],
                      "ranking": [0, 1]}
    assert type(record["ranking"][0]) is int
  with pytest.raises(IndexError):
    source[50]


def test_invalid_records_and_names(tmp_path):
  with pytest.raises(formats.DataError, match="split 'train', record 1"):
    tfds_datasets.build_dataset(
        {"train": [{"prompt": "a"}, {"prompt": ""}]}, "prompts", tmp_path, "x")
  with pytest.raises(formats.DataError, match="empty"):
    tfds_datasets.build_dataset({"train": []}, "prompts", tmp_path, "x")
  with pytest.raises(ValueError, match="name"):
    tfds_datasets.build_dataset({"train": [{"prompt": "a"}]}, "prompts",
                                tmp_path, "Bad-Name")
  assert os.listdir(tmp_path) == []


def test_overwrite(tmp_path):
  build = tfds_datasets.build_dataset
  build({"train": [{"prompt": "old"}]}, "prompts", tmp_path, "d")
  with pytest.raises(FileExistsError):
    build({"train": [{"prompt": "new"}]}, "prompts", tmp_path, "d")
  build({"train": [{"prompt": "new"}, {"prompt": "n2"}]}, "prompts", tmp_path,
        "d", overwrite=True)
  assert list(tfds_datasets.load_data_source(tmp_path, "d", "train")) == [
      {"prompt": "new"}, {"prompt": "n2"}]
  assert sorted(os.listdir(tmp_path)) == ["d"]


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
  def crashing(self, records):
    yield 0, records[0]
    raise KeyboardInterrupt

  monkeypatch.setattr(tfds_datasets._RecordsBuilder, "_generate_examples",
                      crashing)
  with pytest.raises(KeyboardInterrupt):
    tfds_datasets.build_dataset({"train": [{"prompt": "a"}, {"prompt": "b"}]},
                                "prompts", tmp_path, "broken")
  assert not os.path.exists(tfds_datasets.dataset_path(tmp_path, "broken"))
  assert os.listdir(tmp_path) == []
  with pytest.raises(FileNotFoundError):
    tfds_datasets.load_data_source(tmp_path, "broken", "train")


def test_tensorflow_never_imported(tmp_path):
  tfds_datasets.build_dataset({"train": _RECORDS["comparisons"]},
                              "comparisons", tmp_path, "no_tf")
  assert len(tfds_datasets.load_data_source(tmp_path, "no_tf", "train")) == 3
  assert "tensorflow" not in sys.modules
  with pytest.raises(ImportError):
    import tensorflow  # noqa: F401  pylint: disable=unused-import
