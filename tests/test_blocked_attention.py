"""Causal attention in query blocks (``model.attention_block``) equals the one-product attention it replaces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import compute
from rlhf_jax.data import packing
from rlhf_jax.models import Decoder, DecoderConfig, ScalarModel, init_cache
from rlhf_jax.models.layers import MAX_ATTENTION_BLOCKS, causal_blocks
from test_comparison_packing import demo_comparisons

T = 24


def config(flavour: str, block: int, **kw) -> DecoderConfig:
  base = dict(vocab_size=61, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_len=64, flavour=flavour,
              num_kv_heads=2 if flavour == "llama" else 0, attention_block=block)
  base.update(kw)
  return DecoderConfig(**base)


def pair(flavour: str, block: int = 4, **kw):
  """The same weights as a dense model and as a blocked one."""
  dense = Decoder(config(flavour, 0, **kw), rngs=nnx.Rngs(3))
  blocked = Decoder(config(flavour, block, **kw), rngs=nnx.Rngs(3))
  return dense, blocked


def left_padded(rows: int = 3, width: int = T, seed: int = 0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(width // 3, width + 1, rows)
  lengths[0] = width
  mask = (np.arange(width)[None] >= width - lengths[:, None]).astype(np.int32)
  tokens = rng.integers(4, 61, (rows, width)).astype(np.int32) * mask
  return jnp.asarray(tokens), jnp.asarray(mask)


def assert_real_equal(got, want, mask):
  """Equal on real tokens (a padding query sees no key: its output, read by nothing, differs)."""
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5, rtol=1e-5)


def test_causal_blocks_cover_the_rows_and_keys_up_to_each_last_query():
  assert causal_blocks(24, 24, 0, 4) == [(r, r + 4, r + 4) for r in range(0, 24, 4)]
  assert causal_blocks(10, 10, 0, 4) == [(0, 4, 4), (4, 8, 8), (8, 10, 10)]
  # A window of queries at slots 16..23 of 24 keys.
  assert causal_blocks(8, 24, 16, 4) == [(0, 4, 20), (4, 8, 24)]
  # One product: off, slots unknown (a decode step, rows picked by index), or fewer than two blocks.
  for args in [(24, 24, 0, 0), (24, 24, None, 4), (7, 7, 0, 4)]:
    assert causal_blocks(*args) == [(0, args[0], args[1])]
  many = causal_blocks(1000, 1000, 0, 4)
  assert len(many) == MAX_ATTENTION_BLOCKS and many[-1] == (945, 1000, 1000)
  assert [r0 for r0, _, _ in many] == list(range(0, 1000, 63))


@pytest.mark.parametrize("flavour,kw", [("gpt2", {}), ("llama", {}), ("llama", dict(scan_layers=True, remat=True)),
                                        ("gpt2", dict(matmul_dtype="bfloat16"))])
def test_logits_and_gradients_equal_the_dense_attention(flavour, kw):
  dense, blocked = pair(flavour, **kw)
  tokens, mask = left_padded()
  assert_real_equal(blocked(tokens, mask)[0], dense(tokens, mask)[0], mask)

  def loss(model):
    logits = model(tokens, mask)[0]
    return jnp.sum(jax.nn.log_softmax(logits)[..., 5] * mask)

  g_dense = nnx.grad(loss)(dense)
  g_blocked = nnx.grad(loss)(blocked)
  for a, b in zip(jax.tree.leaves(g_dense), jax.tree.leaves(g_blocked)):
    np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-4)


def test_window_and_index_queries_equal_the_dense_attention():
  dense, blocked = pair("llama")
  tokens, mask = left_padded()
  for queries, real in [((16, 8), mask[:, 16:]), ((5, 12), mask[:, 5:17]),
                        (jnp.asarray([23, 20, 17]), jnp.ones((3, 1)))]:  # rows of at least 8 real tokens
    assert_real_equal(blocked.trunk(tokens, mask, queries=queries)[0], dense.trunk(tokens, mask, queries=queries)[0],
                      real)


def test_packed_rows_and_packed_comparisons_equal_the_dense_attention():
  dense, blocked = pair("gpt2")
  tokens, mask = left_padded(rows=6, width=12, seed=1)
  rows = {"tokens": np.asarray(tokens[:, ::-1]), "mask": np.asarray(mask[:, ::-1]),
          "loss_mask": np.asarray(mask[:, ::-1], np.float32)}
  packed = packing.pack(rows, T, 0)
  assert packed["segments"].max() >= 2
  args = [jnp.asarray(packed[k]) for k in ("tokens", "mask")]
  segments = jnp.asarray(packed["segments"])
  assert_real_equal(blocked(*args, segments=segments)[0], dense(*args, segments=segments)[0], packed["mask"])
  tree = packing.pack_comparisons(demo_comparisons(), 64, 0)
  scalar_dense = ScalarModel(config("llama", 0), 0.02, rngs=nnx.Rngs(4))
  scalar_blocked = ScalarModel(config("llama", 8), 0.02, rngs=nnx.Rngs(4))
  keys = ("segments", "branches", "positions")
  values = [m.values(jnp.asarray(tree["tokens"]), jnp.asarray(tree["mask"]), **{x: jnp.asarray(tree[x]) for x in keys})
            for m in (scalar_dense, scalar_blocked)]
  assert_real_equal(values[1], values[0], tree["mask"])


def test_prefill_into_a_fresh_cache_and_decoding_after_it_equal_the_dense_attention():
  dense, blocked = pair("llama", scan_layers=True)
  tokens, mask = left_padded()
  extra = jax.random.randint(jax.random.key(5), (3, 4), 4, 61)
  outputs = []
  for model in (dense, blocked):
    cache = init_cache(model.cfg, 3, T + 4)
    logits, cache = model(tokens, mask, cache)
    steps = [logits]
    for i in range(extra.shape[1]):
      out, cache = model(extra[:, i:i + 1], jnp.ones((3, 1), jnp.int32), cache)
      steps.append(out)
    outputs.append((jnp.concatenate(steps, axis=1), cache))
  assert_real_equal(outputs[1][0], outputs[0][0], jnp.concatenate([mask, jnp.ones((3, 4), jnp.int32)], axis=1))
  valid = np.asarray(outputs[0][1].valid, bool)  # [B, S]; keys [L, B, KV, S, Dh]
  keys = [np.asarray(c.k).transpose(1, 3, 0, 2, 4)[valid] for _, c in outputs]
  np.testing.assert_allclose(keys[1], keys[0], atol=2e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_shared_prompt_passes_equal_the_dense_attention(scan):
  """``shared_prefix`` (PPO's k samples of one prompt): the responses run against the prompt's cache, in
  query blocks that read the cache only up to each block's end; values and gradients as dense."""
  dense = ScalarModel(config("llama", 0, scan_layers=scan), 0.02, rngs=nnx.Rngs(6))
  # Blocks of 8: the prompt's prefill (8 columns) is one product, the 16 response columns two blocks.
  blocked = ScalarModel(config("llama", 8, scan_layers=scan), 0.02, rngs=nnx.Rngs(6))
  prompt_tokens, prompt_mask = left_padded(rows=2, width=8, seed=3)
  k, n = 2, 16
  response = jax.random.randint(jax.random.key(7), (4, n), 4, 61)
  response_mask = (jnp.arange(n)[None] < jnp.asarray([16, 9, 12, 3])[:, None]).astype(jnp.int32)
  tokens = jnp.concatenate([jnp.repeat(prompt_tokens, k, 0), response], 1)
  mask = jnp.concatenate([jnp.repeat(prompt_mask, k, 0), response_mask], 1)
  for queries in [None, (7, 17), (10, 6)]:
    def values(model, q=queries):
      return model.values(tokens, mask, queries=q, shared_prefix=(8, k))

    real = mask if queries is None else mask[:, queries[0]:queries[0] + queries[1]]
    assert_real_equal(values(blocked), values(dense), real)
    grads = [nnx.grad(lambda m: jnp.sum(values(m) * real))(m) for m in (dense, blocked)]
    for a, b in zip(*map(jax.tree.leaves, grads)):
      np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-4)
  # The responses' 16 queries in 2 blocks read 8 + 8 and 8 + 16 of the cache's 24 slots, not all 24.
  flops = []
  for model in (dense, blocked):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, g=graphdef: nnx.merge(g, st).values(tokens, mask, shared_prefix=(8, k)))
    flops.append(fn.lower(state).compile().cost_analysis()["flops"])
  assert flops[1] < flops[0]


