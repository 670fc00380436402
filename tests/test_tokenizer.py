"""Tokenizer: exact round trips, determinism, fixed special ids."""

import os

import pytest

from rlhf_jax.data import tokenizer as tokenizer_lib

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world!  Two spaces, a tab\tand a newline\nhere.",
    " leading and trailing spaces ",
    "中文测试：你好，世界。今天天气很好。",
    "Numbers 12345 and punctuation ...!?",
] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "spm.model"
  return tokenizer_lib.train_tokenizer(_CORPUS, str(path), vocab_size=400,
                                       hard_vocab_limit=False)


def test_special_ids(tok):
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert 260 < tok.vocab_size <= 400  # 4 specials + 256 bytes + pieces


@pytest.mark.parametrize("text", [
    *_CORPUS[:5],
    "",
    "   many    spaces   ",
    "unseen: Ünïcödé 🚀 ∑ 日本語 \r\n",
    "混合 English 和中文 text.",
])
def test_round_trip(tok, text):
  ids = tok.encode(text)
  assert all(isinstance(i, int) for i in ids)
  assert tok.bos_id not in ids and tok.eos_id not in ids
  assert tok.unk_id not in ids  # byte fallback covers unseen characters
  assert tok.decode(ids) == text


def test_decode_drops_specials(tok):
  ids = tok.encode("hello")
  assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.pad_id]) == (
      "hello")


def test_training_is_deterministic_and_atomic(tmp_path, tok):
  again = tokenizer_lib.train_tokenizer(_CORPUS, str(tmp_path / "b.model"),
                                        vocab_size=400, hard_vocab_limit=False)
  with open(tok.path, "rb") as f1, open(again.path, "rb") as f2:
    assert f1.read() == f2.read()
  assert os.listdir(tmp_path) == ["b.model"]  # no temp file left behind


def test_load_and_user_symbols(tmp_path):
  path = str(tmp_path / "u.model")
  trained = tokenizer_lib.train_tokenizer(
      _CORPUS, path, vocab_size=400, hard_vocab_limit=False,
      user_defined_symbols=["<sep>"])
  loaded = tokenizer_lib.Tokenizer.load(path)
  text = "fox<sep>狐狸"
  assert loaded.encode(text) == trained.encode(text)
  assert loaded.vocab_size == trained.vocab_size
  sep = loaded.encode("<sep>")
  assert len(sep) == 1 and sep[0] in loaded.encode(text)
  assert loaded.decode(loaded.encode(text)) == text
