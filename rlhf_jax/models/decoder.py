"""Decoder-only Transformer (GPT-2 and Llama flavours), scalar-head models and the KV cache.

Sequences are rows of ``tokens`` [B, T] with a ``mask`` [B, T] (1 = real
token). Position ids come from the mask (``cumsum(mask) - 1``), so a
left-padded prompt gets the same positions, and the same logits, as the
unpadded one. The same trunk serves the language model, the reward model and
the value model, under the key ``trunk`` in each, so a reward model can be
initialised from an SFT checkpoint by copying that subtree.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx, struct

from rlhf_jax.models import layers
from rlhf_jax.models.mixed_matmul import mixed_matmul

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Architecture of the decoder; ``flavour`` picks GPT-2 or Llama defaults."""

  vocab_size: int
  num_layers: int = 4
  d_model: int = 256
  num_heads: int = 4
  num_kv_heads: int = 0  # 0: same as num_heads (plain multi-head attention)
  d_ff: int = 1024
  max_len: int = 512
  flavour: str = "gpt2"
  dropout: float = 0.0
  param_dtype: Any = jnp.float32
  dtype: Any = jnp.float32
  # Operand dtype of the model's products (projections, attention scores and mix, MLP, LM head), accumulated
  # in float32; None or "": the compute dtype. "bfloat16" under float32 compute is TPU-style default
  # precision (models/mixed_matmul.py).
  matmul_dtype: Any = None
  remat: bool = False
  scan_layers: bool = False
  # Causal attention over rows of at least twice this many tokens runs in blocks of this many queries, each
  # reading only the keys up to its last one (layers.causal_blocks); 0: one product over all keys.
  attention_block: int = 128
  # How passes without a KV cache attend (layers.ATTENTION_IMPLS): "xla" our own products (query blocks, mixed
  # precision); "jax" jax.nn.dot_product_attention on XLA; "cudnn" its cuDNN fused attention (GPU, 16-bit
  # operands). Decode steps always take "xla".
  attention_impl: str = "xla"
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  # Output projection shares the embedding table; None: the flavour's default (GPT-2 tied, Llama untied).
  tie_embeddings: bool | None = None
  # RoPE context stretching (llama): () none, ("linear", factor),
  # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_len) or
  # ("yarn", factor, original_max_len, beta_fast, beta_slow, attention_factor, truncate); see layers.rope_frequencies.
  rope_scaling: tuple = ()
  # Biases on the q, k and v projections only (llama flavour; Qwen2's attention). GPT-2 has all its biases anyway.
  qkv_bias: bool = False

  def __post_init__(self):
    if self.flavour not in ("gpt2", "llama"):
      raise ValueError(f"model.flavour must be 'gpt2' or 'llama', got {self.flavour!r}")
    if self.qkv_bias and self.flavour != "llama":
      raise ValueError("model.qkv_bias applies to the llama flavour only (gpt2 has every bias already); "
                       f"got flavour {self.flavour!r}")
    if self.tie_embeddings is None:
      object.__setattr__(self, "tie_embeddings", self.flavour == "gpt2")
    scaling = tuple(self.rope_scaling or ())  # a list once read back from config.json
    object.__setattr__(self, "rope_scaling", scaling)
    known = {"linear": 2, "llama3": 5, "yarn": 7}
    if scaling and known.get(scaling[0]) != len(scaling):
      raise ValueError('model.rope_scaling must be (), ("linear", factor), ("llama3", factor, low_freq_factor, '
                       'high_freq_factor, original_max_len) or ("yarn", factor, original_max_len, beta_fast, '
                       f"beta_slow, attention_factor, truncate), got {scaling!r}")
    if scaling and scaling[0] == "yarn":
      object.__setattr__(self, "rope_scaling", _yarn_scaling(scaling))
    if self.matmul_dtype == "":
      object.__setattr__(self, "matmul_dtype", None)
    for name in ("param_dtype", "dtype", "matmul_dtype"):
      value = getattr(self, name)
      if isinstance(value, str):
        if value not in _DTYPES:
          also = "'' (the compute dtype) or " if name == "matmul_dtype" else ""
          raise ValueError(f"model.{name} must be {also}one of {sorted(_DTYPES)}, got {value!r}")
        object.__setattr__(self, name, _DTYPES[value])
    if self.attention_impl not in layers.ATTENTION_IMPLS:
      raise ValueError(f"model.attention_impl must be one of {sorted(layers.ATTENTION_IMPLS)}, got "
                       f"{self.attention_impl!r}")
    if isinstance(self.attention_block, bool) or not isinstance(self.attention_block, int) or self.attention_block < 0:
      raise ValueError(f"model.attention_block must be a whole number >= 0 (0: one product over all keys), got "
                       f"{self.attention_block!r}")
    if self.d_model % self.num_heads:
      raise ValueError(f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}")
    if self.num_heads % self.kv_heads:
      raise ValueError(f"model.num_heads={self.num_heads} is not divisible by model.num_kv_heads={self.kv_heads}")

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any]) -> "DecoderConfig":
    """Builds from a config mapping (e.g. ``config.model``), naming unknown keys."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown model config keys {unknown}; known: {sorted(known)}")
    return cls(**dict(values))

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def use_bias(self) -> bool:
    return self.flavour == "gpt2"


def _yarn_scaling(scaling: tuple) -> tuple:
  """A yarn ``rope_scaling`` with its numbers checked and typed (float, int original_max_len, bool truncate)."""
  numbers, truncate = scaling[1:6], scaling[6]
  positive = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                 for v in numbers)
  if not positive or not isinstance(truncate, bool) or numbers[1] != int(numbers[1]):
    raise ValueError('model.rope_scaling ("yarn", factor, original_max_len, beta_fast, beta_slow, attention_factor, '
                     "truncate) needs numbers > 0, a whole original_max_len and a bool truncate, "
                     f"got {scaling!r}")
  factor, original, beta_fast, beta_slow, attention_factor = numbers
  return ("yarn", float(factor), int(original), float(beta_fast), float(beta_slow), float(attention_factor),
          truncate)


@struct.dataclass
class KVCache:
  """Preallocated keys/values for all layers, plus per-row bookkeeping.

  k, v: per layer [B, KV, S, Dh] (heads before slots: the layout the attention products read
  directly). With a layer loop they are tuples of L arrays, so that each layer's decode step writes
  its own buffer in place; with ``scan_layers`` they are stacked arrays [L, B, KV, S, Dh] carried
  through the scan. valid: [B, S] (slot holds a real token); index: scalar, next slot to write;
  next_pos: [B], position id of the next real token. fresh (static): nothing written yet, so the first
  call (a prefill) attends to its own keys without reading the S slots. start (static): ``index``'s value
  when known where the cache is made (0 for a fresh cache, P after a shared prompt's prefill), so that the
  next call attends in query blocks (``layers.causal_blocks``); a call's returned cache does not keep it (a
  decode loop's carry keeps one structure).
  """

  k: Any
  v: Any
  valid: Array
  index: Array
  next_pos: Array
  fresh: bool = struct.field(pytree_node=False, default=False)
  start: int | None = struct.field(pytree_node=False, default=None)

  def layer(self, i: int) -> tuple[Array, Array]:
    """Layer ``i``'s (k, v), each [B, KV, S, Dh]."""
    return self.k[i], self.v[i]

  def repeat_rows(self, k: int) -> "KVCache":
    """The cache with each row repeated k times in a row ([B, ...] -> [B * k, ...]): one prompt's prefill
    shared by its k samples."""
    rows_axis = 1 if isinstance(self.k, jax.Array) else 0  # k, v: stacked [L, B, ...] or a tuple of [B, ...]
    repeat = lambda x: jnp.repeat(x, k, axis=rows_axis)  # noqa: E731
    return self.replace(k=jax.tree.map(repeat, self.k), v=jax.tree.map(repeat, self.v),
                        valid=jnp.repeat(self.valid, k, axis=0), next_pos=jnp.repeat(self.next_pos, k))


# A sampler's decode loop runs in phases, one per this many new tokens (at most MAX_DECODE_PHASES), each with a
# KV cache just long enough for it: a step reads the slots filled by then, not the whole sequence's. At
# 64 + 448 tokens (bench-small) 2-4 phases sampled 1.09-1.21x faster; at 64 + 64, 2 phases were within noise.
DECODE_PHASE_TOKENS = 128
MAX_DECODE_PHASES = 4


def decode_cache_lengths(prompt_len: int, new_tokens: int) -> list[int]:
  """The KV cache's length in each phase of a decode loop: one phase per ``DECODE_PHASE_TOKENS`` new tokens
  (1 to ``MAX_DECODE_PHASES``), equal shares of the forward steps, each phase's cache just long enough for
  its steps; the last one is ``prompt_len + new_tokens - 1``, the whole sequence but its last token."""
  steps = new_tokens - 1
  phases = max(1, min(MAX_DECODE_PHASES, new_tokens // DECODE_PHASE_TOKENS, steps))
  return [prompt_len + -(-steps * (j + 1) // phases) for j in range(phases)]


def grow_cache(cache: KVCache, length: int) -> KVCache:
  """``cache`` with room for ``length`` slots: the same keys, values and bookkeeping, empty slots appended (one
  copy). A sampler decodes into a short cache while few slots are filled, so each step reads fewer."""
  extra = length - cache.valid.shape[1]
  if extra < 0:
    raise ValueError(f"grow_cache: the cache has {cache.valid.shape[1]} slots, more than {length}")

  def pad(x):  # k, v: [..., S, Dh]
    return jnp.pad(x, [(0, extra if axis == x.ndim - 2 else 0) for axis in range(x.ndim)])

  return cache.replace(k=jax.tree.map(pad, cache.k), v=jax.tree.map(pad, cache.v),
                       valid=jnp.pad(cache.valid, ((0, 0), (0, extra))))


def init_cache(cfg: DecoderConfig, batch: int, length: int) -> KVCache:
  """An empty cache for ``batch`` rows and ``length`` slots, in the compute dtype."""
  shape = (batch, cfg.kv_heads, length, cfg.head_dim)
  if cfg.scan_layers:
    k = jnp.zeros((cfg.num_layers, *shape), cfg.dtype)
    v = jnp.zeros((cfg.num_layers, *shape), cfg.dtype)
  else:
    k = tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.num_layers))
    v = tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.num_layers))
  return KVCache(k=k, v=v, valid=jnp.zeros((batch, length), jnp.bool_),
                 index=jnp.zeros((), jnp.int32), next_pos=jnp.zeros((batch,), jnp.int32), fresh=True, start=0)


def positions_from_mask(mask: Array, offset: Array | None = None) -> Array:
  """Position ids [B, T]: count of real tokens before each token (pads get the previous id)."""
  pos = jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1
  if offset is not None:
    pos = pos + offset[:, None]
  return jnp.maximum(pos, 0)


def positions_from_segments(mask: Array, segments: Array) -> Array:
  """Position ids [B, T] of packed rows: count of real tokens before each token in its own segment (pads
  get the previous id, as in ``positions_from_mask``).

  segments: [B, T] int, each segment's tokens contiguous (``data.packing``); a new segment starts where the
  id changes, so its first real token gets position 0 again.
  """
  real = mask.astype(jnp.int32)
  count = jnp.cumsum(real, axis=1) - 1  # real tokens before this one (pads: as the last real token)
  before = jnp.concatenate([jnp.full_like(segments[:, :1], -1), segments[:, :-1]], axis=1)
  starts = (segments != before) & (real > 0)
  # Counts never decrease along a row, so a running max carries each segment start's count forward.
  start_count = jax.lax.cummax(jnp.where(starts, count, 0), axis=1)
  return jnp.maximum(count - start_count, 0)


def last_token_index(mask: Array) -> Array:
  """Index [B] of the last real token of each row of ``mask`` [B, T]."""
  t = mask.shape[1]
  return (t - 1 - jnp.argmax(jnp.flip(mask.astype(jnp.int32), axis=1), axis=1)).astype(jnp.int32)


class Trunk(nnx.Module):
  """Embeddings, the stack of blocks and the final norm; returns hidden states."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    init = nnx.initializers.normal(0.02)
    self.embed = layers.param(rngs, init, (cfg.vocab_size, cfg.d_model), cfg.param_dtype, ("vocab", "embed"))
    if cfg.flavour == "gpt2":
      self.pos_embed = layers.param(rngs, nnx.initializers.normal(0.01), (cfg.max_len, cfg.d_model),
                                    cfg.param_dtype, ("position", "embed"))
    if cfg.scan_layers:
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0,
                transform_metadata={nnx.PARTITION_NAME: "layers", "logical_axes": "layers"})
      def make_stack(r):
        return layers.Block(cfg, rngs=r)
      self.blocks = make_stack(rngs)
    else:
      self.blocks = nnx.List([layers.Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    norm = layers.RMSNorm if cfg.flavour == "llama" else layers.LayerNorm
    self.final_norm = norm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, rngs=rngs)

  def __call__(self, tokens: Array, mask: Array, cache: KVCache | None = None,
               dropout_key: Array | None = None, queries=None,
               shared_prefix: tuple[int, int] | None = None, segments: Array | None = None,
               branches: Array | None = None, positions: Array | None = None) -> tuple[Array, KVCache | None]:
    """tokens, mask: [B, T] -> (hidden [B, T, D], updated cache or None).

    ``queries`` (``layers.select_rows``: a static ``(start, length)`` window, one index [B] per row, or Q
    indices [B, Q] per row) returns only those rows' hidden states [B, Tq, D], the same values as selecting them from the full
    output. The last block then computes its query, attention output and MLP for those rows only
    (every token is still a key): a reward read at the last token, or log-probs and values over the
    response window, skip most of the last layer.

    ``shared_prefix`` (P, k): rows ``i*k .. i*k+k-1`` share their first P columns (the k samples of one
    left-padded prompt), so the prompt is computed once per group into a KV cache and the rest of each
    row attends to it; see ``_shared_prefix_call``.

    ``segments`` [B, T] int: packed rows (``data.packing``) holding several sequences each, with 0 on padding.
    Positions restart at each segment and a token attends within its own segment only, so every sequence
    gets the values it would get alone in a row. Not with a cache or ``shared_prefix``.

    ``branches`` [B, T] int with ``segments`` (packed comparisons, ``packing.pack_comparisons``): 0 on a
    segment's prompt, k on its k-th response; a response token attends to its prompt and its own response
    only. ``positions`` [B, T] int then gives each token's position id (a response continues its prompt's
    positions, which segments alone cannot say); default from ``mask`` and ``segments``.
    """
    cfg = self.cfg
    if segments is not None and (cache is not None or (shared_prefix is not None and shared_prefix[1] > 1)):
      raise ValueError("segments (packed rows) are for full-sequence passes: not with a KV cache or shared_prefix")
    if (branches is not None or positions is not None) and segments is None:
      raise ValueError("branches and positions describe packed rows: pass them with segments")
    if shared_prefix is not None and shared_prefix[1] > 1 and cache is None and not (
        dropout_key is not None and cfg.dropout > 0):
      return self._shared_prefix_call(tokens, mask, queries, *shared_prefix), None
    if queries is not None and ((dropout_key is not None and cfg.dropout > 0)
                                or (cache is not None and cfg.scan_layers)):
      # Dropout draws masks of the full shape: keep its randomness that of the full pass.
      hidden, cache = self(tokens, mask, cache, dropout_key, segments=segments, branches=branches,
                           positions=positions)
      return layers.select_rows(hidden, queries), cache
    b, t = tokens.shape
    mask = mask.astype(jnp.int32)
    if cache is None:
      if positions is None:
        positions = positions_from_mask(mask) if segments is None else positions_from_segments(mask, segments)
      q_slots = jnp.arange(t)
      key_valid = mask.astype(bool)
      cache_index = None
    else:
      positions = positions_from_mask(mask, cache.next_pos)
      q_slots = cache.index + jnp.arange(t)
      key_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, mask.astype(bool), cache.index, axis=1)
      cache_index = cache.index
    fresh = cache is not None and cache.fresh
    first_slot = 0 if cache is None else cache.start
    # Gather, then cast: casting the whole table first costs a [V, D] pass per call (per decode step).
    x = self.embed[...][tokens].astype(cfg.dtype)
    if cfg.flavour == "gpt2":
      x = x + self.pos_embed[...][jnp.minimum(positions, cfg.max_len - 1)].astype(cfg.dtype)
    x = layers.dropout(x, cfg.dropout, None if dropout_key is None else jax.random.fold_in(dropout_key, cfg.num_layers))
    layer_keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.num_layers)

    def apply_block(graphdef, state, x, ckv, key, block_queries=None):
      def run(state, x, ckv, key):
        block = nnx.merge(graphdef, state)
        return block(x, positions, q_slots, key_valid, ckv, cache_index, key, block_queries, fresh, segments,
                     branches, first_slot)

      return (jax.checkpoint(run) if cfg.remat else run)(state, x, ckv, key)

    new_k = new_v = None
    if cfg.scan_layers:
      graphdef, stacked = nnx.split(self.blocks)
      if cache is None:
        def body(h, xs):
          state, key = xs
          return apply_block(graphdef, state, h, None, key)[0], None

        if queries is None:
          x, _ = jax.lax.scan(body, x, (stacked, layer_keys))
        else:
          # All layers but the last in the scan; the last one on the query rows only.
          lower = jax.tree.map(lambda a: a[:-1], (stacked, layer_keys))
          x, _ = jax.lax.scan(body, x, lower)
          last_state = jax.tree.map(lambda a: a[-1], stacked)
          x = apply_block(graphdef, last_state, x, None, None if layer_keys is None else layer_keys[-1], queries)[0]
      else:
        # The whole cache rides in the carry and each layer writes its slice back in place; scanning
        # over it as xs/ys would rebuild the stacked cache every decode step.
        def body(carry, xs):
          h, ck, cv, i = carry
          state, key = xs
          ckv = (jax.lax.dynamic_index_in_dim(ck, i, keepdims=False),
                 jax.lax.dynamic_index_in_dim(cv, i, keepdims=False))
          h, (lk, lv) = apply_block(graphdef, state, h, ckv, key)
          ck = jax.lax.dynamic_update_index_in_dim(ck, lk, i, axis=0)
          cv = jax.lax.dynamic_update_index_in_dim(cv, lv, i, axis=0)
          return (h, ck, cv, i + 1), None

        (x, new_k, new_v, _), _ = jax.lax.scan(body, (x, cache.k, cache.v, jnp.zeros((), jnp.int32)),
                                               (stacked, layer_keys))
    else:
      ks, vs = [], []
      for i, block in enumerate(self.blocks):
        graphdef, state = nnx.split(block)
        ckv = None if cache is None else cache.layer(i)
        x, ckv = apply_block(graphdef, state, x, ckv, None if layer_keys is None else layer_keys[i],
                             queries if i == cfg.num_layers - 1 else None)
        if ckv is not None:
          ks.append(ckv[0])
          vs.append(ckv[1])
      if cache is not None:
        new_k, new_v = tuple(ks), tuple(vs)
    x = self.final_norm(x)
    new_cache = None
    if cache is not None:
      new_cache = KVCache(k=new_k, v=new_v, valid=key_valid, index=cache.index + t,
                          next_pos=cache.next_pos + mask.sum(axis=1))
    return x, new_cache

  def _shared_prefix_call(self, tokens: Array, mask: Array, queries, prompt_len: int, k: int) -> Array:
    """``self(tokens, mask, queries=queries)`` [B, Tq, D] with the prompt columns [0, P) computed once per
    group of k rows (they must hold the same tokens and mask in each group, P >= 1).

    The group's prompt is prefilled into a KV cache, the cache repeated k times, and columns [P, T) run
    against it as a chunk, as the sampler decodes: the same attention, positions and values as the full
    pass up to float rounding, for (1 - 1/k) less of the prompt's compute. Gradients flow through both
    halves (the repeat's backward sums the k rows' prompt gradients). ``queries`` may ask for rows
    >= P - 1 only (a window starting there, or per-row indices; an index before P - 1 reads row P - 1,
    the last prompt column, which is real in a left-padded prompt); anything else runs the full pass.
    """
    b, t = tokens.shape
    p = prompt_len
    if b % k or not 0 < p < t:
      raise ValueError(f"shared_prefix=({p}, {k}) does not fit tokens of shape {tokens.shape}")
    window = isinstance(queries, tuple)
    if window and queries[0] < p - 1:
      return self(tokens, mask, queries=queries)[0]
    cache = init_cache(self.cfg, b // k, t)
    head, cache = self(tokens[::k, :p], mask[::k, :p], cache, queries=None if queries is None else (p - 1, 1))
    cache = cache.repeat_rows(k).replace(start=p)  # the tail's slots are known: it attends in query blocks
    head = jnp.repeat(head, k, axis=0)  # [B, P or 1, D]
    if queries is None:
      tail, _ = self(tokens[:, p:], mask[:, p:], cache)
      return jnp.concatenate([head, tail], axis=1)
    if window:
      start, length = queries
      tail_start = max(start, p) - p
      tail_len = start + length - p - tail_start
      parts = [head] if start == p - 1 else []
      if tail_len > 0:
        parts.append(self(tokens[:, p:], mask[:, p:], cache, queries=(tail_start, tail_len))[0])
      return jnp.concatenate(parts, axis=1)
    tail, _ = self(tokens[:, p:], mask[:, p:], cache, queries=jnp.maximum(queries - p, 0))
    return jnp.where((queries >= p)[:, None, None], tail, head)


class Decoder(nnx.Module):
  """Language model: trunk plus an output projection (tied to the embedding for GPT-2)."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.trunk = Trunk(cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = layers.param(rngs, nnx.initializers.normal(1.0 / math.sqrt(cfg.d_model)),
                                  (cfg.d_model, cfg.vocab_size), cfg.param_dtype, ("embed", "vocab"))

  def logits_from_hidden(self, hidden: Array) -> Array:
    """hidden [..., D] -> logits [..., V], computed in float32 whatever the compute dtype.

    The head runs in float32 because bf16 logits lose ~2 digits of every log-prob (PPO ratios,
    KL and the sampler's log-probs all read them). With ``matmul_dtype`` set its operands are rounded to
    that dtype like every weight product's, and it still accumulates and returns float32.
    """
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1]).astype(jnp.float32)
    if self.cfg.matmul_dtype is not None:
      table, axis = (self.trunk.embed[...], 1) if self.cfg.tie_embeddings else (self.lm_head[...], 0)
      return mixed_matmul(h, table, self.cfg.matmul_dtype, jnp.float32, w_contracting=axis).reshape(*lead, -1)
    if self.cfg.tie_embeddings:
      # Contract on the embedding's D axis directly: no transposed [D, V] copy of the table.
      out = jax.lax.dot_general(h, self.trunk.embed[...].astype(jnp.float32), (((1,), (1,)), ((), ())))
    else:
      out = h @ self.lm_head[...].astype(jnp.float32)
    return out.reshape(*lead, -1)

  def __call__(self, tokens: Array, mask: Array, cache: KVCache | None = None,
               dropout_key: Array | None = None, segments: Array | None = None) -> tuple[Array, KVCache | None]:
    """tokens, mask: [B, T] -> (logits [B, T, V] float32, updated cache or None); ``segments``: packed
    rows (see ``Trunk``)."""
    hidden, cache = self.trunk(tokens, mask, cache, dropout_key, segments=segments)
    return self.logits_from_hidden(hidden), cache


