"""model.matmul_dtype: weight products with bf16 operands and float32 accumulation, forward and backward."""

import itertools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fake_devices import cpu_env
from rlhf_jax.models import Decoder, DecoderConfig
from rlhf_jax.models.mixed_matmul import mixed_batched_matmul, mixed_matmul
from test_models import decode_incrementally, left_padded_batch, tiny

BF16 = jnp.bfloat16
# The transposed copies are taken only when tracing for XLA:CPU (GPU and TPU read transposed operands
# natively), so which products stay bf16 in a compiled program can be checked on the CPU backend only.
CPU_ONLY = pytest.mark.skipif(jax.default_backend() != "cpu",
                              reason="checks XLA:CPU's compiled products; other backends take no transposed copy")


def rounded(a) -> np.ndarray:
  """``a`` rounded to bf16, as float64."""
  return np.asarray(jnp.asarray(a).astype(BF16).astype(jnp.float32), np.float64)


def normal(rng, shape):
  return jnp.asarray(rng.normal(size=shape), jnp.float32)


# (N, Din, Dout): the first moves the [N, Din] input for the weight gradient, the second the [N, Dout]
# gradient (then transposes the small result); both for w [Din, Dout] and w [Dout, Din].
@pytest.mark.parametrize("n,din,dout,w_contracting",
                         [(40, 6, 24, 0), (40, 24, 6, 0), (40, 6, 24, 1), (40, 24, 6, 1)])
def test_forward_and_gradients_are_products_of_rounded_operands(n, din, dout, w_contracting):
  rng = np.random.default_rng(n + din + w_contracting)
  x, g = normal(rng, (n, din)), normal(rng, (n, dout))
  w = normal(rng, (din, dout) if w_contracting == 0 else (dout, din))
  y, vjp = jax.vjp(lambda x, w: mixed_matmul(x, w, BF16, jnp.float32, w_contracting), x, w)
  dx, dw = vjp(g)
  w_io = rounded(w) if w_contracting == 0 else rounded(w).T  # [Din, Dout]
  np.testing.assert_allclose(y, rounded(x) @ w_io, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, rounded(g) @ w_io.T, rtol=1e-5, atol=1e-5)
  dw_io = rounded(x).T @ rounded(g)
  np.testing.assert_allclose(dw, dw_io if w_contracting == 0 else dw_io.T, rtol=1e-5, atol=1e-5)
  assert y.dtype == dx.dtype == dw.dtype == jnp.float32
  # Rounding is what happens: a float32 product differs.
  assert np.abs(np.asarray(x) @ np.asarray(w_io) - np.asarray(y)).max() > 1e-4


def test_gradients_come_back_in_the_inputs_dtypes():
  rng = np.random.default_rng(0)
  x, w = normal(rng, (8, 4)).astype(BF16), normal(rng, (4, 6))
  y, vjp = jax.vjp(lambda x, w: mixed_matmul(x, w, BF16, BF16), x, w)
  dx, dw = vjp(jnp.ones_like(y))
  assert (y.dtype, dx.dtype, dw.dtype) == (BF16, BF16, jnp.float32)


def test_bad_shapes_are_named():
  with pytest.raises(ValueError, match="do not contract"):
    mixed_matmul(jnp.ones((4, 3)), jnp.ones((4, 3)), BF16, jnp.float32)
  with pytest.raises(ValueError, match="2-D"):
    mixed_matmul(jnp.ones((2, 4, 3)), jnp.ones((3, 5)), BF16, jnp.float32)


@pytest.mark.parametrize("x_transposed,w_contracting,out_transposed", list(itertools.product(
    [False, True], [0, 1], [False, True])))
def test_runs_whatever_layout_its_neighbours_want(x_transposed, w_contracting, out_transposed):
  """XLA:CPU cannot execute a bf16 x bf16 -> f32 product whose result a consumer lays out transposed (a raw
  ``dot_general`` followed by ``.T`` fails with "Unsupported element type for DotThunk"); ours runs,
  forward and backward, and gives the rounded-operand numbers."""
  rng = np.random.default_rng(7)
  n, din, dout = 24, 16, 8
  x = normal(rng, (din, n) if x_transposed else (n, din))
  w = normal(rng, (din, dout) if w_contracting == 0 else (dout, din))
  c = normal(rng, (dout, n) if out_transposed else (n, dout))

  def loss(x, w):
    rows = jnp.tanh(x.T if x_transposed else x)
    y = mixed_matmul(rows, w * 2.0, BF16, jnp.float32, w_contracting)
    return jnp.vdot(c, y.T if out_transposed else y)

  value, (dx, _) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)
  rows = np.tanh(np.asarray(x.T if x_transposed else x, np.float64))
  w_io = rounded(w * 2.0) if w_contracting == 0 else rounded(w * 2.0).T
  g = np.asarray(c.T if out_transposed else c, np.float64)
  np.testing.assert_allclose(value, np.sum(g * (rounded(rows) @ w_io)), rtol=1e-4)
  d_rows = rounded(g) @ w_io.T
  expected_dx = d_rows * (1 - rows ** 2)
  np.testing.assert_allclose(dx, expected_dx.T if x_transposed else expected_dx, rtol=1e-4, atol=1e-5)


