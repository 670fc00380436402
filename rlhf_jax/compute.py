"""Compute accounting: samples drawn, tokens generated, gradient steps and estimated FLOPs.

Every stage that samples or trains reports cumulative ``compute/samples``,
``compute/tokens_generated``, ``compute/grad_steps`` and ``compute/flops`` so
arms of an ablation can be matched on any of them. FLOPs count matrix
multiplies as 2 x multiply-adds, as XLA runs them: a forward pass over T
tokens that attend to C positions costs ``2 * T * (weights + 2 * L * C * d)``
(plus the LM head where logits are computed); a training step costs 3 forward
passes (forward + backward). Attention is counted over the positions actually
computed: the keys each query block reads (``layers.causal_blocks``; the full
sequence for rows under two blocks), or the KV cache of each decode phase.
"""

from __future__ import annotations

import dataclasses

from rlhf_jax.models import DecoderConfig
from rlhf_jax.models.decoder import decode_cache_lengths
from rlhf_jax.models.layers import causal_blocks

KEYS = ("compute/samples", "compute/tokens_generated", "compute/grad_steps", "compute/flops")


def matmul_weights(cfg: DecoderConfig, lm_head: bool = True) -> int:
  """Weights that take part in a matmul per token (embeddings are lookups; norms and biases ignored)."""
  head_dim = cfg.d_model // cfg.num_heads
  kv_dim = (cfg.num_kv_heads or cfg.num_heads) * head_dim
  attention = cfg.d_model * (cfg.d_model + 2 * kv_dim) + cfg.d_model * cfg.d_model
  mlp = (3 if cfg.flavour == "llama" else 2) * cfg.d_model * cfg.d_ff
  return cfg.num_layers * (attention + mlp) + (cfg.d_model * cfg.vocab_size if lm_head else cfg.d_model)


def forward_flops(cfg: DecoderConfig, tokens: int, context: int, lm_head: bool = True) -> float:
  """FLOPs of a forward pass over ``tokens`` tokens that each attend to ``context`` positions."""
  attention = 2 * cfg.num_layers * context * cfg.d_model  # QK^T and AV, multiply-adds
  return 2.0 * tokens * (matmul_weights(cfg, lm_head) + attention)


def causal_context(cfg: DecoderConfig, queries: int, keys: int, first_slot: int = 0) -> float:
  """Mean keys a query reads in a causal pass of ``queries`` tokens at slots ``first_slot ..`` over ``keys``
  slots: ``keys`` for one product, less where the pass runs in query blocks (``model.attention_block``)."""
  blocks = causal_blocks(queries, keys, first_slot, cfg.attention_block)
  return sum((r1 - r0) * n for r0, r1, n in blocks) / max(queries, 1)


def sequence_flops(cfg: DecoderConfig, batch: int, length: int, lm_head: bool = True, train: bool = False,
                   shared_prefix: tuple[int, int] | None = None) -> float:
  """FLOPs of a full-sequence pass over [batch, length] (x3 with ``train``: forward and backward).

  ``shared_prefix`` (P, k): the first P columns are computed once per k rows (``Trunk(shared_prefix=...)``).
  """
  passes = 3.0 if train else 1.0
  if shared_prefix is None:
    return passes * forward_flops(cfg, batch * length, causal_context(cfg, length, length), lm_head)
  p, k = shared_prefix
  tail = forward_flops(cfg, batch * (length - p), causal_context(cfg, length - p, length, p), lm_head)
  return passes * (forward_flops(cfg, batch // k * p, length, lm_head) + tail)


def generation_flops(cfg: DecoderConfig, batch: int, prompt_len: int, decode_steps: int, cache_len: int,
                     prompt_group: int = 1) -> float:
  """FLOPs of sampling: prefill [batch, prompt_len] (once per ``prompt_group`` rows: ``generate``) then
  ``decode_steps`` one-token steps, each over the cache of its phase (``decode_cache_lengths``; ``cache_len``
  is the last phase's, ``prompt_len + max_new_tokens - 1``)."""
  flops = forward_flops(cfg, batch // prompt_group * prompt_len, cache_len)
  done = 0
  for length in decode_cache_lengths(prompt_len, cache_len - prompt_len + 1):
    steps = max(min(decode_steps, length - prompt_len) - done, 0)
    flops += steps * forward_flops(cfg, batch, length)
    done += steps
  return flops


@dataclasses.dataclass
class Counts:
  """Increments of the four counters, added into a stage's cumulative totals."""

  samples: float = 0.0
  tokens_generated: float = 0.0
  grad_steps: float = 0.0
  flops: float = 0.0

  def __add__(self, other: "Counts") -> "Counts":
    return Counts(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

  def metrics(self) -> dict[str, float]:
    """As metrics named ``compute/...``."""
    return dict(zip(KEYS, map(float, dataclasses.astuple(self))))


def rollout_counts(cfg: DecoderConfig, batch: int, prompt_len: int, response_lengths, max_new_tokens: int,
                   samples: int | None = None, prompt_group: int = 1) -> Counts:
  """Counts of one sampler call: ``response_lengths`` [B] real tokens per row (host array); ``prompt_group``:
  rows per prefilled prompt (``generate``)."""
  lengths = [int(x) for x in response_lengths]
  steps = max(max(lengths, default=0) - 1, 0)  # the loop stops when every row has ended
  return Counts(samples=float(batch if samples is None else samples), tokens_generated=float(sum(lengths)),
                flops=generation_flops(cfg, batch, prompt_len, steps, prompt_len + max_new_tokens - 1, prompt_group))
