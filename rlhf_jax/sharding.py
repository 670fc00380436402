"""Device mesh from config, logical-axis rules, sharded init and batch placement.

Parameters carry logical axis names (``logical_axes`` metadata, e.g.
``("embed", "mlp")``); ``config.sharding.rules`` maps each name to mesh
axes. The mesh always has the axes ``data``, ``fsdp`` and ``tensor``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = "batch"

# Logical name -> mesh axes. Batch rows split over data and fsdp; weights over
# fsdp along their model dimension and over tensor along heads/mlp/vocab.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("position", None),
    ("norm", None),
)


def mesh_shape(axis_sizes: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
  """Resolves ``{data, fsdp, tensor}`` sizes (one may be -1: fills the rest) for ``num_devices``."""
  unknown = sorted(set(axis_sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {unknown}; the axes are {list(MESH_AXES)}")
  sizes = [int(axis_sizes.get(a, 1)) for a in MESH_AXES]
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive, with at most one -1")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible "
                       f"by the fixed axes (product {known})")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"but {num_devices} are available")
  return tuple(sizes)


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``Mesh`` with axes (data, fsdp, tensor) over ``devices`` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(axis_sizes, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _rules_dict(rules: Iterable[Sequence[Any]]) -> dict[str, Any]:
  out = {}
  for rule in rules:
    name, axes = rule
    if isinstance(axes, list):
      axes = tuple(axes)
    out[name] = axes
  return out


def _spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
          rules: Iterable[Sequence[Any]]) -> tuple[PartitionSpec, list[tuple[str, int, tuple[str, ...]]]]:
  """(PartitionSpec, [(logical name, size, mesh axes)] of dimensions left replicated because the mesh axes
  their rule names do not divide them)."""
  rule = _rules_dict(rules)
  used: set[str] = set()
  spec, indivisible = [], []
  for name, dim in zip(logical_axes, shape):
    axes = rule.get(name) if name is not None else None
    if axes is None:
      spec.append(None)
      continue
    axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
    axes_t = tuple(a for a in axes_t if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes_t)
    if not axes_t or dim % size:
      if axes_t:
        indivisible.append((name, dim, axes_t))
      spec.append(None)
      continue
    used.update(axes_t)
    spec.append(axes_t[0] if len(axes_t) == 1 else axes_t)
  return PartitionSpec(*spec), indivisible


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Iterable[Sequence[Any]]) -> PartitionSpec:
  """PartitionSpec for one array. A dimension that the mapped mesh axes do not divide stays
  replicated, so tiny test models still run on big meshes (``replicated_params`` lists them, and the
  stage context logs and counts them once per run); a mesh axis is used once."""
  return _spec(logical_axes, shape, mesh, rules)[0]


def state_shardings(state: Any, mesh: Mesh, rules: Iterable[Sequence[Any]]) -> Any:
  """NamedShardings for every array of a pytree; ``nnx.Variable`` leaves use their ``logical_axes``."""
  rules = tuple(rules)

  def one(x):
    if isinstance(x, nnx.Variable):
      axes = x.get_metadata().get("logical_axes")
      value = x.get_value()
      spec = PartitionSpec() if axes is None else logical_to_spec(axes, value.shape, mesh, rules)
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def init_sharded(make: Callable[[nnx.Rngs], nnx.Module], key: jax.Array, mesh: Mesh,
                 rules: Iterable[Sequence[Any]],
                 abstract: tuple[nnx.GraphDef, nnx.State] | None = None) -> tuple[nnx.GraphDef, nnx.State]:
  """Builds a module's params directly in their shards (no full copy on one device first).

  Returns ``(graphdef, params)`` with each array placed as its logical axes say. ``abstract``: the
  module's ``nnx.split(nnx.eval_shape(...))`` when the caller has it already (else traced here).
  """
  graphdef, abstract_state = abstract or nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
  return graphdef, _sharded_init(make, *tree_key(state_shardings(abstract_state, mesh, rules)))(key)


def tree_key(tree: Any) -> tuple:
  """``(treedef, leaves)`` of a pytree of shardings: a hashable key for memoising on it (``jax.tree.unflatten``
  gives the tree back)."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple(leaves)


@functools.lru_cache(maxsize=16)
def _sharded_init(make: Callable[[nnx.Rngs], nnx.Module], treedef, leaves: tuple) -> Callable:
  """Jitted ``init(key) -> params`` placed in the shardings ``(treedef, leaves)``; one per model factory and
  layout in a process, so a later init of the same model compiles nothing."""
  return jax.jit(lambda k: nnx.split(make(nnx.Rngs(k)))[1], out_shardings=jax.tree.unflatten(treedef, leaves))


def batch_axes(mesh: Mesh, rules: Iterable[Sequence[Any]]) -> tuple[str, ...]:
  """The mesh axes (of size > 1) that the ``batch`` rule splits rows over, e.g. ("data", "fsdp")."""
  axes = _rules_dict(rules).get(BATCH)
  if axes is None:
    return ()
  axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
  return tuple(a for a in axes_t if mesh.shape[a] > 1)


def mesh_processes(mesh: Mesh) -> int:
  """How many processes hold devices of ``mesh`` (1 on one host)."""
  return len({d.process_index for d in np.asarray(mesh.devices).flat})