def _dot_operand_dtypes(hlo: str) -> list[tuple[str, str]]:
  """(lhs, rhs) element types of every dot in an optimized HLO module's text (names are looked up within
  their own computation: fused computations reuse parameter names)."""
  out = []
  for computation in re.split(r"\n(?=\S)", hlo):
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", computation))
    dots = re.findall(r"= \w+\[[^\]]*\]\{?[^ ]*\s+dot\(%([\w.\-]+), %([\w.\-]+)\)", computation)
    out += [(types[a], types[b]) for a, b in dots]
  return out


@CPU_ONLY
@pytest.mark.parametrize("w_contracting", [0, 1])
def test_every_product_of_the_backward_stays_bf16_on_cpu(w_contracting):
  """XLA:CPU widens a bf16 product that contracts a transposed operand back to float32 (4-6x slower on
  CPUs with bf16 units); the weight gradient therefore runs on a row-major transposed copy."""
  n, din, dout = 64, 32, 128  # w [Din, Dout] moves the input, w [Dout, Din] (an LM head) the result
  x = jnp.ones((n, din))
  w = jnp.ones((din, dout) if w_contracting == 0 else (dout, din))
  grad = jax.jit(jax.value_and_grad(lambda x, w: jnp.square(mixed_matmul(x, w, BF16, jnp.float32,
                                                                        w_contracting)).sum(), argnums=(0, 1)))
  hlo = grad.lower(x, w).compile().as_text()
  dots = _dot_operand_dtypes(hlo)
  assert len(dots) == 3, hlo  # forward, input gradient, weight gradient
  assert set(dots) == {("bf16", "bf16")}, dots


@pytest.mark.parametrize("b_contracting", [-1, -2])
def test_batched_product_and_gradients_are_products_of_rounded_operands(b_contracting):
  """Attention's products: q [B, H, T, Dh] against k [B, H, S, Dh] (-1), probs [B, H, T, S] against v (-2)."""
  rng = np.random.default_rng(11)
  a = normal(rng, (2, 3, 5, 8))
  b = normal(rng, (2, 3, 7, 8) if b_contracting == -1 else (2, 3, 8, 7))
  c = normal(rng, (2, 3, 5, 7))
  loss = lambda a, b: jnp.vdot(c, mixed_batched_matmul(jnp.tanh(a), b, BF16, jnp.float32, b_contracting))
  value, (da, db) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(a, b)
  ta = np.tanh(np.asarray(a, np.float64))
  b_kn = rounded(b) if b_contracting == -2 else np.swapaxes(rounded(b), -1, -2)
  g = np.asarray(c, np.float64)
  np.testing.assert_allclose(value, np.sum(g * (rounded(ta) @ b_kn)), rtol=1e-5)
  np.testing.assert_allclose(da, (rounded(g) @ np.swapaxes(b_kn, -1, -2)) * (1 - ta ** 2), rtol=1e-4, atol=1e-5)
  db_kn = np.swapaxes(rounded(ta), -1, -2) @ rounded(g)
  np.testing.assert_allclose(db, db_kn if b_contracting == -2 else np.swapaxes(db_kn, -1, -2), rtol=1e-4, atol=1e-5)
  assert np.abs(np.swapaxes(ta, -1, -2) @ g - db_kn).max() > 1e-3  # a float32 product would differ
  with pytest.raises(ValueError, match="do not pair up"):
    mixed_batched_matmul(a, jnp.ones((2, 4, 7, 8)), BF16, jnp.float32, -1)
  with pytest.raises(ValueError, match="contracted on axis -2 or -1"):
    mixed_batched_matmul(a, b, BF16, jnp.float32, 0)


