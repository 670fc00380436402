"""Records to fixed-shape numpy batches (int32 / float32; no JAX here).

Conventions, relied on by the models and losses:

* A sequence is a row of ``tokens`` [B, T] int32 with ``mask`` [B, T] int32
  (1 = real token, 0 = pad) and, where there is a loss, ``loss_mask`` [B, T]
  float32: ``loss_mask[t] = 1`` means ``tokens[t]`` is a target predicted from
  ``tokens[:t]``. ``loss_mask[:, 0]`` is always 0.
* Pretraining text: ``[bos] + encode(text) + [eos]``, right-padded to T.
* Prompt: ``[bos] + encode(prompt)``, LEFT-padded to P, so every prompt ends
  at column P - 1.
* Response: ``encode(response) + [eos]``, RIGHT-padded to R; prompt and
  response rows are ``concat(prompt, response)`` of width P + R.

Truncation (never silent; every function returns `TruncationStats`):

* prompt: keep ``bos`` and the newest P - 1 tokens (drop the oldest);
* response / text: keep the first R (T) tokens; the ``eos`` is then lost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Mapping, Protocol

import numpy as np

Batch = dict[str, np.ndarray]


class TokenizerLike(Protocol):
  bos_id: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]:
    ...


@dataclasses.dataclass
class TruncationStats:
  """How many sequences of each part were seen and how many were truncated."""

  prompts: int = 0
  prompts_truncated: int = 0
  responses: int = 0
  responses_truncated: int = 0
  texts: int = 0
  texts_truncated: int = 0

  def __add__(self, other: TruncationStats) -> TruncationStats:
    return TruncationStats(**{
        f.name: getattr(self, f.name) + getattr(other, f.name)
        for f in dataclasses.fields(self)
    })

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


def _prompt_ids(tok: TokenizerLike, prompt: str, length: int,
                stats: TruncationStats) -> list[int]:
  ids = tok.encode(prompt)
  stats.prompts += 1
  if len(ids) + 1 > length:
    stats.prompts_truncated += 1
    ids = ids[len(ids) - (length - 1):] if length > 1 else []
  return [tok.bos_id] + ids


def _response_ids(tok: TokenizerLike, response: str, length: int,
                  stats: TruncationStats) -> list[int]:
  ids = tok.encode(response) + [tok.eos_id]
  stats.responses += 1
  if len(ids) > length:
    stats.responses_truncated += 1
    ids = ids[:length]
  return ids


def _check_lengths(**lengths: int) -> None:
  for name, value in lengths.items():
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}")


def _check_batch(**columns: Sequence) -> int:
  sizes = {name: len(col) for name, col in columns.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"batch columns differ in length: {sizes}")
  return next(iter(sizes.values()))


def _prompt_response_rows(
    tok: TokenizerLike, prompt_ids: list[int], response_ids: list[int],
    prompt_len: int, response_len: int,
) -> tuple[np.ndarray, np.ndarray]:
  """[P + R] tokens and mask: left-padded prompt, right-padded response."""
  tokens = np.full(prompt_len + response_len, tok.pad_id, np.int32)
  mask = np.zeros(prompt_len + response_len, np.int32)
  start = prompt_len - len(prompt_ids)
  end = prompt_len + len(response_ids)
  tokens[start:prompt_len] = prompt_ids
  tokens[prompt_len:end] = response_ids
  mask[start:end] = 1
  return tokens, mask


def _pair_rows(tok: TokenizerLike, prompts: Sequence[str], responses: Sequence[str], prompt_len: int,
               response_len: int, stats: TruncationStats) -> tuple[np.ndarray, np.ndarray]:
  """[B, P + R] tokens and mask of (prompt, response) pairs; counts truncation into ``stats``."""
  width = prompt_len + response_len
  tokens = np.zeros((len(prompts), width), np.int32)
  mask = np.zeros((len(prompts), width), np.int32)
  for i, (prompt, response) in enumerate(zip(prompts, responses)):
    tokens[i], mask[i] = _prompt_response_rows(
        tok, _prompt_ids(tok, prompt, prompt_len, stats),
        _response_ids(tok, response, response_len, stats),
        prompt_len, response_len)
  return tokens, mask


def lm_batch(tok: TokenizerLike, texts: Sequence[str],
             seq_len: int) -> tuple[Batch, TruncationStats]:
  """Pretraining rows ``[bos] + text + [eos]``, right-padded.

  Returns:
    {"tokens" [B, T] int32, "mask" [B, T] int32, "loss_mask" [B, T] float32}
    with T = seq_len (every real token but bos is a target), and stats.
  """
  _check_lengths(seq_len=seq_len)
  stats = TruncationStats()
  tokens = np.full((len(texts), seq_len), tok.pad_id, np.int32)
  mask = np.zeros((len(texts), seq_len), np.int32)
  for i, text in enumerate(texts):
    ids = [tok.bos_id] + tok.encode(text) + [tok.eos_id]
    stats.texts += 1
    if len(ids) > seq_len:
      stats.texts_truncated += 1
      ids = ids[:seq_len]
    tokens[i, :len(ids)] = ids
    mask[i, :len(ids)] = 1
  loss_mask = mask.astype(np.float32)
  loss_mask[:, 0] = 0.0
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}, stats


def prompt_batch(tok: TokenizerLike, prompts: Sequence[str],
                 prompt_len: int) -> tuple[Batch, TruncationStats]:
  """Left-padded prompts for generation.

  Returns:
    {"tokens" [B, P] int32, "mask" [B, P] int32}, P = prompt_len, and stats.
  """
  _check_lengths(prompt_len=prompt_len)
  stats = TruncationStats()
  tokens = np.full((len(prompts), prompt_len), tok.pad_id, np.int32)
  mask = np.zeros((len(prompts), prompt_len), np.int32)
  for i, prompt in enumerate(prompts):
    ids = _prompt_ids(tok, prompt, prompt_len, stats)
    tokens[i, prompt_len - len(ids):] = ids
    mask[i, prompt_len - len(ids):] = 1
  return {"tokens": tokens, "mask": mask}, stats


def sft_batch(
    tok: TokenizerLike,
    prompts: Sequence[str],
    responses: Sequence[str],
    prompt_len: int,
    response_len: int,
    mask_prompt: bool = True,
) -> tuple[Batch, TruncationStats]:
  """Demonstration rows: left-padded prompt then right-padded response.

  Returns:
    {"tokens", "mask" [B, P + R] int32, "loss_mask" [B, P + R] float32}.
    loss_mask covers the response tokens (eos included) if `mask_prompt`,
    else every real token but the first (the prompt's bos); and stats.
  """
  _check_lengths(prompt_len=prompt_len, response_len=response_len)
  n = _check_batch(prompts=prompts, responses=responses)
  stats = TruncationStats()
  tokens, mask = _pair_rows(tok, prompts, responses, prompt_len, response_len, stats)
  loss_mask = mask.astype(np.float32)
  if mask_prompt:
    loss_mask[:, :prompt_len] = 0.0
  else:
    first_real = np.argmax(mask, axis=1)
    loss_mask[np.arange(n), first_real] = 0.0
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}, stats


def comparison_batch(
    tok: TokenizerLike,
    prompts: Sequence[str],
    responses_list: Sequence[Sequence[str]],
    rankings: Sequence[Sequence[int]],
    prompt_len: int,
    response_len: int,
    max_k: int,
) -> tuple[Batch, TruncationStats]:
  """K-wise comparison rows, K padded to `max_k`.

  Slots beyond a prompt's own K repeat its response 0 (so the model never
  sees an all-padding row) and are marked by ``response_mask = 0``.

  Returns:
    {"tokens", "mask" [B, max_k, P + R] int32,
     "response_mask" [B, max_k] int32 (1 = real response),
     "ranks" [B, max_k] int32 (0 = best; padding slots get max_k),
     "prompt_mask" [B, P] int32 (the prompt, the same in every slot: models compute it once)}, and stats.
  """
  _check_lengths(prompt_len=prompt_len, response_len=response_len)
  n = _check_batch(prompts=prompts, responses_list=responses_list,
                   rankings=rankings)
  stats = TruncationStats()
  width = prompt_len + response_len
  tokens = np.zeros((n, max_k, width), np.int32)
  mask = np.zeros((n, max_k, width), np.int32)
  response_mask = np.zeros((n, max_k), np.int32)
  ranks = np.full((n, max_k), max_k, np.int32)
  for i, (prompt, responses, ranking) in enumerate(
      zip(prompts, responses_list, rankings)):
    k = len(responses)
    if not 1 <= k <= max_k:
      raise ValueError(f"example {i} has {k} responses; max_k is {max_k}")
    if sorted(ranking) != list(range(k)):
      raise ValueError(f"example {i}: ranking {list(ranking)} is not a "
                       f"permutation of range({k})")
    prompt_ids = _prompt_ids(tok, prompt, prompt_len, stats)
    for j, response in enumerate(responses):
      tokens[i, j], mask[i, j] = _prompt_response_rows(
          tok, prompt_ids, _response_ids(tok, response, response_len, stats),
          prompt_len, response_len)
    tokens[i, k:] = tokens[i, 0]
    mask[i, k:] = mask[i, 0]
    response_mask[i, :k] = 1
    ranks[i, list(ranking)] = np.arange(k)
  return {"tokens": tokens, "mask": mask, "response_mask": response_mask,
          "ranks": ranks, "prompt_mask": mask[:, 0, :prompt_len].copy()}, stats


def comparison_shared_prefix(batch: Mapping[str, Any]) -> tuple[int, int] | None:
  """``(P, K)`` for ``Trunk(shared_prefix=...)`` of a comparison batch's rows flattened to [B * K, T]: the K
  rows of an example share columns [0, P) when the batch carries its ``prompt_mask`` [B, P]; else None."""
  k = np.shape(batch["tokens"])[1]
  return (int(np.shape(batch["prompt_mask"])[-1]), int(k)) if "prompt_mask" in batch and k > 1 else None


def scored_batch(
    tok: TokenizerLike,
    prompts: Sequence[str],
    responses: Sequence[str],
    scores: Sequence[float],
    prompt_len: int,
    response_len: int,
) -> tuple[Batch, TruncationStats]:
  """Directly scored (prompt, response) rows.

  Returns:
    {"tokens", "mask" [B, P + R] int32, "score" [B] float32}, and stats.
  """
  _check_lengths(prompt_len=prompt_len, response_len=response_len)
  n = _check_batch(prompts=prompts, responses=responses, scores=scores)
  stats = TruncationStats()
  tokens, mask = _pair_rows(tok, prompts, responses, prompt_len, response_len, stats)
  return {"tokens": tokens, "mask": mask,
          "score": np.asarray(scores, np.float32).reshape(n)}, stats
