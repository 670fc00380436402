"""SentencePiece tokenizer: deterministic training and a small wrapper.

Special ids are fixed: pad=0, unk=1, bos=2, eos=3. Text is not normalised and
no dummy prefix is added, so `decode(encode(s)) == s` for any string (unseen
characters go through byte fallback). Exception: the character U+2581 (the
SentencePiece whitespace marker) decodes as a plain space.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence

import sentencepiece as spm
from etils import epath

from rlhf_jax.atomic_file import write_atomic

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3


class Tokenizer:
  """Encodes text to int ids and back; never adds BOS/EOS by itself."""

  def __init__(self, processor: spm.SentencePieceProcessor, path: str):
    self._sp = processor
    self.path = path
    self.pad_id = processor.pad_id()
    self.unk_id = processor.unk_id()
    self.bos_id = processor.bos_id()
    self.eos_id = processor.eos_id()
    self.vocab_size = processor.get_piece_size()

  @classmethod
  def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
    """Loads a `.model` file written by `train_tokenizer` (or any SPM model); local or gs://."""
    path = os.fspath(path)
    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(epath.Path(path).read_bytes())
    return cls(processor, path)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS/EOS."""
    return self._sp.EncodeAsIds(text)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; pad, bos and eos ids are dropped."""
    specials = (self.pad_id, self.bos_id, self.eos_id)
    return self._sp.DecodeIds([int(i) for i in ids if int(i) not in specials])

  def __repr__(self) -> str:
    return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


def train_tokenizer(
    texts: Iterable[str],
    model_path: str | os.PathLike[str],
    vocab_size: int,
    model_type: str = "unigram",
    byte_fallback: bool = True,
    user_defined_symbols: Sequence[str] = (),
    character_coverage: float = 1.0,
    seed: int = 0,
    hard_vocab_limit: bool = True,
) -> Tokenizer:
  """Trains a SentencePiece model on `texts` and writes it to `model_path`.

  Deterministic: the same texts and arguments give byte-identical model files
  (single training thread, input order kept). The file appears atomically.

  Args:
    texts: training documents, streamed once (each may contain newlines).
    model_path: destination `.model` file.
    vocab_size: number of pieces, including the 4 specials and, with
      `byte_fallback`, the 256 byte pieces.
    model_type: "unigram", "bpe", "char" or "word".
    byte_fallback: encode characters outside the vocabulary as UTF-8 bytes
      instead of `unk`, so every string round-trips.
    user_defined_symbols: strings always kept as single pieces.
    character_coverage: fraction of characters covered by the vocabulary.
    seed: seed of SentencePiece's global random generator.
    hard_vocab_limit: if False, `vocab_size` is an upper bound (small corpora
      may not support that many pieces); the result's `vocab_size` is exact.
  """
  model_path = os.fspath(model_path)
  spm.set_random_generator_seed(seed)
  buffer = io.BytesIO()
  spm.SentencePieceTrainer.Train(
      sentence_iterator=iter(texts),
      model_writer=buffer,
      model_type=model_type,
      vocab_size=vocab_size,
      hard_vocab_limit=hard_vocab_limit,
      byte_fallback=byte_fallback,
      character_coverage=character_coverage,
      user_defined_symbols=list(user_defined_symbols),
      pad_id=PAD_ID,
      unk_id=UNK_ID,
      bos_id=BOS_ID,
      eos_id=EOS_ID,
      # Exact round trips: no NFKC, no whitespace collapsing, no leading "▁".
      normalization_rule_name="identity",
      add_dummy_prefix=False,
      remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True,
      split_digits=True,
      # Determinism: input order kept, one thread.
      shuffle_input_sentence=False,
      num_threads=1,
      # Documents longer than this (in bytes) would be silently skipped.
      max_sentence_length=1 << 20,
      minloglevel=2,
  )
  write_atomic(model_path, buffer.getvalue())
  return Tokenizer.load(model_path)