@CPU_ONLY
def test_every_product_of_a_decoder_training_step_is_bf16_on_cpu():
  """With model.matmul_dtype=bfloat16, the attention's score and mix products join the weight products:
  no product of a decoder's loss and gradient is left in float32."""
  cfg = tiny("gpt2", matmul_dtype="bfloat16")
  graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
  tokens, mask, _ = left_padded_batch()

  def loss(p):
    out, _ = nnx.merge(graphdef, p)(tokens, mask)
    return jnp.mean(jax.nn.log_softmax(out)[..., 5] * mask)

  dots = _dot_operand_dtypes(jax.jit(jax.grad(loss)).lower(params).compile().as_text())
  assert len(dots) >= 3 * 6 * cfg.num_layers and set(dots) == {("bf16", "bf16")}, dots


DATA_PARALLEL_PROBE = """
import json, re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from rlhf_jax.models.mixed_matmul import mixed_matmul
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
out = {}
for w_contracting in (0, 1):
  x = jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh, P("data", None)))
  w = jax.device_put(jnp.ones((32, 128) if w_contracting == 0 else (128, 32)), NamedSharding(mesh, P()))
  grad = jax.jit(jax.grad(lambda x, w: jnp.square(mixed_matmul(x, w, jnp.bfloat16, jnp.float32,
                                                                w_contracting)).sum(), argnums=(0, 1)))
  hlo = grad.lower(x, w).compile().as_text()
  out[w_contracting] = re.findall(r"(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)\\(", hlo)
print(json.dumps(out))
"""


def test_a_data_parallel_backward_moves_only_the_weight_gradient():
  """With the rows split over a data axis, the weight gradient's transposed copy stays on each device: the
  one collective is the all-reduce of the [Din, Dout] partial sums (halves cut along the sharded rows made
  the partitioner add a collective-permute and all-to-alls to every product)."""
  env = cpu_env(2)
  proc = subprocess.run([sys.executable, "-c", DATA_PARALLEL_PROBE], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"0": ["all-reduce"], "1": ["all-reduce"]}


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_decoder_with_bf16_matmuls_tracks_float32(flavour):
  """The same params under model.matmul_dtype=bfloat16: logits within bf16 rounding of the float32 model,
  KV-cache decoding equal to the full pass, gradients pointing the same way."""
  cfg, cfg_mixed = tiny(flavour), tiny(flavour, matmul_dtype="bfloat16")
  assert cfg_mixed.matmul_dtype == BF16 and cfg.matmul_dtype is None
  model, mixed = Decoder(cfg, rngs=nnx.Rngs(4)), Decoder(cfg_mixed, rngs=nnx.Rngs(4))
  tokens, mask, _ = left_padded_batch()
  logits, _ = model(tokens, mask)
  logits_mixed, _ = mixed(tokens, mask)
  real = np.asarray(mask, bool)
  diff = np.abs(np.asarray(logits - logits_mixed))[real]
  assert logits_mixed.dtype == jnp.float32
  assert 1e-5 < diff.max() < 0.02 * np.abs(np.asarray(logits))[real].max()

  extra = jax.random.randint(jax.random.key(5), (3, 6), 4, cfg.vocab_size)
  full, _ = mixed(jnp.concatenate([tokens, extra], 1), jnp.concatenate([mask, jnp.ones((3, 6), jnp.int32)], 1))
  cached, _ = decode_incrementally(mixed, cfg_mixed, tokens, mask, extra[:, :5])
  np.testing.assert_allclose(np.asarray(cached)[:, 9:], np.asarray(full)[:, 9:-1], atol=1e-4)

  def loss(m):
    out, _ = m(tokens, mask)
    return jnp.mean(jax.nn.log_softmax(out)[..., 5] * mask)

  flat = [np.concatenate([np.ravel(v) for v in jax.tree.leaves(nnx.grad(loss)(m))]) for m in (model, mixed)]
  cosine = flat[0] @ flat[1] / np.linalg.norm(flat[0]) / np.linalg.norm(flat[1])
  assert 0.9999 < cosine < 1.0


def test_matmul_dtype_config():
  assert tiny("gpt2", matmul_dtype="").matmul_dtype is None
  assert DecoderConfig.from_mapping({"vocab_size": 10, "matmul_dtype": "bfloat16"}).matmul_dtype == BF16
  with pytest.raises(ValueError, match=r"model.matmul_dtype must be '' \(the compute dtype\) or one of"):
    tiny("gpt2", matmul_dtype="int8")