def data_parallel_size(mesh: Mesh, rules: Iterable[Sequence[Any]]) -> int:
  """How many ways batch rows are split (data x fsdp with the default rules), over all processes."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def batch_sharding(mesh: Mesh, rules: Iterable[Sequence[Any]], ndim: int) -> NamedSharding:
  """Sharding of a batch array [B, ...]: rows split as the ``batch`` rule says, the rest replicated.

  A scalar (ndim 0) is replicated."""
  if ndim == 0:
    return NamedSharding(mesh, PartitionSpec())
  axes_t = batch_axes(mesh, rules)
  axes = None if not axes_t else (axes_t[0] if len(axes_t) == 1 else axes_t)
  return NamedSharding(mesh, PartitionSpec(axes, *([None] * (ndim - 1))))


def rows_sharding(mesh: Mesh, rules: Iterable[Sequence[Any]], shape: Sequence[int]) -> NamedSharding:
  """``batch_sharding`` for an array of ``shape``, replicated if the data-parallel size does not divide its
  rows (a device-made batch with a fixed row count, e.g. PPO experience of 7 rollouts on 4-way data)."""
  if len(shape) and shape[0] % data_parallel_size(mesh, rules):
    return NamedSharding(mesh, PartitionSpec())
  return batch_sharding(mesh, rules, len(shape))


def constrain_minibatch_rows(tree: Any, mesh: Mesh, rules: Iterable[Sequence[Any]]) -> Any:
  """Inside jit: each leaf [M, R, ...] (minibatches of R rows) held with its rows split as the ``batch``
  rule says (``rows_sharding`` of [R, ...]: replicated where the data-parallel size does not divide R).

  A gather by a random permutation (PPO's minibatch split) leaves XLA free to replicate its result, and
  then every device computes the whole minibatch: on 2 CPU devices PPO's update ran 2x slower than on one.
  """
  def one(x):
    rows = rows_sharding(mesh, rules, x.shape[1:])
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(None, *rows.spec)))

  return jax.tree.map(one, tree)


def padded_rows(rows: int, multiple: int) -> int:
  """``rows`` rounded up to a multiple of ``multiple`` (at least one block)."""
  return max(-(-rows // multiple), 1) * multiple


def pad_batch(batch: Mapping[str, np.ndarray], multiple: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Pads the rows (axis 0) of every array of a host batch to a multiple of ``multiple``.

  Padded rows are all zeros: every mask, loss mask and response mask is 0 there, so a loss or mean
  normalised by a mask ignores them without knowing about padding (attention over a fully masked row
  is finite). Scalars (ndim 0) are left alone. Returns ``(padded batch, valid [rows_padded] bool)``,
  real rows first.
  """
  sizes = {len(np.asarray(v)) for v in batch.values() if np.ndim(v)}
  if len(sizes) > 1:
    raise ValueError(f"batch arrays differ in rows: { {k: np.shape(v) for k, v in batch.items()} }")
  rows = sizes.pop() if sizes else 0
  target = padded_rows(rows, multiple)
  out = {}
  for name, value in batch.items():
    value = np.asarray(value)
    if value.ndim and target != rows:
      value = np.concatenate([value, np.zeros((target - rows, *value.shape[1:]), value.dtype)])
    out[name] = value
  return out, np.arange(target) < rows


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Iterable[Sequence[Any]],
              with_valid: bool = False) -> dict[str, jax.Array]:
  """Places a host batch on the mesh: the one rule for every host batch, on one process or many.

  ``batch`` is the global batch, the same on every process (batches are functions of seed and step).
  Its rows are padded with zero rows (``pad_batch``) to a multiple of the data-parallel size of the
  whole mesh (data x fsdp over all processes), so any row count fits any mesh and every process agrees
  on the shapes; each process then copies to its devices only the rows they hold
  (``jax.make_array_from_callback``), so the arrays, and the results, are those of one process on the
  same mesh. Masks are 0 on padded rows, so mask-normalised losses ignore them; anything that averages
  or counts rows must read ``valid``: with ``with_valid`` the result also holds ``"valid"``
  [B_padded] int32 (1 = a real row).
  """
  rules = tuple(rules)
  padded, valid = pad_batch(batch, data_parallel_size(mesh, rules))
  if with_valid:
    padded["valid"] = valid.astype(np.int32)
  out = {}
  for name, value in padded.items():
    sharding = batch_sharding(mesh, rules, value.ndim)
    out[name] = jax.make_array_from_callback(value.shape, sharding, lambda index, v=value: np.asarray(v[index]))
  return out


def take_rows(tree: Any, valid: jax.Array, rows: int) -> Any:
  """The ``rows`` real rows (in order) of every array [B_padded, ...] of a padded batch pytree; for use
  under ``jit`` where a computation must see exactly the real rows (batch statistics, minibatch splits).
  ``rows`` (static) must equal ``valid.sum()``."""
  index = jnp.nonzero(valid, size=rows, fill_value=0)[0]
  return jax.tree.map(lambda x: x[index], tree)


def replicated(mesh: Mesh) -> NamedSharding:
  """A fully replicated sharding on ``mesh``."""
  return NamedSharding(mesh, PartitionSpec())


def replicated_params(state: Any, mesh: Mesh, rules: Iterable[Sequence[Any]]) -> dict[str, str]:
  """Arrays of an ``nnx`` state (abstract is fine) that stay replicated along a mesh axis their rules
  name because it does not divide the dimension (e.g. 4 heads on tensor=8): path -> "name=size on axes"."""
  rules = tuple(rules)
  found = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    if not isinstance(leaf, nnx.Variable):
      continue
    axes = leaf.get_metadata().get("logical_axes")
    if axes is None:
      continue
    _, indivisible = _spec(axes, leaf.get_value().shape, mesh, rules)
    if indivisible:
      found[jax.tree_util.keystr(path)] = ", ".join(f"{n}={d} on {'x'.join(a)}" for n, d, a in indivisible)
  return found
