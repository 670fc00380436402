"""Device mesh from config, logical-axis rules, sharded init and batch placement.

Parameters carry logical axis names (``logical_axes`` metadata, e.g.
``("embed", "mlp")``); ``config.sharding.rules`` maps each name to mesh
axes. The mesh always has the axes ``data``, ``fsdp`` and ``tensor``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
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


def maybe_initialize_distributed(enabled: bool) -> None:
  """Multi-host start-up: ``jax.distributed.initialize()`` when ``config.distributed`` is set."""
  if enabled:
    jax.distributed.initialize()


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


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Iterable[Sequence[Any]]) -> PartitionSpec:
  """PartitionSpec for one array. A dimension that the mapped mesh axes do not divide stays
  replicated (logged), so tiny test models still run on big meshes; a mesh axis is used once."""
  rule = _rules_dict(rules)
  used: set[str] = set()
  spec = []
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
        logging.info("logical axis %r (size %d) not divisible by mesh axes %s: replicated", name, dim, axes_t)
      spec.append(None)
      continue
    used.update(axes_t)
    spec.append(axes_t[0] if len(axes_t) == 1 else axes_t)
  return PartitionSpec(*spec)


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
                 rules: Iterable[Sequence[Any]]) -> tuple[nnx.GraphDef, nnx.State]:
  """Builds a module's params directly in their shards (no full copy on one device first).

  Returns ``(graphdef, params)`` with each array placed as its logical axes say.
  """
  abstract = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh, rules)

  def init(k):
    return nnx.split(make(nnx.Rngs(k)))[1]

  return graphdef, jax.jit(init, out_shardings=shardings)(key)


def batch_sharding(mesh: Mesh, rules: Iterable[Sequence[Any]], ndim: int) -> NamedSharding:
  """Sharding of a batch array [B, ...]: rows split as the ``batch`` rule says, the rest replicated.

  A scalar (ndim 0) is replicated."""
  if ndim == 0:
    return NamedSharding(mesh, PartitionSpec())
  axes = _rules_dict(rules).get(BATCH)
  if axes is not None:
    axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
    axes_t = tuple(a for a in axes_t if mesh.shape[a] > 1)
    axes = None if not axes_t else (axes_t[0] if len(axes_t) == 1 else axes_t)
  return NamedSharding(mesh, PartitionSpec(axes, *([None] * (ndim - 1))))


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Iterable[Sequence[Any]]) -> dict[str, jax.Array]:
  """Places this process's rows of a batch on the mesh (multi-host safe).

  Each host passes its own slice; the global batch is the concatenation over hosts.
  """
  rules = tuple(rules)
  out = {}
  for name, value in batch.items():
    value = np.asarray(value)
    sharding = batch_sharding(mesh, rules, value.ndim)
    out[name] = jax.make_array_from_process_local_data(sharding, value)
  return out


def replicated(mesh: Mesh) -> NamedSharding:
  """A fully replicated sharding on ``mesh``."""
  return NamedSharding(mesh, PartitionSpec())
