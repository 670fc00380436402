"""Transformer building blocks with logical axis names on every parameter.

Every parameter is an ``nnx.Param`` carrying ``logical_axes`` metadata (one
name per dimension); ``rlhf_jax.sharding`` maps those names to mesh axes.
Randomness for dropout is passed explicitly as a key so that steps stay pure.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.mixed_matmul import heads_major, mixed_batched_matmul, mixed_matmul

Array = jax.Array

# Causal attention over long rows runs in at most this many query blocks (``causal_blocks``): more would
# add products (and compile time) for little: n blocks already skip (n - 1) / 2n of the scores.
MAX_ATTENTION_BLOCKS = 16


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], dtype, axes: tuple[str | None, ...]) -> nnx.Param:
  """Creates an ``nnx.Param`` from ``init(key, shape, dtype)`` tagged with logical axes."""
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {axes} do not match shape {shape}")
  return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=tuple(axes))


def dropout(x: Array, rate: float, key: Array | None) -> Array:
  """Inverted dropout; identity when ``key`` is None or ``rate`` is 0."""
  if key is None or rate <= 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias (GPT-2)."""

  def __init__(self, dim: int, eps: float, param_dtype, *, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = param(rngs, nnx.initializers.ones, (dim,), param_dtype, ("norm",))
    self.bias = param(rngs, nnx.initializers.zeros, (dim,), param_dtype, ("norm",))

  def __call__(self, x: Array) -> Array:
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm with a scale (Llama)."""

  def __init__(self, dim: int, eps: float, param_dtype, *, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = param(rngs, nnx.initializers.ones, (dim,), param_dtype, ("norm",))

  def __call__(self, x: Array) -> Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: tuple = ()) -> Array:
  """RoPE's inverse frequencies [head_dim // 2], float32.

  ``scaling`` stretches them for a longer context: ("linear", factor) divides all by ``factor``;
  ("llama3", factor, low_freq_factor, high_freq_factor, original_max_len) is Llama 3.1's rule: wavelengths
  above ``original_max_len / low_freq_factor`` are divided by ``factor``, those below
  ``original_max_len / high_freq_factor`` kept, and the band between interpolated.
  ("yarn", factor, original_max_len, beta_fast, beta_slow, attention_factor, truncate) is YaRN: dims that turn
  more than ``beta_fast`` times over ``original_max_len`` positions are kept, those turning fewer than
  ``beta_slow`` times divided by ``factor``, with a linear ramp between (its ends rounded outwards when
  ``truncate``); ``rope`` also multiplies cos and sin by ``attention_factor``.
  """
  half = head_dim // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  if not scaling:
    return freq
  factor = float(scaling[1])
  if scaling[0] == "linear":
    return freq / factor
  if scaling[0] == "yarn":
    return _yarn_frequencies(freq, head_dim, theta, scaling)
  low, high, original = (float(v) for v in scaling[2:])
  wavelen = 2 * math.pi / freq
  scaled = jnp.where(wavelen > original / low, freq / factor, freq)
  smooth = (original / wavelen - low) / (high - low)
  medium = (wavelen >= original / high) & (wavelen <= original / low)
  return jnp.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def _yarn_frequencies(freq: Array, head_dim: int, theta: float, scaling: tuple) -> Array:
  """YaRN's blend of ``freq`` (extrapolated) and ``freq / factor`` (interpolated); see ``rope_frequencies``."""
  factor, original, beta_fast, beta_slow, _, truncate = scaling[1:]

  def dim_turning(turns: float) -> float:  # the (fractional) dim index whose wave turns ``turns`` times
    return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

  low, high = dim_turning(beta_fast), dim_turning(beta_slow)
  if truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001  # transformers' guard against a zero-width ramp
  ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
  return freq / factor * ramp + freq * (1 - ramp)


def rope(x: Array, positions: Array, theta: float, scaling: tuple = ()) -> Array:
  """Rotary position embedding. x: [B, T, N, Dh], positions: [B, T] int; ``scaling``: see ``rope_frequencies``."""
  half = x.shape[-1] // 2
  freq = rope_frequencies(x.shape[-1], theta, scaling)
  angles = positions.astype(jnp.float32)[..., None] * freq  # [B, T, half]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  if scaling and scaling[0] == "yarn":
    sin, cos = sin * scaling[5], cos * scaling[5]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., :half], xf[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_mask(q_slots: Array, k_slots: Array, key_valid: Array, q_segments: Array | None = None,
                   k_segments: Array | None = None, q_branches: Array | None = None,
                   k_branches: Array | None = None) -> Array:
  """Causal, padding-aware mask [B, 1, 1, Tq, S]: query slot i may see key slot j <= i that is real.

  q_slots: [Tq] (the same for every row) or [B, Tq]. ``q_segments`` [B, Tq] and ``k_segments`` [B, S]
  (packed rows, ``data.packing``): a query sees only keys of its own segment. ``q_branches`` [B, Tq] and
  ``k_branches`` [B, S] (packed comparisons: 0 on an example's prompt, k on its k-th response): a query
  sees its segment's prompt and its own branch only, so the responses of one prompt never see each other.
  """
  if q_slots.ndim == 1:
    causal = (k_slots[None, :] <= q_slots[:, None])[None]  # [1, Tq, S]
  else:
    causal = k_slots[None, None, :] <= q_slots[:, :, None]  # [B, Tq, S]
  allowed = causal & key_valid[:, None, :].astype(bool)
  if q_segments is not None:
    allowed = allowed & (q_segments[:, :, None] == k_segments[:, None, :])
  if q_branches is not None:
    allowed = allowed & ((k_branches[:, None, :] == 0) | (q_branches[:, :, None] == k_branches[:, None, :]))
  return allowed[:, None, None]


def select_rows(x: Array, queries) -> Array:
  """The query rows of x [B, T, ...] -> [B, Tq, ...].

  queries: None (all T rows), a static ``(start, length)`` window, an int array [B] (one row per
  sequence, e.g. its last real token) or [B, Q] (Q rows per sequence, e.g. the last tokens of the responses
  packed into it).
  """
  if queries is None:
    return x
  if isinstance(queries, tuple):
    start, length = queries
    return x[:, start:start + length]
  return jnp.take_along_axis(x, queries.reshape(queries.shape[0], -1, *([1] * (x.ndim - 2))), axis=1)


def select_slots(q_slots: Array, queries) -> Array:
  """``select_rows`` for the query slots [T] -> [Tq] (window) or [B, Q] (Q = 1 for [B] queries)."""
  if queries is None:
    return q_slots
  if isinstance(queries, tuple):
    start, length = queries
    return q_slots[start:start + length]
  return q_slots[queries].reshape(queries.shape[0], -1)


def rounded(x: Array, dtype) -> Array:
  """x rounded to ``dtype`` and kept in its own dtype (x itself for ``dtype`` None)."""
  return x if dtype is None else x.astype(dtype).astype(x.dtype)


def dense(x: Array, w: Array, dtype, matmul_dtype=None) -> Array:
  """x [..., Din] @ w [Din, ...] -> [..., *w.shape[1:]] as one 2-D matmul, returned in ``dtype``.

  ``matmul_dtype`` None: the product runs in ``dtype``. Else its operands are rounded to ``matmul_dtype``
  and it accumulates in float32 (``mixed_matmul``), forward and backward.
  Flattening leading and trailing dims to a plain [N, Din] @ [Din, Dout] product matters on CPU:
  XLA's backward of the batched 3-D/4-D einsum form was about 2x slower than the 2-D one.
  """
  lead, din, tail = x.shape[:-1], x.shape[-1], w.shape[1:]
  x2, w2 = x.reshape(-1, din), w.reshape(din, -1)
  if matmul_dtype is None:
    y = x2.astype(dtype) @ w2.astype(dtype)
  else:
    y = mixed_matmul(x2, w2, matmul_dtype, dtype)
  return y.reshape(*lead, *tail)


class Attention(nnx.Module):
  """Multi-head (GPT-2) or grouped-query (Llama) attention with an optional KV cache; q/k/v biases for GPT-2
  and ``qkv_bias`` (Qwen2), an output bias for GPT-2 only."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim
    init = nnx.initializers.normal(0.02)
    out_init = nnx.initializers.normal(0.02 / math.sqrt(2 * cfg.num_layers))
    pd = cfg.param_dtype
    self.cfg = cfg
    self.wq = param(rngs, init, (d, h, hd), pd, ("embed", "heads", "head_dim"))
    self.wk = param(rngs, init, (d, kv, hd), pd, ("embed", "kv_heads", "head_dim"))
    self.wv = param(rngs, init, (d, kv, hd), pd, ("embed", "kv_heads", "head_dim"))
    self.wo = param(rngs, out_init, (h, hd, d), pd, ("heads", "head_dim", "embed"))
    zeros = nnx.initializers.zeros
    if cfg.use_bias or cfg.qkv_bias:
      self.bq = param(rngs, zeros, (h, hd), pd, ("heads", "head_dim"))
      self.bk = param(rngs, zeros, (kv, hd), pd, ("kv_heads", "head_dim"))
      self.bv = param(rngs, zeros, (kv, hd), pd, ("kv_heads", "head_dim"))
    if cfg.use_bias:
      self.bo = param(rngs, zeros, (d,), pd, ("embed",))

  def __call__(self, x: Array, positions: Array, q_slots: Array, key_valid: Array,
               cache_kv: tuple[Array, Array] | None, cache_index: Array | None,
               queries=None, fresh_cache: bool = False, segments: Array | None = None,
               branches: Array | None = None, first_slot: int | None = 0) -> tuple[Array, tuple[Array, Array] | None]:
    """x: [B, T, D]; positions: [B, T]; q_slots: [T] slot of each token.

    Without a cache, keys are this call's tokens and ``key_valid`` is [B, T].
    With a cache (k, v: [B, KV, S, Dh], heads before slots so that the score and mix products read
    them without a relayout) the new keys are written in place at slot ``cache_index`` and
    ``key_valid`` is the cache's [B, S] validity *after* this write. ``fresh_cache``: the cache held nothing
    before this call (``cache_index`` is 0), so the queries attend to this call's T keys only (slots
    [0, T); the rest of the cache is empty) instead of reading all S slots: a prefill into a cache sized
    for the whole sequence.
    ``queries`` (see ``select_rows``): only those rows are queried; the output is [B, Tq, D]. Every
    token is still a key. ``segments`` [B, T] (no cache): packed rows, each token attends within its own
    segment only; ``branches`` [B, T] with them: packed comparisons (see ``attention_mask``).
    ``first_slot`` (static): the key slot of this call's first token when known (0 without a cache or
    with a fresh one; a cache's ``start``), None when not (a decode step): known, long calls attend in
    query blocks (``causal_blocks``).
    """
    cfg = self.cfg
    dt = cfg.dtype
    xq = select_rows(x, queries)
    q = dense(xq, self.wq[...], dt, cfg.matmul_dtype)  # [B, Tq, H, Dh]
    k = dense(x, self.wk[...], dt, cfg.matmul_dtype)  # [B, T, KV, Dh]
    v = dense(x, self.wv[...], dt, cfg.matmul_dtype)
    if cfg.use_bias or cfg.qkv_bias:
      q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
    if cfg.flavour == "llama":
      q = rope(q, select_rows(positions, queries), cfg.rope_theta, cfg.rope_scaling)
      k = rope(k, positions, cfg.rope_theta, cfg.rope_scaling)
    q_slots = select_slots(q_slots, queries)
    b, t, h, hd = q.shape
    kvh = k.shape[2]
    t_keys = k.shape[1]
    mm = cfg.matmul_dtype
    q_segments = None if segments is None else select_rows(segments, queries)
    q_branches = None if branches is None else select_rows(branches, queries)
    if cfg.attention_impl != "xla" and cache_kv is None:
      mask = attention_mask(q_slots, jnp.arange(t_keys), key_valid, q_segments, segments, q_branches, branches)
      out = fused_attention(q, k, v, mask[:, 0], cfg.attention_impl, mm, causal=queries is None)
      return self._project_out(out.reshape(b, t, h * hd)), None
    # With matmul_dtype the score and mix products round their operands too: as bf16 products with float32
    # sums where there are several queries per row, else in the compute dtype on rounded operands (the
    # same sums; at one query per row, a decode step, XLA:CPU widens bf16 products and they run slower).
    mixed = mm if mm is not None and t > 1 else None
    k, v = (heads_major(k), heads_major(v)) if mixed else (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
    new_cache = None
    if cache_kv is not None:
      ck, cv = cache_kv
      # The cache holds keys and values rounded as the products read them.
      ck = jax.lax.dynamic_update_slice_in_dim(ck, rounded(k, mm).astype(ck.dtype), cache_index, axis=2)
      cv = jax.lax.dynamic_update_slice_in_dim(cv, rounded(v, mm).astype(cv.dtype), cache_index, axis=2)
      new_cache = (ck, cv)
      if fresh_cache:
        key_valid = key_valid[:, :t_keys]
      else:
        k, v = ck.astype(dt), cv.astype(dt)
    if mixed is None and (cache_kv is None or fresh_cache):
      k, v = rounded(k, mm), rounded(v, mm)
    # Queries grouped by their KV head: [B, KV, G, T, Dh] (G = H / KV), one batched product per KV head.
    q = q.reshape(b, t, kvh, h // kvh, hd).transpose(0, 2, 3, 1, 4)
    # Where the queries' slots are known statically, blocks of queries skip the keys after their last slot.
    # Others (a decode step, rows picked by index) take one product.
    q_start = None
    if first_slot is not None:
      q_start = first_slot if queries is None else first_slot + queries[0] if isinstance(queries, tuple) else None
    blocks = causal_blocks(t, k.shape[2], q_start, cfg.attention_block)
    if len(blocks) == 1:
      mask = attention_mask(q_slots, jnp.arange(k.shape[2]), key_valid, q_segments, segments, q_branches, branches)
      out = _attend(q, k, v, mask, dt, mm, mixed)
    else:
      outs = []
      for r0, r1, n in blocks:
        mask = attention_mask(q_slots[r0:r1], jnp.arange(n), key_valid[:, :n],
                              *_sliced(q_segments, segments, r0, r1, n), *_sliced(q_branches, branches, r0, r1, n))
        outs.append(_attend(q[:, :, :, r0:r1], k[:, :, :n], v[:, :, :n], mask, dt, mm, mixed))
      out = jnp.concatenate(outs, axis=3)  # [B, KV, G, T, Dh]
    return self._project_out(out.transpose(0, 3, 1, 2, 4).reshape(b, t, h * hd)), new_cache

  def _project_out(self, out: Array) -> Array:
    """The heads' outputs [B, T, H * Dh] -> [B, T, D] (``wo``, and ``bo`` for GPT-2)."""
    cfg = self.cfg
    y = dense(out, self.wo[...].reshape(out.shape[-1], -1), cfg.dtype, cfg.matmul_dtype)
    if cfg.use_bias:
      y = y + self.bo[...].astype(cfg.dtype)
    return y


