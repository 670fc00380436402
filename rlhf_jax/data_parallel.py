"""A model call whose parameter gradient crosses the data axes as one flat sum.

Under jit a weight gradient of a data-parallel step is a product over rows split across devices, so XLA
sums it over the devices (an all-reduce) where it is made: one per weight and per use of that weight.
XLA's combiner then merges them into a few multi-tensor all-reduces, but XLA:CPU's in-process all-reduce
still meets once per tensor (a rendezvous of the device threads for each of the ~140 tensors of a small
model), and its pipeline has no pass that adds two all-reduced partial gradients before the sum: with
``shared_prefix`` (the prompt computed once, then the responses against it) every weight gradient of a
PPO update crossed the devices twice.

``rows_call(fn, mesh, rules)`` computes ``fn(params, rows)`` on each device's rows
(``jax.shard_map`` over the data axes), keeps the backward pass's residuals where they were made, and in
the backward pass sums the per-device parameter gradient over the data axes once. The values are those of
``fn`` on the whole batch; the gradient is the same sum in another order (float rounding).

How the sum crosses depends on the mesh (``flat_sum``). Across processes each tensor of an all-reduce is
one call of the collectives library (gloo on CPU), so the gradient goes as one flat vector: 1.27x (SFT)
and 1.50x (reward) over a psum per leaf, on 2 processes. In one process the per-leaf psum runs as fast (the
devices' threads meet in memory) and compiles 30-40% faster: the flat vector's slices at distinct offsets
make every fused update kernel distinct, which defeats XLA:CPU's kernel deduplication (329 distinct fused
kernels against 155 for the SFT step at bench-small).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, PartitionSpec

from rlhf_jax import sharding

PyTree = Any


def applies(mesh: Mesh | None, rules: Any) -> bool:
  """Whether ``rows_call`` splits anything on ``mesh``: the ``batch`` rule splits rows over more than one
  device, and no parameter is split (every mesh axis a parameter rule names has size 1)."""
  if mesh is None or not sharding.batch_axes(mesh, rules):
    return False
  param_axes = set()
  for name, axes in rules:
    if name != sharding.BATCH and axes is not None:
      param_axes.update((axes,) if isinstance(axes, str) else axes)
  return all(mesh.shape[a] == 1 for a in param_axes)


def flat_sum(mesh: Mesh) -> bool:
  """Whether ``rows_call`` sums the gradient as one flat vector (the mesh spans processes) or leaf by leaf."""
  return sharding.mesh_processes(mesh) > 1


def rows_call(fn: Callable[[PyTree, PyTree], PyTree], mesh: Mesh | None, rules: Any = sharding.DEFAULT_RULES,
              row_group: int = 1) -> Callable[[PyTree, PyTree], PyTree]:
  """``fn(params, rows) -> out`` with its parameter gradient summed over the data axes once (``flat_sum``).

  rows: arrays whose axis 0 is the batch rows (split over the data axes, as the batch is). Every leaf of
  ``out`` leads with the rows. ``fn`` must treat rows independently (a per-row model call, no batch
  statistics, no dropout: each device would draw the same mask for its rows), or groups of
  ``row_group`` consecutive rows (``shared_prefix``). Where ``applies`` is False (one device, or parameters
  sharded over a model axis), or where a call's rows do not split into whole groups per device, ``fn``
  runs as it is.
  """
  if not applies(mesh, rules):
    return fn
  data = sharding.batch_axes(mesh, rules)
  ways = sharding.data_parallel_size(mesh, rules)
  split, whole = PartitionSpec(data), PartitionSpec()

  def local_forward(params, rows):
    out, backward = jax.vjp(lambda p: fn(p, rows), params)
    # ``backward`` is a pytree (its residuals); each device's leaves leave as its own block of a stacked
    # array, so no data moves and the backward pass finds them where they were made.
    return out, jax.tree.map(lambda leaf: jnp.asarray(leaf)[None], backward)

  flat = flat_sum(mesh)

  def local_backward(backward, cotangent):
    (grads,) = jax.tree.map(lambda leaf: leaf[0], backward)(cotangent)
    if not flat:
      return jax.lax.psum(grads, data)
    vector, unflatten = ravel_pytree(grads)
    return unflatten(jax.lax.psum(vector, data))

  @jax.custom_vjp
  def call(params, rows):
    return jax.shard_map(fn, mesh=mesh, in_specs=(whole, split), out_specs=split, check_vma=False)(params, rows)

  def call_fwd(params, rows):
    return jax.shard_map(local_forward, mesh=mesh, in_specs=(whole, split), out_specs=(split, split),
                         check_vma=False)(params, rows)

  def call_bwd(backward, cotangent):
    grads = jax.shard_map(local_backward, mesh=mesh, in_specs=(split, split), out_specs=whole,
                          check_vma=False)(backward, cotangent)
    return grads, None  # rows: no gradient (tokens, masks)

  call.defvjp(call_fwd, call_bwd)

  def dispatch(params, rows):
    count = jax.tree.leaves(rows)[0].shape[0]
    if count % (ways * row_group):
      return fn(params, rows)
    return call(params, rows)

  return dispatch
