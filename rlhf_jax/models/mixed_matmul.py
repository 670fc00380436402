"""Products with low-precision operands and float32 accumulation, forward and backward.

``mixed_matmul(x, w, operand_dtype, out_dtype)`` (weight products) and ``mixed_batched_matmul`` (the attention's
score and mix products) round both operands to ``operand_dtype`` (bf16), accumulate in float32 and return
``out_dtype``; their gradients are the same kind of product (the incoming gradient rounded
to ``operand_dtype``, float32 accumulation), cast back to the dtypes of ``x`` and ``w``. This is what a TPU's
default matmul precision and PyTorch's ``torch.set_float32_matmul_precision("medium")`` do to a float32 model:
the residual stream, norms, softmax, losses and optimizer stay in float32; only the products' inputs are
rounded. The rounded operands are what the backward keeps, which halves those saved activations.

On CPUs with bf16 matrix units (AMX, AVX512-BF16) XLA runs a bf16 x bf16 -> f32 product 4-6x faster than the
float32 one, but only in its canonical form (the left operand contracted on its last axis, neither operand
in a transposed layout); any other form is silently widened back to float32. The weight gradient contracts
both operands over their rows, so on CPU it is written against a physically transposed copy of one of them;
so are the attention products that contract an operand on its last axis.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def _product(a: Array, b: Array, b_axis: int) -> Array:
  """a [..., M, K] x b contracted on ``b_axis`` (-2: b [..., K, N]; -1: b [..., N, K]) -> [..., M, N] float32;
  the leading axes are batch axes of both.

  On CPU the result passes through an optimization barrier. XLA:CPU decides whether a low-precision
  product keeps its dtype before it assigns layouts; a consumer that then gives the result a transposed
  layout leaves a bf16 x bf16 -> f32 product that its runtime cannot execute ("Unsupported element type for
  DotThunk"). The barrier keeps the result's layout plain.
  """
  batch = tuple(range(a.ndim - 2))
  dims = (((a.ndim - 1,), (b.ndim + b_axis,)), (batch, batch))
  out = jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
  return jax.lax.optimization_barrier(out) if jax.default_backend() == "cpu" else out


def _permuted_copy(a: Array, perm: tuple[int, ...]) -> Array:
  """``a.transpose(perm)``, on CPU written out as a new row-major array so that it can be an operand of a
  bf16 product there.

  A plain transpose becomes a change of layout that XLA:CPU's bf16 product does not accept (it would widen
  the product to float32); two halves transposed and joined are written out as a new array. The halves are
  cut along the last axis, a feature axis here: the rows of a weight product are the batch, which a
  data-parallel mesh shards, and halves cut along a sharded axis make the partitioner move them between
  devices (a collective-permute and all-to-alls per product). Elsewhere (GPU, TPU) the product reads
  transposed operands natively and the plain transpose is best.
  """
  if jax.default_backend() != "cpu" or a.shape[-1] < 2:
    return a.transpose(perm)
  half = a.shape[-1] // 2
  return jnp.concatenate([a[..., :half].transpose(perm), a[..., half:].transpose(perm)],
                         axis=perm.index(a.ndim - 1))


def _transposed(a: Array) -> Array:
  """a with its last two axes swapped ([..., K, M] from [..., M, K]), row-major on CPU: the canonical left
  operand of a product that contracts a's rows."""
  return _permuted_copy(a, (*range(a.ndim - 2), a.ndim - 1, a.ndim - 2))


def _weight_gradient(rows: Array, go: Array, w_axis: int) -> Array:
  """The gradient wrt w of x [N, Din] (``rows``, rounded) given go [N, Dout]: [Din, Dout] for ``w_axis`` 0,
  [Dout, Din] for 1; float32.

  Both operands are contracted over their N rows, so one of them is transposed: whichever costs fewer
  elements to move, the one whose transpose gives w's orientation directly, or the other one plus a
  transpose of the [Din, Dout] result (the LM head's [N, V] gradient is 16x larger than its input).
  """
  din, dout = rows.shape[1], go.shape[1]
  left, right = (rows, go) if w_axis == 0 else (go, rows)
  if left.size <= right.size + din * dout:
    return _product(_transposed(left), right, -2)
  return _product(_transposed(right), left, -2).T


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _mixed(x: Array, w: Array, w_axis: int, operand_dtype, out_dtype, x_dtype, w_dtype) -> Array:
  return _mixed_fwd(x, w, w_axis, operand_dtype, out_dtype, x_dtype, w_dtype)[0]


