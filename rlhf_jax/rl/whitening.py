"""Masked statistics and whitening over response tokens (pure, jit-able)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _count(mask: jax.Array, axis, keepdims: bool = False) -> jax.Array:
  return mask.astype(jnp.float32).sum(axis=axis, keepdims=keepdims)


def masked_mean(
    x: jax.Array, mask: jax.Array, axis: int | tuple[int, ...] | None = None,
    keepdims: bool = False,
) -> jax.Array:
  """Mean of x over entries where mask is 1 (0 when the mask is empty).

  Args:
    x: any shape.
    mask: same shape as x, 0/1.
    axis: axes to reduce; None reduces all.
    keepdims: keep reduced axes with size 1.
  """
  mask = mask.astype(jnp.float32)
  total = (x * mask).sum(axis=axis, keepdims=keepdims)
  n = mask.sum(axis=axis, keepdims=keepdims)
  return total / jnp.where(n > 0, n, 1.0)


def masked_var(
    x: jax.Array, mask: jax.Array, unbiased: bool = False,
    axis: int | tuple[int, ...] | None = None, keepdims: bool = False,
) -> jax.Array:
  """Variance of x over entries where mask is 1.

  Args:
    x: any shape.
    mask: same shape as x, 0/1.
    unbiased: divide by n - 1 instead of n (Bessel). Static.
    axis: axes to reduce; None reduces all.
    keepdims: keep reduced axes with size 1.

  Returns:
    Masked variance (0 when fewer than 1, or for `unbiased` 2, entries).
  """
  mean = masked_mean(x, mask, axis=axis, keepdims=True)
  var = masked_mean((x - mean) ** 2, mask, axis=axis, keepdims=keepdims)
  if unbiased:
    n = _count(mask, axis, keepdims)
    var = var * n / jnp.maximum(n - 1.0, 1.0)
  return var


def masked_whiten(
    x: jax.Array, mask: jax.Array, shift_mean: bool = True
) -> jax.Array:
  """Standardise x with statistics over all masked-in entries.

  Args:
    x: any shape, e.g. advantages [B, R].
    mask: same shape, 0/1.
    shift_mean: True gives (x - mean) / sqrt(var + 1e-8); False keeps the mean,
      (x - mean) / sqrt(var + 1e-8) + mean (used to rescale rewards). Static.

  Returns:
    Same shape as x, float32; 0 at masked-out entries.
  """
  x = x.astype(jnp.float32)
  mean = masked_mean(x, mask)
  var = masked_var(x, mask)
  out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
  if not shift_mean:
    out = out + mean
  return jnp.where(mask.astype(bool), out, 0.0)
