"""Weight products with low-precision operands and float32 accumulation, forward and backward.

``mixed_matmul(x, w, operand_dtype, out_dtype)`` rounds both operands to ``operand_dtype`` (bf16), accumulates
in float32 and returns ``out_dtype``; its gradients are the same kind of product (the incoming gradient rounded
to ``operand_dtype``, float32 accumulation), cast back to the dtypes of ``x`` and ``w``. This is what a TPU's
default matmul precision and PyTorch's ``torch.set_float32_matmul_precision("medium")`` do to a float32 model:
the residual stream, norms, softmax, losses and optimizer stay in float32; only the products' inputs are
rounded. The rounded operands are what the backward keeps, which halves those saved activations.

On CPUs with bf16 matrix units (AMX, AVX512-BF16) XLA runs a bf16 x bf16 -> f32 product 4-6x faster than the
float32 one, but only in its canonical form (the left operand contracted on its last axis, neither operand
in a transposed layout); any other form is silently widened back to float32. The weight gradient contracts
both operands over their rows, so on CPU it is written against a physically transposed copy of one of them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def _product(a: Array, b: Array, b_axis: int) -> Array:
  """a [M, K] x b contracted on ``b_axis`` -> [M, N] float32.

  On CPU the result passes through an optimization barrier. XLA:CPU decides whether a low-precision
  product keeps its dtype before it assigns layouts; a consumer that then gives the result a transposed
  layout leaves a bf16 x bf16 -> f32 product that its runtime cannot execute ("Unsupported element type for
  DotThunk"). The barrier keeps the result's layout plain.
  """
  out = jax.lax.dot_general(a, b, (((1,), (b_axis,)), ((), ())), preferred_element_type=jnp.float32)
  return jax.lax.optimization_barrier(out) if jax.default_backend() == "cpu" else out


def _transposed(a: Array) -> Array:
  """a.T [K, M] laid out row-major, so that it can be the canonical left operand of a product on CPU.

  A plain transpose becomes a change of layout that XLA:CPU's bf16 product does not accept (it would widen
  the product to float32); two halves transposed and joined are written out as a new row-major array. The
  halves are cut along K, the feature axis: the M rows are the batch, which a data-parallel mesh shards, and
  halves cut along a sharded axis make the partitioner move them between devices (a collective-permute and
  all-to-alls per product). Elsewhere (GPU, TPU) the product reads transposed operands natively and the plain
  transpose is best.
  """
  if jax.default_backend() != "cpu" or a.shape[1] < 2:
    return a.T
  half = a.shape[1] // 2
  return jnp.concatenate([a[:, :half].T, a[:, half:].T], axis=0)


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
    return _product(_transposed(left), right, 0)
  return _product(_transposed(right), left, 0).T


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _mixed(x: Array, w: Array, w_axis: int, operand_dtype, out_dtype, x_dtype, w_dtype) -> Array:
  return _mixed_fwd(x, w, w_axis, operand_dtype, out_dtype, x_dtype, w_dtype)[0]


def _mixed_fwd(x, w, w_axis, operand_dtype, out_dtype, x_dtype, w_dtype):
  xo, wo = x.astype(operand_dtype), w.astype(operand_dtype)
  return _product(xo, wo, w_axis).astype(out_dtype), (xo, wo)


def _mixed_bwd(w_axis, operand_dtype, out_dtype, x_dtype, w_dtype, residuals, g):
  xo, wo = residuals
  go = g.astype(operand_dtype)
  dx = _product(go, wo, 1 - w_axis)  # [N, Din]
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
