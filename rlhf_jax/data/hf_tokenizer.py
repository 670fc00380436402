"""The tokenizer of a Hugging Face checkpoint directory, with our ``Tokenizer``'s interface.

Which file is read, in order: ``tokenizer.model`` (sentencepiece, Llama-family), ``tokenizer.json``
(the ``tokenizers`` library: Llama 3, Mistral, GPT-2 saved by recent transformers), ``vocab.json`` +
``merges.txt`` (GPT-2's byte-level BPE, built with ``tokenizers``). ``tokenizers`` is an optional extra
(``pip install rlhf-jax[hf]``). Special ids come from ``config.json`` (``bos_token_id``, ``eos_token_id``,
``pad_token_id``; a list of EOS ids gives its first), else from the special tokens in
``tokenizer_config.json`` / ``special_tokens_map.json``. A tokenizer without a pad token (GPT-2, Llama)
pads with EOS: padded positions are masked everywhere, so the id only has to be a valid one.

``encode`` never adds BOS/EOS (our batching adds them), as with our own tokenizer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from rlhf_jax.data.tokenizer import Tokenizer

SPECIALS = ("bos", "eos", "pad", "unk")


def has_tokenizer(path: str) -> bool:
  return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.model", "tokenizer.json", "vocab.json"))


def _json(path: str, name: str) -> dict:
  file = os.path.join(path, name)
  if not os.path.isfile(file):
    return {}
  with open(file) as f:
    return json.load(f)


def _token_text(value: Any) -> str | None:
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


def special_ids(path: str, token_to_id, vocab_size: int, defaults: dict[str, int]) -> dict[str, int]:
  """bos/eos/pad/unk ids of a checkpoint's tokenizer (-1 where it has none; pad falls back to EOS)."""
  config = _json(path, "config.json")
  tokens = {**_json(path, "special_tokens_map.json"), **_json(path, "tokenizer_config.json")}
  ids = {}
  for name in SPECIALS:
    value = config.get(f"{name}_token_id")
    if isinstance(value, list):
      value = value[0] if value else None
    if value is None or not 0 <= int(value) < vocab_size:
      text = _token_text(tokens.get(f"{name}_token"))
      value = token_to_id(text) if text else None
    if value is None or not 0 <= int(value) < vocab_size:
      value = defaults.get(name, -1)
    ids[name] = int(value) if value is not None and 0 <= int(value) < vocab_size else -1
  if ids["pad"] < 0:
    ids["pad"] = ids["eos"]
  return ids


class BPETokenizer:
  """A ``tokenizers`` tokenizer (byte-level BPE and other ``tokenizer.json`` kinds) as our ``Tokenizer``."""

  def __init__(self, tok, path: str):
    self._tok = tok
    self.path = path
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    ids = special_ids(path, tok.token_to_id, self.vocab_size, {})
    self.bos_id, self.eos_id, self.pad_id, self.unk_id = ids["bos"], ids["eos"], ids["pad"], ids["unk"]
    if self.eos_id < 0:
      raise ValueError(f"{path}: the tokenizer has no EOS token (config.json eos_token_id or tokenizer_config.json "
                       "eos_token)")
    if self.bos_id < 0:  # GPT-2 style: one <|endoftext|> token begins and ends documents
      self.bos_id = self.eos_id

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    specials = (self.pad_id, self.bos_id, self.eos_id)
    return self._tok.decode([int(i) for i in ids if int(i) not in specials], skip_special_tokens=False)

  def __repr__(self) -> str:
    return f"BPETokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


def load(path: str):
  """The tokenizer of checkpoint directory ``path`` (see the module docstring for which file)."""
  spm_file = os.path.join(path, "tokenizer.model")
  if os.path.isfile(spm_file):
    tok = Tokenizer.load(spm_file)
    processor = tok._sp  # noqa: SLF001 (same package)

    def piece_id(text: str) -> int | None:
      i = processor.PieceToId(text)
      return i if processor.IdToPiece(i) == text else None  # unknown pieces map to unk

    ids = special_ids(path, piece_id, tok.vocab_size,
                      {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id, "unk": tok.unk_id})
    tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id = ids["bos"], ids["eos"], ids["pad"], ids["unk"]
    return tok
  try:
    import tokenizers
  except ImportError as e:
    raise ImportError(f"{path}: reading a BPE tokenizer needs the 'tokenizers' package "
                      "(pip install 'rlhf-jax[hf]')") from e
  json_file = os.path.join(path, "tokenizer.json")
  if os.path.isfile(json_file):
    return BPETokenizer(tokenizers.Tokenizer.from_file(json_file), path)
  vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
  if os.path.isfile(vocab) and os.path.isfile(merges):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(vocab, merges))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    added = _json(path, "tokenizer_config.json").get("added_tokens_decoder", {})
    tok.add_special_tokens([t["content"] for t in added.values() if t.get("special")])
    return BPETokenizer(tok, path)
  raise FileNotFoundError(f"{path}: no tokenizer (tokenizer.model, tokenizer.json, or vocab.json + merges.txt)")
