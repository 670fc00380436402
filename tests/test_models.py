"""Decoder: padding-aware positions, KV-cache decoding equals a full pass, scan/remat equivalence, heads."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.models import Decoder, DecoderConfig, ScalarModel, init_cache, reward_head_std


def tiny(flavour, **kw):
  base = dict(vocab_size=61, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_len=32, flavour=flavour,
              num_kv_heads=2 if flavour == "llama" else 0)
  base.update(kw)
  return DecoderConfig(**base)


def left_padded_batch(vocab=61):
  rng = np.random.default_rng(0)
  lengths = [10, 7, 4]
  tokens = np.zeros((3, 10), np.int32)
  mask = np.zeros((3, 10), np.int32)
  rows = [rng.integers(4, vocab, size=n) for n in lengths]
  for i, row in enumerate(rows):
    tokens[i, 10 - len(row):] = row
    mask[i, 10 - len(row):] = 1
  return jnp.asarray(tokens), jnp.asarray(mask), rows


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_left_padding_gives_unpadded_logits(flavour):
  model = Decoder(tiny(flavour), rngs=nnx.Rngs(0))
  tokens, mask, rows = left_padded_batch()
  logits, _ = model(tokens, mask)
  for i, row in enumerate(rows):
    alone, _ = model(jnp.asarray(row)[None], jnp.ones((1, len(row)), jnp.int32))
    np.testing.assert_allclose(logits[i, 10 - len(row):], alone[0], atol=2e-5)


def decode_incrementally(model, cfg, tokens, mask, extra):
  """Logits of a prefill of ``tokens`` then of ``extra`` [B, n] decoded one token at a time; and the cache."""
  cache = init_cache(cfg, tokens.shape[0], 16)
  prefill, cache = model(tokens, mask, cache)
  steps = [prefill]
  for t in range(extra.shape[1]):
    out, cache = model(extra[:, t:t + 1], jnp.ones((tokens.shape[0], 1), jnp.int32), cache)
    steps.append(out)
  return jnp.concatenate(steps, axis=1), cache


@pytest.mark.parametrize("flavour,scan", [("gpt2", False), ("llama", False), ("llama", True)])
def test_cached_decoding_matches_full_forward(flavour, scan):
  cfg = tiny(flavour, scan_layers=scan)
  model = Decoder(cfg, rngs=nnx.Rngs(1))
  tokens, mask, _ = left_padded_batch()
  # Extend every row by 5 real tokens, decoded one at a time after a 10-token prefill.
  extra = jax.random.randint(jax.random.key(2), (3, 5), 4, cfg.vocab_size)
  full_tokens = jnp.concatenate([tokens, extra], axis=1)
  full_mask = jnp.concatenate([mask, jnp.ones((3, 5), jnp.int32)], axis=1)
  reference, _ = model(full_tokens, full_mask)
  incremental, cache = decode_incrementally(model, cfg, tokens, mask, extra)
  real = np.asarray(full_mask, bool)
  np.testing.assert_allclose(np.asarray(incremental)[real], np.asarray(reference)[real], atol=5e-5)
  assert int(cache.index) == 15
  np.testing.assert_array_equal(cache.next_pos, full_mask.sum(1))


@pytest.mark.parametrize("flavour,scan", [("gpt2", False), ("llama", True)])
def test_prefill_into_a_fresh_cache_matches_a_chunked_prefill(flavour, scan):
  """A fresh cache's first call attends to its own keys only (``KVCache.fresh``); a prefill in two chunks
  (the second reading the cache) must give the same logits and the same cache."""
  cfg = tiny(flavour, scan_layers=scan)
  model = Decoder(cfg, rngs=nnx.Rngs(4))
  tokens, mask, _ = left_padded_batch()
  cache = init_cache(cfg, 3, 16)
  assert cache.fresh
  whole, one = model(tokens, mask, cache)
  assert not one.fresh
  head, chunked = model(tokens[:, :6], mask[:, :6], cache)
  tail, chunked = model(tokens[:, 6:], mask[:, 6:], chunked)
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(jnp.concatenate([head, tail], 1))[real], np.asarray(whole)[real], atol=2e-5)
  np.testing.assert_array_equal(one.valid, chunked.valid)
  assert int(one.index) == int(chunked.index) == 10
  np.testing.assert_array_equal(one.next_pos, chunked.next_pos)
  valid = np.asarray(one.valid)  # pad slots hold keys of pad tokens, which nothing reads
  for a, b in zip(jax.tree.leaves((one.k, one.v)), jax.tree.leaves((chunked.k, chunked.v))):
    a, b = np.moveaxis(np.asarray(a), -2, -3), np.moveaxis(np.asarray(b), -2, -3)  # [..., B, S, KV, Dh]
    np.testing.assert_allclose(a[..., valid, :, :], b[..., valid, :, :], atol=2e-5)
    assert not a[..., 10:, :, :].any()  # slots past the prompt stay empty


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_scan_and_remat_match_layer_loop(flavour):
  tokens, mask, _ = left_padded_batch()
  loop = Decoder(tiny(flavour), rngs=nnx.Rngs(3))
  scanned = Decoder(tiny(flavour, scan_layers=True, remat=True), rngs=nnx.Rngs(3))
  # Same weights: copy the loop's per-layer params into the stacked layout.
  _, loop_params = nnx.split(loop)
  graphdef, scan_params = nnx.split(scanned)
  loop_dict = loop_params.to_pure_dict()
  scan_dict = scan_params.to_pure_dict()
  blocks = loop_dict["trunk"]["blocks"]
  scan_dict["trunk"]["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[blocks[i] for i in sorted(blocks)])
  for k in loop_dict["trunk"]:
    if k != "blocks":
      scan_dict["trunk"][k] = loop_dict["trunk"][k]
  if "lm_head" in loop_dict:
    scan_dict["lm_head"] = loop_dict["lm_head"]
  scanned = nnx.merge(graphdef, scan_dict)
  a, _ = loop(tokens, mask)
  b, _ = scanned(tokens, mask)
  np.testing.assert_allclose(a, b, atol=2e-5)

  def loss(model):
    return model(tokens, mask)[0].mean()

  ga = nnx.grad(loss)(loop)
  gb = nnx.grad(loss)(scanned)
  np.testing.assert_allclose(ga.trunk.embed[...], gb.trunk.embed[...], atol=1e-6)


def test_every_parameter_has_logical_axes():
  for flavour, scan in [("gpt2", False), ("llama", True)]:
    _, state = nnx.split(Decoder(tiny(flavour, scan_layers=scan), rngs=nnx.Rngs(0)))
    for path, var in jax.tree.leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
      axes = var.get_metadata().get("logical_axes")
      assert axes is not None and len(axes) == var.get_value().ndim, (path, axes)
      if scan and "blocks" in jax.tree_util.keystr(path):
        assert axes[0] == "layers"


def test_bfloat16_compute():
  cfg = tiny("llama", dtype="bfloat16")
  tokens, mask, _ = left_padded_batch()
  logits, _ = Decoder(cfg, rngs=nnx.Rngs(0))(tokens, mask)
  assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_bfloat16_logits_are_float32_and_cache_matches_full_pass(flavour):
  """The LM head runs in float32 under bf16 compute: logits are float32 (not bf16 values upcast), and
  teacher-forced log-probs from the full pass and from KV-cache decoding agree closely."""
  cfg = tiny(flavour, dtype="bfloat16")
  model = Decoder(cfg, rngs=nnx.Rngs(4))
  tokens, mask, _ = left_padded_batch()
  logits, _ = model(tokens, mask)
  assert logits.dtype == jnp.float32
  # bf16 has 8 mantissa bits: values rounded to it sit on a coarse grid; float32 head outputs do not.
  assert not np.array_equal(np.asarray(logits), np.asarray(logits.astype(jnp.bfloat16).astype(jnp.float32)))
  hidden, _ = model.trunk(tokens, mask)
  np.testing.assert_allclose(model.logits_from_hidden(hidden),
                             hidden.astype(jnp.float32) @ model.trunk.embed[...].astype(jnp.float32).T
                             if cfg.tie_embeddings else hidden.astype(jnp.float32) @ model.lm_head[...], rtol=1e-5,
                             atol=1e-5)

  extra = jax.random.randint(jax.random.key(5), (3, 6), 4, cfg.vocab_size)
  full_tokens = jnp.concatenate([tokens, extra], axis=1)
  full_mask = jnp.concatenate([mask, jnp.ones((3, 6), jnp.int32)], axis=1)
  full, _ = model(full_tokens, full_mask)
  cached, _ = decode_incrementally(model, cfg, tokens, mask, extra[:, :5])  # logits for positions 0 .. 14
  targets = full_tokens[:, 1:]
  lp_full = jnp.take_along_axis(jax.nn.log_softmax(full[:, :-1]), targets[..., None], -1)[..., 0]
  lp_cached = jnp.take_along_axis(jax.nn.log_softmax(cached), targets[..., None], -1)[..., 0]
  real = np.asarray(full_mask[:, 1:], bool) & np.asarray(full_mask[:, :-1], bool)
  # The cache stores bf16 keys/values exactly as the full pass computes them: only summation order differs.
  np.testing.assert_allclose(np.asarray(lp_cached)[real], np.asarray(lp_full)[real], atol=2e-2)


def test_reward_read_at_last_real_token_and_value_head_zero():
  cfg = tiny("gpt2")
  rm = ScalarModel(cfg, reward_head_std(cfg), rngs=nnx.Rngs(0))
  tokens = jnp.array([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  rewards = rm(tokens, mask)
  values = rm.values(tokens, mask)
  np.testing.assert_allclose(rewards, [values[0, 2], values[1, 4]], rtol=1e-6)
  # Right padding does not change the reward.
  np.testing.assert_allclose(rm(tokens[:1, :3], mask[:1, :3]), rewards[:1], atol=1e-5)
  head = rm.head[...]
  assert abs(float(head.std()) - reward_head_std(cfg)) < 0.05
  value_model = ScalarModel(cfg, 0.0, rngs=nnx.Rngs(0))
  assert float(jnp.abs(value_model.values(tokens, mask)).max()) == 0.0


def test_bad_model_config_is_named():
  with pytest.raises(ValueError, match="model.flavour"):
    tiny("gpt3")
  with pytest.raises(ValueError, match="num_heads"):
    tiny("gpt2", d_model=30)
  with pytest.raises(ValueError, match="unknown model config keys"):
    DecoderConfig.from_mapping({"vocab_size": 10, "n_layers": 2})
  for bad in (-1, 64.0):
    with pytest.raises(ValueError, match="model.attention_block must be a whole number >= 0"):
      tiny("gpt2", attention_block=bad)


def test_yarn_rope_scaling_config():
  """A yarn rope_scaling is typed on the way in, survives JSON as a list, and a bad one is named."""
  cfg = tiny("llama", rope_scaling=("yarn", 4, 16, 32, 1, 1.2, True))
  assert cfg.rope_scaling == ("yarn", 4.0, 16, 32.0, 1.0, 1.2, True)
  assert isinstance(cfg.rope_scaling[2], int) and isinstance(cfg.rope_scaling[1], float)
  assert tiny("llama", rope_scaling=json.loads(json.dumps(cfg.rope_scaling))).rope_scaling == cfg.rope_scaling
  with pytest.raises(ValueError, match=r'model.rope_scaling must be \(\), \("linear", factor\), .* or \("yarn", '
                     r"factor, original_max_len, beta_fast, beta_slow, attention_factor, truncate\), got \('yarn', "
                     r"4.0, 16\)"):
    tiny("llama", rope_scaling=("yarn", 4.0, 16))
  bad = [("yarn", 4.0, 16, 32.0, -1.0, 1.2, True), ("yarn", 4.0, 16.5, 32.0, 1.0, 1.2, True),
         ("yarn", 4.0, 16, 32.0, 1.0, 0.0, True), ("yarn", 4.0, 16, 32.0, 1.0, 1.2, "yes"),
         ("yarn", True, 16, 32.0, 1.0, 1.2, True), ("yarn", 4.0, 16, float("nan"), 1.0, 1.2, True)]
  for scaling in bad:
    with pytest.raises(ValueError, match=r'model.rope_scaling \("yarn", .*\) needs numbers > 0, a whole '
                       r"original_max_len and a bool truncate"):
      tiny("llama", rope_scaling=scaling)
