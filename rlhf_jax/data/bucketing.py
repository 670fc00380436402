"""Length bucketing: drop the columns that are padding in every row of a batch, to a few fixed widths.

Batches are built at the configured widths (``data.prompt_len`` + ``data.response_len``, ``data.seq_len``).
Real data is mostly shorter, and every padding column costs a full column of compute in every model pass.
``trim`` cuts a batch down to the narrowest *bucket* that holds all its real tokens: prompts are
left-padded, so their all-padding columns are cut from the left, responses and plain texts from the
right. A bucket is ``smallest * 2**k`` tokens (or the full width), so a run compiles each step for at most
``log2(full / smallest) + 1`` widths per side. The values of real tokens do not change: position ids come
from the mask and padding is masked everywhere.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def bucket_width(needed: int, full: int, smallest: int) -> int:
  """The width ``needed`` columns are padded to: the least ``smallest * 2**k`` >= needed, at most ``full``.

  ``smallest`` 0 turns bucketing off (always ``full``).
  """
  if needed > full:
    raise ValueError(f"{needed} columns do not fit the full width {full}")
  if smallest <= 0:
    return full
  width = smallest
  while width < needed:
    width *= 2
  return min(width, full)


def trim(batch: Mapping[str, np.ndarray], keys: Sequence[str], prompt_len: int, smallest: int, *,
         mask_key: str = "mask", left: bool = True, right: bool = True) -> tuple[dict[str, np.ndarray], int]:
  """Cuts the columns of ``batch[k]`` for k in ``keys`` (all [..., W]) that no row of ``batch[mask_key]``
  uses, to bucket widths -> (batch, new prompt_len).

  Columns [0, prompt_len) are a left-padded prompt, trimmed from the left (``left``); columns
  [prompt_len, W) are right-padded, trimmed from the right (``right``). ``prompt_len`` 0: the whole row is
  right-padded (pretraining text). A ``prompt_mask`` [..., prompt_len] entry is cut with the prompt
  columns; other entries are passed through. ``smallest`` 0 returns the batch unchanged.
  """
  out = dict(batch)
  if smallest <= 0:
    return out, prompt_len
  mask = np.asarray(batch[mask_key])
  width = mask.shape[-1]
  for key in keys:
    if np.shape(batch[key])[-1] != width:
      raise ValueError(f"batch[{key!r}] has {np.shape(batch[key])[-1]} columns; {mask_key!r} has {width}")
  used = mask.reshape(-1, width).any(axis=0)
  start, stop = 0, width
  if left and prompt_len > 0:
    real = np.flatnonzero(used[:prompt_len])
    needed = prompt_len - real[0] if real.size else 1
    start = prompt_len - bucket_width(needed, prompt_len, smallest)
  if right and width > prompt_len:
    real = np.flatnonzero(used[prompt_len:])
    needed = real[-1] + 1 if real.size else 1
    stop = prompt_len + bucket_width(needed, width - prompt_len, smallest)
  if (start, stop) == (0, width):
    return out, prompt_len
  for key in keys:
    out[key] = np.asarray(batch[key])[..., start:stop]
  if "prompt_mask" in batch and np.shape(batch["prompt_mask"])[-1] == prompt_len:
    out["prompt_mask"] = np.asarray(batch["prompt_mask"])[..., start:]  # the prompt columns kept
  return out, prompt_len - start


def trim_prompts(batch: Mapping[str, np.ndarray], smallest: int) -> dict[str, np.ndarray]:
  """``trim`` for a left-padded prompt batch {"tokens", "mask" [B, P], ...} (``batching.prompt_batch``)."""
  return trim(batch, ("tokens", "mask"), np.shape(batch["mask"])[-1], smallest)[0]


def _row_keys(batch: Mapping[str, np.ndarray]) -> list[str]:
  """The batch's per-column arrays [..., W] that batching builds."""
  return [k for k in ("tokens", "mask", "loss_mask", "segments", "branches", "positions") if k in batch]


def trim_texts(batch: Mapping[str, np.ndarray], smallest: int) -> dict[str, np.ndarray]:
  """``trim`` for right-padded texts {"tokens", "mask", "loss_mask" [B, T]} (``batching.lm_batch``)."""
  return trim(batch, _row_keys(batch), 0, smallest)[0]


def trim_pairs(batch: Mapping[str, np.ndarray], prompt_len: int, smallest: int,
               left: bool = True) -> dict[str, np.ndarray]:
  """``trim`` for prompt + response rows [..., P + R] (``sft_batch``, ``comparison_batch``,
  ``scored_batch``); ``left`` False keeps the prompt's width (a step that splits rows at ``prompt_len``)."""
  return trim(batch, _row_keys(batch), prompt_len, smallest, left=left)[0]