def _mixed_fwd(x, w, w_axis, operand_dtype, out_dtype, x_dtype, w_dtype):
  xo, wo = x.astype(operand_dtype), w.astype(operand_dtype)
  return _product(xo, wo, w_axis - 2).astype(out_dtype), (xo, wo)


def _mixed_bwd(w_axis, operand_dtype, out_dtype, x_dtype, w_dtype, residuals, g):
  xo, wo = residuals
  go = g.astype(operand_dtype)
  dx = _product(go, wo, -1 - w_axis)  # [N, Din]
  return dx.astype(x_dtype), _weight_gradient(xo, go, w_axis).astype(w_dtype)


_mixed.defvjp(_mixed_fwd, _mixed_bwd)


def mixed_matmul(x: Array, w: Array, operand_dtype, out_dtype, w_contracting: int = 0) -> Array:
  """x [N, Din] times w ([Din, Dout] with ``w_contracting`` 0, [Dout, Din] with 1) -> [N, Dout] in
  ``out_dtype``, the operands rounded to ``operand_dtype`` and the sums accumulated in float32.

  The gradients wrt x and w are products of the same kind (see the module docstring).
  """
  if x.ndim != 2 or w.ndim != 2 or w_contracting not in (0, 1):
    raise ValueError(f"mixed_matmul takes x [N, Din] and a 2-D w contracted on axis 0 or 1; got x {x.shape}, "
                     f"w {w.shape}, w_contracting={w_contracting}")
  if x.shape[1] != w.shape[w_contracting]:
    raise ValueError(f"mixed_matmul: x {x.shape} and w {w.shape} do not contract (axis {w_contracting} of w)")
  return _mixed(x, w, w_contracting, jnp.dtype(operand_dtype), jnp.dtype(out_dtype), x.dtype, w.dtype)


def heads_major(x: Array) -> Array:
  """x [B, T, H, Dh] -> [B, H, T, Dh], row-major on CPU, so that it can be the right operand of a bf16
  product there (see ``_permuted_copy``)."""
  return _permuted_copy(x, (0, 2, 1, 3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _mixed_batched(a: Array, b: Array, b_axis: int, operand_dtype, out_dtype, a_dtype, b_dtype) -> Array:
  return _mixed_batched_fwd(a, b, b_axis, operand_dtype, out_dtype, a_dtype, b_dtype)[0]


def _mixed_batched_fwd(a, b, b_axis, operand_dtype, out_dtype, a_dtype, b_dtype):
  ao, bo = a.astype(operand_dtype), b.astype(operand_dtype)
  return _product(ao, _transposed(bo) if b_axis == -1 else bo, -2).astype(out_dtype), (ao, bo)


def _mixed_batched_bwd(b_axis, operand_dtype, out_dtype, a_dtype, b_dtype, residuals, g):
  ao, bo = residuals
  go = g.astype(operand_dtype)
  if b_axis == -1:  # b [..., N, K]
    da, db = _product(go, bo, -2), _product(_transposed(go), ao, -2)
  else:  # b [..., K, N]
    da, db = _product(go, _transposed(bo), -2), _product(_transposed(ao), go, -2)
  return da.astype(a_dtype), db.astype(b_dtype)


_mixed_batched.defvjp(_mixed_batched_fwd, _mixed_batched_bwd)


def mixed_batched_matmul(a: Array, b: Array, operand_dtype, out_dtype, b_contracting: int = -2) -> Array:
  """Batched a [..., M, K] times b ([..., K, N] with ``b_contracting`` -2, [..., N, K] with -1) -> [..., M, N]
  in ``out_dtype``, the operands rounded to ``operand_dtype`` and the sums accumulated in float32; the
  leading axes (e.g. batch and heads) pair up. For attention: scores are q [B, H, T, Dh] against k
  [B, H, S, Dh] (-1), the mix is probs [B, H, T, S] against v [B, H, S, Dh] (-2).

  Every product of the forward and the backward is in the canonical form XLA:CPU keeps in bf16, against
  row-major transposed copies where needed (see ``_transposed``).
  """
  if a.ndim < 2 or b.ndim != a.ndim or b_contracting not in (-2, -1):
    raise ValueError(f"mixed_batched_matmul takes a [..., M, K] and b of the same rank contracted on axis -2 or "
                     f"-1; got a {a.shape}, b {b.shape}, b_contracting={b_contracting}")
  if a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[b_contracting]:
    raise ValueError(f"mixed_batched_matmul: a {a.shape} and b {b.shape} do not pair up (batch axes, then K "
                     f"against axis {b_contracting} of b)")
  return _mixed_batched(a, b, b_contracting, jnp.dtype(operand_dtype), jnp.dtype(out_dtype), a.dtype, b.dtype)
