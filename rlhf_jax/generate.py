"""Sampling from a decoder with a preallocated KV cache, in one compiled function.

Prompts are left-padded rows [B, P] with a mask. The prompt is prefilled in
one forward pass, then tokens are decoded one at a time inside
``lax.while_loop``s that stop after ``max_new_tokens`` or, with
``stop_at_eos``, once every row has produced EOS. Long generations decode in
phases, each with a cache only as long as it needs (``models.decoder.decode_cache_lengths``).
Responses come back right-padded: after a row's EOS its tokens are ``pad_id``
and its mask is 0.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from rlhf_jax.decode_layout import DecodeLayout
from rlhf_jax.models import Decoder, init_cache
from rlhf_jax.models.decoder import decode_cache_lengths, grow_cache

Array = jax.Array


SAMPLING_METHODS = ("inverse_cdf", "gumbel")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to sample: ``temperature`` 0 or ``greedy`` picks the argmax; ``top_k`` 0 and ``top_p`` 1 are off.

  ``method`` draws from the same distribution either way: ``"inverse_cdf"`` (one uniform per row; the
  fastest on CPU) or ``"gumbel"`` (Gumbel-max, V uniforms per row). A token of inverse-CDF sampling flips
  when float noise moves any CDF boundary past the row's uniform, Gumbel-max only at a near tie of the top
  candidates, so runs on different meshes or hardware agree far more often with ``"gumbel"``.
  """

  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  stop_at_eos: bool = True
  eos_id: int = 3
  pad_id: int = 0
  method: str = "inverse_cdf"

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"sampling.top_k must be >= 0, got {self.top_k}")
    if self.method not in SAMPLING_METHODS:
      raise ValueError(f"sampling.method must be one of {SAMPLING_METHODS}, got {self.method!r}")

  @property
  def is_greedy(self) -> bool:
    return self.greedy or self.temperature == 0.0


@struct.dataclass
class Sample:
  """Sampled responses: tokens, log-probs and mask, each [B, N] (N = max_new_tokens)."""

  tokens: Array
  log_probs: Array
  mask: Array


def _order_keys(x: Array) -> Array:
  """uint32 keys [..., V] ordered as the float32 values x (-inf lowest; x must hold no NaN)."""
  u = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.where(u >> 31 == 1, ~u, u | jnp.uint32(1 << 31))


def _cut_key(keys: Array, weights: Array, budget: float) -> Array:
  """Per row of keys [R, V] (``_order_keys``) the smallest t with sum(weights[keys > t]) < budget -> [R, 1].

  Keeping the entries with keys >= t keeps exactly those whose strictly larger entries weigh less than the
  budget: top-k with unit weights and budget k, top-p with probabilities and budget p, ties at the cut kept.
  Found by 32 bisection steps over the key range, each one masked sum over the row; a sort (``jax.lax.top_k``,
  ``jnp.sort``) of every row costs XLA:CPU 15-20x more per decode step.
  """
  lo = jnp.min(keys, axis=-1) - 1  # the whole row weighs >= budget above it
  hi = jnp.max(keys, axis=-1)  # nothing is above it

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    heavy = jnp.sum(jnp.where(keys > mid[:, None], weights, 0.0), axis=-1) >= budget
    return jnp.where(heavy, mid, lo), jnp.where(heavy, hi, mid)

  _, hi = jax.lax.fori_loop(0, 32, halve, (lo, hi), unroll=True)
  return hi[:, None]


def sampling_logits(logits: Array, cfg: SamplingConfig) -> Array:
  """Float32 logits [..., V] of the distribution sampled from: temperature, then top-k, then top-p.

  Tokens cut by top-k/top-p get -inf. Top-k keeps the tokens with fewer than k tokens strictly above them
  (ties at the k-th logit stay); top-p those whose strictly more likely tokens (under the top-k
  distribution) hold less than p of the mass, so the top token always stays. Greedy decoding returns the
  model's own (temperature 1) logits.
  """
  logits = logits.astype(jnp.float32)
  if cfg.is_greedy:
    return logits
  logits = logits / cfg.temperature
  shape = logits.shape
  if cfg.top_k and cfg.top_k < shape[-1]:
    flat = logits.reshape(-1, shape[-1])
    keys = _order_keys(flat)
    flat = jnp.where(keys < _cut_key(keys, jnp.ones_like(flat), cfg.top_k), -jnp.inf, flat)
    logits = flat.reshape(shape)
  if cfg.top_p < 1.0:
    flat = logits.reshape(-1, shape[-1])
    keys = _order_keys(flat)
    flat = jnp.where(keys < _cut_key(keys, jax.nn.softmax(flat, axis=-1), cfg.top_p), -jnp.inf, flat)
    logits = flat.reshape(shape)
  return logits