def test_the_blocked_pass_skips_the_keys_after_each_block():
  """The compiled forward of the blocked model does fewer score FLOPs: only the triangle's blocks."""
  cfg_dense, cfg_blocked = config("gpt2", 0, num_layers=1), config("gpt2", 8, num_layers=1)
  tokens, mask = left_padded(rows=2, width=64)
  flops = []
  for cfg in (cfg_dense, cfg_blocked):
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    fn = jax.jit(lambda s, t, m, g=graphdef: nnx.merge(g, s).trunk(t, m)[0])
    flops.append(fn.lower(state, tokens, mask).compile().cost_analysis()["flops"])
  # 8 blocks of 8 rows read 8, 16, ... 64 keys (36 on average): the saving compute's FLOP count predicts.
  predicted = compute.sequence_flops(cfg_dense, 2, 64) - compute.sequence_flops(cfg_blocked, 2, 64)
  assert predicted == 2 * (2 * 64) * 2 * 1 * 32 * (64 - 36)
  assert 0.8 * predicted < flops[0] - flops[1] < 1.2 * predicted


def impl_pair(flavour: str, impl: str = "jax", **kw):
  """The same weights with our attention and with ``model.attention_impl=impl``."""
  ours = Decoder(config(flavour, 4, **kw), rngs=nnx.Rngs(3))
  fused = Decoder(config(flavour, 4, attention_impl=impl, **kw), rngs=nnx.Rngs(3))
  return ours, fused