def causal_blocks(t: int, keys: int, q_start: int | None, block: int) -> list[tuple[int, int, int]]:
  """How causal attention splits its T query rows: ``(r0, r1, n)`` per block, query rows [r0, r1) against keys
  [0, n).

  The queries sit at key slots ``q_start .. q_start + T - 1`` (``None``: unknown, e.g. a decode step's), so
  a block's queries need no key after ``q_start + r1 - 1``: the masked triangle above the diagonal is
  skipped. Blocks are ``block`` rows (``model.attention_block``), more when that would make over
  ``MAX_ATTENTION_BLOCKS``; one block ``[(0, T, keys)]`` when ``block`` is 0, the slots are unknown or T < 2 *
  ``block``.
  """
  if not block or q_start is None or t < 2 * block:
    return [(0, t, keys)]
  block = max(block, -(-t // MAX_ATTENTION_BLOCKS))
  return [(r0, min(r0 + block, t), min(keys, q_start + min(r0 + block, t))) for r0 in range(0, t, block)]


def _sliced(q_ids: Array | None, k_ids: Array | None, r0: int, r1: int, n: int) -> tuple:
  """Per-token ids of a query block's rows [r0, r1) and of its keys [0, n) (None stays None)."""
  return (None, None) if q_ids is None else (q_ids[:, r0:r1], k_ids[:, :n])


# model.attention_impl: "xla" is ``_attend`` (query blocks, mixed products); the others call
# ``jax.nn.dot_product_attention`` with this implementation (None: JAX's own XLA path, "cudnn": cuDNN's fused
# flash attention, GPU only) for passes without a KV cache.
ATTENTION_IMPLS = {"xla": None, "jax": None, "cudnn": "cudnn"}


def fused_attention(q: Array, k: Array, v: Array, mask: Array, impl: str, matmul_dtype=None,
                    causal: bool = False) -> Array:
  """Masked softmax attention through ``jax.nn.dot_product_attention``: q [B, Tq, H, Dh], k, v [B, S, KV, Dh]
  (H a multiple of KV), mask [B, 1, Tq, S] bool -> [B, Tq, H, Dh] in q's dtype.

  ``impl``: a ``model.attention_impl`` other than "xla". ``matmul_dtype``: the products' operand dtype (cuDNN
  takes only 16-bit operands: bfloat16 or float16 here or as the compute dtype). ``causal``: the query rows
  are key slots 0..Tq-1 (a pass over all its tokens), so cuDNN may skip the blocks above the diagonal; the mask
  says it too. A query row that sees no key (padding) attends to every key, as ``_attend``'s does, so no row
  is NaN in the pass or its gradient.
  """
  mask = mask | ~mask.any(axis=-1, keepdims=True)
  out_dtype = q.dtype
  if matmul_dtype is not None:
    q, k, v = (x.astype(matmul_dtype) for x in (q, k, v))
  if impl == "cudnn":
    if jax.default_backend() != "gpu":
      raise ValueError(f"model.attention_impl='cudnn' needs a GPU backend, not {jax.default_backend()!r}")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"model.attention_impl='cudnn' takes bfloat16 or float16 operands: set model.dtype or "
                       f"model.matmul_dtype to one (got {q.dtype})")
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=ATTENTION_IMPLS[impl])
  return out.astype(out_dtype)