class ScalarModel(nnx.Module):
  """Trunk plus a scalar head: a reward model (read at the last real token) or a value model.

  ``head_std`` 0 gives a zero-initialised head (the usual value-model choice);
  the reward-model default is N(0, 1/sqrt(d_model + 1)).
  """

  def __init__(self, cfg: DecoderConfig, head_std: float, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.trunk = Trunk(cfg, rngs=rngs)
    init = nnx.initializers.zeros if head_std == 0 else nnx.initializers.normal(head_std)
    self.head = layers.param(rngs, init, (cfg.d_model,), cfg.param_dtype, ("embed",))
    self.head_bias = layers.param(rngs, nnx.initializers.zeros, (), cfg.param_dtype, ())

  def values(self, tokens: Array, mask: Array, dropout_key: Array | None = None, queries=None,
             shared_prefix: tuple[int, int] | None = None, segments: Array | None = None,
             branches: Array | None = None, positions: Array | None = None) -> Array:
    """Scalar output at every token: [B, T] float32 (at the ``queries`` rows only: [B, Tq]; see ``Trunk``
    for ``queries``, ``shared_prefix`` and the packed rows' ``segments``, ``branches`` and ``positions``)."""
    hidden, _ = self.trunk(tokens, mask, None, dropout_key, queries, shared_prefix, segments, branches, positions)
    out = hidden.astype(jnp.float32) @ self.head[...].astype(jnp.float32)
    return out + self.head_bias[...].astype(jnp.float32)

  def __call__(self, tokens: Array, mask: Array, dropout_key: Array | None = None,
               shared_prefix: tuple[int, int] | None = None) -> Array:
    """Reward [B] float32: the scalar output at the last real token of each row."""
    return self.values(tokens, mask, dropout_key, queries=last_token_index(mask), shared_prefix=shared_prefix)[:, 0]


def reward_head_std(cfg: DecoderConfig) -> float:
  """The RLHF-literature reward head init scale 1/sqrt(d_model + 1)."""
  return 1.0 / math.sqrt(cfg.d_model + 1)