@pytest.mark.parametrize("flavour,kw,tol", [("gpt2", {}, 2e-5), ("llama", {}, 2e-5),
                                            ("llama", dict(scan_layers=True, remat=True), 2e-5),
                                            ("gpt2", dict(matmul_dtype="bfloat16"), 3e-2)])
def test_jax_attention_equals_ours_in_logits_and_gradients(flavour, kw, tol):
  ours, fused = impl_pair(flavour, **kw)
  tokens, mask = left_padded()
  np.testing.assert_allclose(np.asarray(fused(tokens, mask)[0])[np.asarray(mask, bool)],
                             np.asarray(ours(tokens, mask)[0])[np.asarray(mask, bool)], atol=tol, rtol=tol)

  def loss(model):
    return jnp.sum(jax.nn.log_softmax(model(tokens, mask)[0])[..., 5] * mask)

  grads = [jax.tree.leaves(nnx.grad(loss)(m)) for m in (ours, fused)]
  for a, b in zip(*grads):
    assert np.isfinite(np.asarray(b)).all()  # padding queries see no key, and still no NaN reaches a gradient
    np.testing.assert_allclose(b, a, atol=tol, rtol=max(tol, 1e-4))


def test_jax_attention_equals_ours_for_queries_packing_and_caches():
  ours, fused = impl_pair("llama")
  tokens, mask = left_padded()
  for queries, real in [((16, 8), mask[:, 16:]), (jnp.asarray([23, 20, 17]), jnp.ones((3, 1)))]:
    assert_real_equal(fused.trunk(tokens, mask, queries=queries)[0], ours.trunk(tokens, mask, queries=queries)[0], real)
  tree = packing.pack_comparisons(demo_comparisons(), 64, 0)
  scalars = [ScalarModel(config("llama", 8, attention_impl=impl), 0.02, rngs=nnx.Rngs(4)) for impl in ("xla", "jax")]
  keys = ("segments", "branches", "positions")
  values = [m.values(jnp.asarray(tree["tokens"]), jnp.asarray(tree["mask"]), **{x: jnp.asarray(tree[x]) for x in keys})
            for m in scalars]
  assert_real_equal(values[1], values[0], tree["mask"])
  # A KV cache (prefill, decode steps) takes our attention either way.
  outs = []
  for model in (ours, fused):
    cache = init_cache(model.cfg, 3, T + 1)
    logits, cache = model(tokens, mask, cache)
    outs.append(jnp.concatenate([logits, model(tokens[:, :1], jnp.ones((3, 1), jnp.int32), cache)[0]], axis=1))
  np.testing.assert_array_equal(np.asarray(outs[1]), np.asarray(outs[0]))


def test_cudnn_attention_is_refused_with_the_reason(monkeypatch):
  with pytest.raises(ValueError, match="model.attention_impl must be one of"):
    config("gpt2", 4, attention_impl="flash")
  _, fused = impl_pair("gpt2", "cudnn")
  tokens, mask = left_padded()
  with pytest.raises(ValueError, match="model.attention_impl='cudnn' needs a GPU backend"):
    fused(tokens, mask)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(ValueError, match="takes bfloat16 or float16 operands: set model.dtype or model.matmul_dtype"):
    fused(tokens, mask)