def _attend(q: Array, k: Array, v: Array, mask: Array, dt, mm, mixed) -> Array:
  """Masked softmax attention of q [B, KV, G, Tq, Dh] over k, v [B, KV, S, Dh] with ``mask`` [B, 1, 1, Tq, S]
  -> [B, KV, G, Tq, Dh] in ``dt``. ``mm``: operands rounded to it; ``mixed``: products through
  ``mixed_batched_matmul`` in that dtype (else einsums in the compute dtype)."""
  b, kvh, g, t, hd = q.shape
  q = q.reshape(b, kvh, g * t, hd)
  if mixed is None:
    scores = jnp.einsum("bkqd,bksd->bkqs", rounded(q, mm), k).astype(jnp.float32)
  else:
    scores = mixed_batched_matmul(q, k, mixed, jnp.float32, b_contracting=-1)
  scores = (scores / math.sqrt(hd)).reshape(b, kvh, g, t, -1)
  # A finite fill keeps fully-masked rows (pad queries) NaN-free.
  scores = jnp.where(mask, scores, -1e9)
  probs = jax.nn.softmax(scores, axis=-1).astype(dt).reshape(b, kvh, g * t, -1)
  if mixed is None:
    out = jnp.einsum("bkqs,bksd->bkqd", rounded(probs, mm), v)
  else:
    out = mixed_batched_matmul(probs, v, mixed, dt)
  return out.reshape(b, kvh, g, t, hd)


