"""Sequence packing: a step's sequences laid end to end in fewer, wider rows (``data.pack_width``).

A batch of short sequences padded to a common width spends a full column of compute on every padding
slot. ``pack`` takes the real tokens of each row of a next-token batch (``batching.sft_batch``,
``batching.lm_batch``) and places them first-fit-decreasing into rows of ``width`` tokens, marking each
sequence with a segment id (1, 2, ... within a row; 0 on padding). The decoder restarts positions at each
segment and lets a token attend only within its segment (``Trunk(segments=...)``), so every sequence gets
the logits it would get alone and the step's mean loss over target tokens is the same, up to float
rounding: the same sequences train in the same step, in fewer rows.

``pack_comparisons`` does the same for the reward and DPO stages' comparisons: an example's prompt once, then
each of its responses, every response attending to the prompt and itself only (``Trunk(branches=...)``), a
reward read at each response's last token (``comparison_targets`` gives DPO each response token's predicting
column).

The row count is rounded up to a multiple of ``row_granule(rows)`` (a power of two near rows / 8), so a run
compiles a few row counts and pads at most about an eighth. Packing is deterministic, so every process of a
multi-host run packs the same global batch the same way.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from rlhf_jax.data import bucketing

ROW_KEYS = ("tokens", "mask", "loss_mask")


def row_granule(rows: int) -> int:
  """The multiple a packed row count is rounded up to: the largest power of two <= rows / 8 (at least 1)."""
  return 1 << max(int(rows).bit_length() - 4, 0)


def first_fit_decreasing(lengths: np.ndarray, width: int) -> list[list[int]]:
  """Bins of at most ``width`` tokens for sequences of ``lengths``: each sequence, longest first (ties in
  index order), goes into the first bin with room. Returns the sequence indices of each bin in the order
  placed."""
  lengths = np.asarray(lengths, np.int64)
  if lengths.size and lengths.max() > width:
    raise ValueError(f"a sequence of {int(lengths.max())} tokens does not fit data.pack_width={width}")
  bins: list[list[int]] = []
  room: list[int] = []
  for i in np.argsort(-lengths, kind="stable"):
    n = int(lengths[i])
    if n == 0:
      continue
    for b, free in enumerate(room):
      if n <= free:
        bins[b].append(int(i))
        room[b] -= n
        break
    else:
      bins.append([int(i)])
      room.append(width - n)
  return bins


def pack(batch: Mapping[str, np.ndarray], width: int, pad_id: int) -> dict[str, np.ndarray]:
  """Packs the real tokens (``mask`` 1) of each row of ``batch`` {"tokens", "mask", "loss_mask"} [B, W]
  into rows of ``width`` -> {"tokens", "mask", "loss_mask", "segments"} [R, width], R <= B rounded up by
  ``row_granule``.

  A sequence keeps its tokens and loss mask in order (padding inside a row is dropped, as positions
  skip it anyway). Its first token is never a target, as in its own row (``loss_mask[:, 0]`` is 0 there):
  the loss mask of each segment's first token is set to 0. Rows past the last sequence are all padding
  (mask, loss mask and segment 0). A batch with no real token comes back as one padding row.
  """
  for key in ROW_KEYS:
    if key not in batch:
      raise ValueError(f"packing needs batch[{key!r}]; the batch has {sorted(batch)}")
  tokens, mask = np.asarray(batch["tokens"]), np.asarray(batch["mask"]).astype(bool)
  loss_mask = np.asarray(batch["loss_mask"])
  if tokens.ndim != 2 or mask.shape != tokens.shape or loss_mask.shape != tokens.shape:
    raise ValueError(f"packing needs [B, W] rows; got { {k: np.shape(batch[k]) for k in ROW_KEYS} }")
  if width < 1:
    raise ValueError(f"data.pack_width must be >= 1, got {width}")
  bins = first_fit_decreasing(mask.sum(axis=1), width)
  rows = max(len(bins), 1)
  rows = -(-rows // row_granule(rows)) * row_granule(rows)
  out = {"tokens": np.full((rows, width), pad_id, tokens.dtype), "mask": np.zeros((rows, width), np.int32),
         "loss_mask": np.zeros((rows, width), loss_mask.dtype), "segments": np.zeros((rows, width), np.int32)}
  for r, members in enumerate(bins):
    col = 0
    for segment, i in enumerate(members, start=1):
      real = mask[i]
      n = int(real.sum())
      out["tokens"][r, col:col + n] = tokens[i, real]
      out["mask"][r, col:col + n] = 1
      out["loss_mask"][r, col:col + n] = loss_mask[i, real]
      out["loss_mask"][r, col] = 0
      out["segments"][r, col:col + n] = segment
      col += n
  return out


def _power_of_two(n: int) -> int:
  """The least power of two >= n (>= 1)."""
  return 1 << max(int(n) - 1, 0).bit_length()


def pack_comparisons(batch: Mapping[str, np.ndarray], width: int, pad_id: int) -> dict[str, np.ndarray]:
  """Packs a comparison batch's examples, each as its prompt once then its real responses, into rows of
  ``width`` tokens (the reward and DPO stages' ``pack_width``).

  batch: {"tokens", "mask" [B, K, T], "response_mask" [B, K], ...}; with a ``prompt_mask`` [B, P]
  (``batching.comparison_batch``) columns [0, P) are the prompt all K rows share, else each row is a whole
  sequence of its own. Every other array [B, ...] (``ranks``, ``score``) is per example.

  Returns, R rows rounded up by ``row_granule`` and E the most examples in a row rounded up to a power of
  two:
    {"tokens", "mask", "segments", "branches", "positions" [R, width]}: an example's tokens in order, its
    segment id (1, 2, ... within a row; 0 on padding), branch (0 on the prompt, k on its k-th response)
    and position id (a response's positions continue its prompt's, as in its own left-padded row);
    "reads" [R, E, K]: the column of each response's last token (0 where there is none);
    "response_mask" [R, E, K]: 1 on a real response (0 on a padding response and on an empty slot);
    every other per-example array of ``batch`` laid out as [R, E, ...] (zeros on an empty slot).
  A response's model inputs are those of its own unpacked row (``Trunk(branches=...)``), so its reward is the
  same up to float rounding. Padding responses (``response_mask`` 0, copies of response 0) take no slot.
  """
  for key in ("tokens", "mask", "response_mask"):
    if key not in batch:
      raise ValueError(f"packing comparisons needs batch[{key!r}]; the batch has {sorted(batch)}")
  tokens, mask = np.asarray(batch["tokens"]), np.asarray(batch["mask"]).astype(bool)
  real_rows = np.asarray(batch["response_mask"]).astype(bool)
  if tokens.ndim != 3 or mask.shape != tokens.shape or real_rows.shape != tokens.shape[:2]:
    raise ValueError("packing comparisons needs tokens and mask [B, K, T] and response_mask [B, K]; got "
                     f"{ {k: np.shape(batch[k]) for k in ('tokens', 'mask', 'response_mask')} }")
  if width < 1:
    raise ValueError(f"pack_width must be >= 1, got {width}")
  b, k, _ = tokens.shape
  p = int(np.shape(batch["prompt_mask"])[-1]) if "prompt_mask" in batch else 0
  prompts = [tokens[i, 0, :p][mask[i, 0, :p]] for i in range(b)]
  responses = [[tokens[i, j, p:][mask[i, j, p:]] if real_rows[i, j] else None for j in range(k)] for i in range(b)]
  lengths = np.array([len(prompts[i]) + sum(len(r) for r in responses[i] if r is not None) for i in range(b)])
  if lengths.size and lengths.max() > width:
    i = int(np.argmax(lengths))
    raise ValueError(f"comparison example {i} has {int(lengths[i])} tokens (its prompt once and its "
                     f"{int(real_rows[i].sum())} responses); it does not fit pack_width={width}")
  bins = first_fit_decreasing(lengths, width)
  rows = max(len(bins), 1)
  rows = -(-rows // row_granule(rows)) * row_granule(rows)
  slots = _power_of_two(max((len(m) for m in bins), default=1))
  out = {"tokens": np.full((rows, width), pad_id, tokens.dtype)}
  for key in ("mask", "segments", "branches", "positions"):
    out[key] = np.zeros((rows, width), np.int32)
  out["reads"] = np.zeros((rows, slots, k), np.int32)
  out["response_mask"] = np.zeros((rows, slots, k), np.int32)
  extras = {key: np.asarray(v) for key, v in batch.items()
            if key not in ("tokens", "mask", "response_mask", "prompt_mask")}
  for key, value in extras.items():
    if value.shape[:1] != (b,):
      raise ValueError(f"batch[{key!r}] of shape {value.shape} is not per example (B = {b})")
    out[key] = np.zeros((rows, slots, *value.shape[1:]), value.dtype)
  for r, members in enumerate(bins):
    col = 0
    for e, i in enumerate(members):
      n = len(prompts[i])
      prompt_last = col + max(n - 1, 0)  # what an empty response's own row reads: its prompt's last token
      pieces = [(0, prompts[i])] + [(j + 1, resp) for j, resp in enumerate(responses[i]) if resp is not None]
      for branch, ids in pieces:
        m = len(ids)
        out["tokens"][r, col:col + m] = ids
        out["mask"][r, col:col + m] = 1
        out["segments"][r, col:col + m] = e + 1
        out["branches"][r, col:col + m] = branch
        out["positions"][r, col:col + m] = np.arange(m) + (n if branch else 0)
        if branch:
          out["reads"][r, e, branch - 1] = col + m - 1 if m else prompt_last
          out["response_mask"][r, e, branch - 1] = 1
        col += m
      for key, value in extras.items():
        out[key][r, e] = value[i]
  return out


def comparison_targets(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The next-token targets of packed comparisons' responses (``pack_comparisons``), for a policy's log-probs
  of each response (DPO): every response token, the column whose logits predict it, and its response.

  Returns {"targets" [R, N]: a response token's column; "sources" [R, N]: the column predicting it (the token
  before it in its response, or its prompt's last token for a response's first token); "target_slots" [R, N]:
  its response as e * K + k (slot e of the row, response k), -1 on padding}, N the most response tokens in a
  row rounded up to a multiple of 16. A response with no prompt token before it has no predicted first token,
  as in its own row.
  """
  segments, branches = np.asarray(packed["segments"]), np.asarray(packed["branches"])
  mask = np.asarray(packed["mask"]).astype(bool)
  k = np.shape(packed["reads"])[-1]
  rows, width = segments.shape
  cols = np.broadcast_to(np.arange(width), (rows, width))
  response = mask & (branches > 0)
  # A response's first token: the column before it is another segment or branch (or there is none).
  first = response.copy()
  first[:, 1:] &= (segments[:, 1:] != segments[:, :-1]) | (branches[:, 1:] != branches[:, :-1])
  # A segment's prompt precedes its responses, so the last prompt column seen so far is its prompt's last
  # token, when that column is of the same segment (a segment without a prompt sees an earlier one's).
  prompt_last = np.maximum.accumulate(np.where(mask & (branches == 0), cols, -1), axis=1)
  has_prompt = (prompt_last >= 0) & (np.take_along_axis(segments, np.maximum(prompt_last, 0), axis=1) == segments)
  keep = response & (~first | has_prompt)
  sources = np.where(first, prompt_last, cols - 1)
  n = -(-max(int(keep.sum(axis=1).max(initial=0)), 1) // 16) * 16
  # Each row's kept columns first, in order (a stable sort of "not kept"), cut or padded to n.
  order = np.argsort(~keep, axis=1, kind="stable")[:, :n]
  kept = np.take_along_axis(keep, order, axis=1)
  pad = ((0, 0), (0, n - order.shape[1]))
  order, kept = np.pad(order, pad), np.pad(kept, pad)
  slot = (segments - 1) * k + branches - 1
  pick = lambda a: np.where(kept, np.take_along_axis(a, order, axis=1), 0).astype(np.int32)  # noqa: E731
  return {"targets": pick(cols), "sources": pick(sources),
          "target_slots": np.where(kept, np.take_along_axis(slot, order, axis=1), -1).astype(np.int32)}


def comparison_training_rows(batch: Mapping[str, np.ndarray], width: int, pad_id: int, min_bucket_len: int,
                             targets: bool = False) -> dict[str, np.ndarray]:
  """A comparison or scored batch (``batching.comparison_batch``, ``scored_batch``) as a step trains on it with
  a ``pack_width``: packed (``pack_comparisons``; a scored row is an example of one response), cut to the
  narrowest bucket that holds its rows (``data.min_bucket_len``), and with ``targets`` the response tokens'
  next-token targets (``comparison_targets``; a policy's log-probs, DPO)."""
  if np.ndim(batch["tokens"]) == 2:
    batch = {"tokens": np.asarray(batch["tokens"])[:, None], "mask": np.asarray(batch["mask"])[:, None],
             "response_mask": np.ones((len(batch["tokens"]), 1), np.int32),
             **{k: v for k, v in batch.items() if k not in ("tokens", "mask")}}
  packed = bucketing.trim_texts(pack_comparisons(batch, width, pad_id), min_bucket_len)
  return {**packed, **comparison_targets(packed)} if targets else packed


def fill(batch: Mapping[str, np.ndarray]) -> float:
  """Real tokens over slots of a batch's ``mask`` [..., W]: 1 - the share of compute spent on padding (the
  ``data/fill`` metric of the next-token stages)."""
  mask = np.asarray(batch["mask"])
  return float(mask.astype(bool).sum() / max(mask.size, 1))


def comparison_fill(batch: Mapping[str, np.ndarray], prompt_len: int = 0) -> float:
  """``fill`` of a comparison batch {"mask" [B, K, T], "response_mask" [B, K]} as its step computes it (the
  reward and DPO stages' ``data/fill``): real tokens over token slots.

  ``prompt_len`` P > 0 with K > 1: the step computes columns [0, P), the prompt shared by an example's K rows,
  once per example (``Trunk(shared_prefix=(P, K))``): B * P + B * K * (T - P) slots, the prompt's real tokens
  counted once. A padding response (``response_mask`` 0, a copy of response 0) fills slots with no real token.
  """
  mask = np.asarray(batch["mask"]).astype(bool)
  if mask.ndim != 3:
    raise ValueError(f"a comparison batch's mask is [B, K, T]; got shape {mask.shape}")
  b, k, t = mask.shape
  real_rows = np.asarray(batch["response_mask"]).astype(bool)
  if not prompt_len or k < 2:
    return float(mask[real_rows].sum() / max(mask.size, 1))
  real = mask[:, 0, :prompt_len].sum() + mask[:, :, prompt_len:][real_rows].sum()
  return float(real / max(b * prompt_len + b * k * (t - prompt_len), 1))


def training_rows(batch: Mapping[str, np.ndarray], data: Mapping, pad_id: int,
                  prompt_len: int = 0) -> dict[str, np.ndarray]:
  """A next-token batch as a step trains on it: packed into rows of ``data.pack_width`` (then cut to the
  narrowest bucket, ``data.min_bucket_len``) when that is set, else cut to its bucket as it is.

  ``prompt_len``: rows are a left-padded prompt of that width then a response (``sft_batch``); 0: right-padded
  text (``lm_batch``). Other entries of ``batch`` are dropped when packing (rows are no longer the same).
  """
  width = data["pack_width"] if "pack_width" in data else 0  # a config.json from before packing has none
  if width:
    columns = np.shape(batch["tokens"])[-1]
    if width < columns:
      raise ValueError(f"data.pack_width={width} is narrower than the {columns}-token rows it packs (sft: "
                       "data.prompt_len + data.response_len; rft: data.prompt_len + its sampling.max_new_tokens; "
                       "pretraining text: data.seq_len)")
    return bucketing.trim_texts(pack(batch, width, pad_id), data.min_bucket_len)
  if prompt_len:
    return bucketing.trim_pairs(batch, prompt_len, data.min_bucket_len)
  return bucketing.trim_texts(batch, data.min_bucket_len)