def sampling_log_probs(logits: Array, cfg: SamplingConfig) -> Array:
  """Log-probs [..., V] of the distribution sampled from (see ``sampling_logits``)."""
  return jax.nn.log_softmax(sampling_logits(logits, cfg), axis=-1)


def _last_positive(x: Array) -> Array:
  """Index [B] of the last entry > 0 of each row of x [B, N] (0 if none)."""
  n = x.shape[-1]
  return (n - 1 - jnp.argmax(jnp.flip(x > 0, axis=-1), axis=-1)).astype(jnp.int32)


def inverse_cdf_sample(key: Array, logits: Array) -> tuple[Array, Array]:
  """One token per row of float32 logits [B, V] (-inf = never drawn) by inverting the row's CDF
  -> (token [B] int32, its log-prob [B] float32).

  Needs one uniform per row, where Gumbel-max (``jax.random.categorical``) needs V: on CPU the
  [B, V] random bits cost about as much as a decode step's matmuls. The CDF is searched in two levels,
  blocks of ~sqrt(V) tokens and then one block, so no [B, V] cumulative sum is formed (XLA:CPU lowers
  one to a reduce-window that cost more than the rest of the sampling together). A token of probability
  0 is never drawn: each level's pick is clamped to its last entry of positive mass, which only matters
  when rounding puts the uniform past a level's total.
  """
  b, v = logits.shape
  block = 1 << max(0, round(math.log2(math.sqrt(v))))
  nb = -(-v // block)
  top = jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.exp(logits - top)  # unnormalised probabilities, in [0, 1]
  weights = jnp.pad(weights, ((0, 0), (0, nb * block - v))).reshape(b, nb, block)
  block_mass = weights.sum(-1)  # [B, nb]
  block_cdf = jnp.cumsum(block_mass, axis=-1)
  total = block_cdf[:, -1]
  u = jax.random.uniform(key, (b,), jnp.float32) * total
  j = jnp.minimum(jnp.sum(block_cdf <= u[:, None], axis=-1).astype(jnp.int32), _last_positive(block_mass))
  before = jnp.where(j > 0, jnp.take_along_axis(block_cdf, jnp.maximum(j - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
  inside = jnp.take_along_axis(weights, j[:, None, None], axis=1)[:, 0]  # [B, block]
  k = jnp.sum(jnp.cumsum(inside, axis=-1) <= (u - before)[:, None], axis=-1).astype(jnp.int32)
  token = j * block + jnp.minimum(k, _last_positive(inside))
  log_prob = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0] - top[:, 0] - jnp.log(total)
  return token, log_prob


def fitting_group(prompt_group: int, rows: int) -> int:
  """``prompt_group`` if it divides ``rows``, else 1 (a batch padded to fit a mesh can break the groups)."""
  return prompt_group if prompt_group > 1 and rows % prompt_group == 0 else 1


def _pick(logits: Array, key: Array, cfg: SamplingConfig) -> tuple[Array, Array]:
  """Samples one token per row from logits [B, V] -> (token [B], its log-prob [B])."""
  if cfg.is_greedy or cfg.method == "gumbel":
    log_probs = sampling_log_probs(logits, cfg)
    if cfg.is_greedy:
      token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      token = jax.random.categorical(key, log_probs, axis=-1).astype(jnp.int32)
    return token, jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
  return inverse_cdf_sample(key, sampling_logits(logits, cfg))


@dataclasses.dataclass(frozen=True)
class TokenPicker:
  """``_pick`` for one sampling config as a hashable callable ``(logits [B, V], key) -> (token [B], log-prob
  [B])``: the decode layout times its decode steps with the sampler's own pick (``decode_layout.view_pays``)."""

  cfg: SamplingConfig

  def __call__(self, logits: Array, key: Array) -> tuple[Array, Array]:
    return _pick(logits, key, self.cfg)


def generate(model: Decoder, prompt: Array, prompt_mask: Array, key: Array, cfg: SamplingConfig,
             prompt_group: int = 1) -> Sample:
  """Samples ``cfg.max_new_tokens`` tokens after left-padded ``prompt`` [B, P]; traceable under jit.

  ``prompt_group`` g > 1 promises that rows ``i*g .. i*g+g-1`` hold the same prompt (the g samples of one
  prompt, ``rollout.repeat_prompts``): the prompt is prefilled once per group and its KV cache repeated,
  the same values up to float rounding for (1 - 1/g) less of the prefill. Only the first row of each
  group is read: every row of a group is sampled after that row's prompt. B must divide by g.
  """
  b, p = prompt.shape
  n = cfg.max_new_tokens
  if b % prompt_group:
    raise ValueError(f"prompt_group={prompt_group} does not divide the {b} prompt rows")
  lengths = decode_cache_lengths(p, n)
  cache = init_cache(model.cfg, b // prompt_group, lengths[0])
  # Only the last column's logits are needed (left padding puts every prompt's last token there):
  # the LM head over the whole prompt would be ~1/4 of the prefill's FLOPs at bench-small.
  # The last block queries that column alone too (every prompt token is still a key and fills the cache).
  hidden, cache = model.trunk(prompt[::prompt_group], prompt_mask[::prompt_group], cache, queries=(p - 1, 1))
  last = model.logits_from_hidden(hidden[:, -1])
  if prompt_group > 1:
    cache = cache.repeat_rows(prompt_group)
    last = jnp.repeat(last, prompt_group, axis=0)

  def emit(i, tokens, log_probs, mask, done, last):
    """Samples token i from ``last`` and writes it; rows already finished get padding."""
    token, lp = _pick(last, jax.random.fold_in(key, i), cfg)
    alive = ~done
    token = jnp.where(alive, token, cfg.pad_id)
    tokens = tokens.at[:, i].set(token)
    log_probs = log_probs.at[:, i].set(jnp.where(alive, lp, 0.0))
    mask = mask.at[:, i].set(alive.astype(jnp.int32))
    if cfg.stop_at_eos:
      done = done | (token == cfg.eos_id)
    return token, alive, tokens, log_probs, mask, done

  def cond(carry, steps):
    i, done = carry[0], carry[4]
    going = i < steps  # the last token is emitted after the loop, with no forward pass after it
    if cfg.stop_at_eos:
      going &= ~jnp.all(done)
    return going

  def body(carry):
    i, tokens, log_probs, mask, done, last, cache = carry
    token, alive, tokens, log_probs, mask, done = emit(i, tokens, log_probs, mask, done, last)
    hidden, cache = model.trunk(token[:, None], alive[:, None].astype(jnp.int32), cache)
    return i + 1, tokens, log_probs, mask, done, model.logits_from_hidden(hidden[:, 0]), cache

  carry = (jnp.zeros((), jnp.int32), jnp.full((b, n), cfg.pad_id, jnp.int32), jnp.zeros((b, n), jnp.float32),
           jnp.zeros((b, n), jnp.int32), jnp.zeros((b,), bool), last, cache)
  # One loop per cache length: step i writes slot p + i, so a cache of L slots takes steps i < L - p.
  for phase, length in enumerate(lengths):
    if phase:
      carry = (*carry[:-1], grow_cache(carry[-1], length))
    carry = jax.lax.while_loop(functools.partial(cond, steps=min(n - 1, length - p)), body, carry)
  i, tokens, log_probs, mask, done, last, _ = carry
  # If every row stopped early this writes padding at column i, which is padding already.
  _, _, tokens, log_probs, mask, _ = emit(i, tokens, log_probs, mask, done, last)
  return Sample(tokens=tokens, log_probs=log_probs, mask=mask)


def layout_generate(model: Decoder, prompt: Array, prompt_mask: Array, key: Array, cfg: SamplingConfig,
                    prompt_group: int = 1, layout: DecodeLayout | None = None) -> Sample:
  """``generate`` with the decoder's weights and rows in ``layout``'s decode view for the loop, the sample
  handed back in the training mesh's batch layout; plain ``generate`` for ``layout`` None."""
  if layout is None:
    return generate(model, prompt, prompt_mask, key, cfg, prompt_group)
  view, model, (prompt, prompt_mask) = layout.place(model, prompt, prompt_mask, new_tokens=cfg.max_new_tokens,
                                                    pick=TokenPicker(cfg))
  return layout.back(view, generate(model, prompt, prompt_mask, key, cfg, prompt_group))


def make_sampler(graphdef: nnx.GraphDef, cfg: SamplingConfig, prompt_group: int = 1,
                 layout: DecodeLayout | None = None) -> Callable[[nnx.State, Array, Array, Array], Sample]:
  """A jitted ``sample(params, prompt, prompt_mask, key) -> Sample`` for a decoder's graphdef
  (``prompt_group``: see ``generate``; where it does not divide a call's rows, that call prefills per row).
  ``layout``: where the weights sit while decoding (``decode_layout``); None: as they are passed."""

  @jax.jit
  def sample(params, prompt, prompt_mask, key):
    return layout_generate(nnx.merge(graphdef, params), prompt, prompt_mask, key, cfg,
                           fitting_group(prompt_group, prompt.shape[0]), layout)

  return sample