class MLP(nnx.Module):
  """GELU MLP (GPT-2) or SwiGLU (Llama)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d, f, pd = cfg.d_model, cfg.d_ff, cfg.param_dtype
    init = nnx.initializers.normal(0.02)
    out_init = nnx.initializers.normal(0.02 / math.sqrt(2 * cfg.num_layers))
    self.cfg = cfg
    self.w_in = param(rngs, init, (d, f), pd, ("embed", "mlp"))
    if cfg.flavour == "llama":
      self.w_gate = param(rngs, init, (d, f), pd, ("embed", "mlp"))
    self.w_out = param(rngs, out_init, (f, d), pd, ("mlp", "embed"))
    if cfg.use_bias:
      self.b_in = param(rngs, nnx.initializers.zeros, (f,), pd, ("mlp",))
      self.b_out = param(rngs, nnx.initializers.zeros, (d,), pd, ("embed",))

  def __call__(self, x: Array) -> Array:
    dt = self.cfg.dtype
    h = dense(x, self.w_in[...], dt, self.cfg.matmul_dtype)
    if self.cfg.use_bias:
      h = h + self.b_in[...].astype(dt)
    if self.cfg.flavour == "llama":
      h = jax.nn.silu(dense(x, self.w_gate[...], dt, self.cfg.matmul_dtype)) * h
    else:
      h = jax.nn.gelu(h, approximate=True)
    y = dense(h, self.w_out[...], dt, self.cfg.matmul_dtype)
    if self.cfg.use_bias:
      y = y + self.b_out[...].astype(dt)
    return y


class Block(nnx.Module):
  """Pre-norm transformer block."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    norm = RMSNorm if cfg.flavour == "llama" else LayerNorm
    self.cfg = cfg
    self.norm_attn = norm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.norm_mlp = norm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, positions, q_slots, key_valid, cache_kv, cache_index, dropout_key, queries=None,
               fresh_cache: bool = False, segments: Array | None = None, branches: Array | None = None,
               first_slot: int | None = 0):
    """Returns (x of the ``queries`` rows [B, Tq, D], updated layer cache or None); see ``Attention``."""
    k1, k2 = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
    a, new_cache = self.attn(self.norm_attn(x), positions, q_slots, key_valid, cache_kv, cache_index, queries,
                             fresh_cache, segments, branches, first_slot)
    x = select_rows(x, queries) + dropout(a, self.cfg.dropout, k1)
    x = x + dropout(self.mlp(self.norm_mlp(x)), self.cfg.dropout, k2)
    return x, new_cache
