"""The one train-state pytree, its shardings, the optimizer and step compilation.

A stage's ``TrainState`` holds everything that changes while it trains:
the step, the params of every trained model (plain nested dicts, keyed by
model name, e.g. ``{"policy": ..., "value": ...}``), their optimizer states,
the run's base RNG key and stage scalars (KL coefficient, ...). Frozen params
(reference policy, reward model) travel beside it and are never donated.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax import sharding as shd

PyTree = Any


@struct.dataclass
class TrainState:
  """step: int32 scalar; params/opt_state: dicts keyed by model name; rng: uint32 key data [2];
  scalars: dict of float32 scalars owned by the stage (e.g. ``kl_coef``)."""

  step: jax.Array
  params: dict[str, PyTree]
  opt_state: dict[str, PyTree]
  rng: jax.Array
  scalars: dict[str, jax.Array]


def step_key(state: TrainState, stream: int = 0) -> jax.Array:
  """A PRNG key derived only from the seed, the step and a stream id (never from wall clock)."""
  base = jax.random.wrap_key_data(state.rng)
  return jax.random.fold_in(jax.random.fold_in(base, state.step), stream)


def seed_key_data(seed: int) -> jax.Array:
  """Raw uint32 key data for ``seed`` (checkpointable)."""
  return jax.random.key_data(jax.random.key(seed))


def learning_rate_schedule(lr: float, total_steps: int, warmup_steps: int = 0,
                           decay: str = "cosine", end_factor: float = 0.1) -> optax.Schedule:
  """Linear warmup then ``constant``, ``linear`` or ``cosine`` decay to ``lr * end_factor``."""
  decay_steps = max(total_steps - warmup_steps, 1)
  if decay == "constant":
    after = optax.constant_schedule(lr)
  elif decay == "linear":
    after = optax.linear_schedule(lr, lr * end_factor, decay_steps)
  elif decay == "cosine":
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=end_factor)
  else:
    raise ValueError(f"optimizer.schedule must be constant, linear or cosine, got {decay!r}")
  if warmup_steps <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), after], [warmup_steps])


def make_optimizer(cfg: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
  """AdamW with global-norm clipping and a schedule, from ``config.<stage>.optimizer``.

  Keys: lr, warmup_steps, schedule, end_factor, b1, b2, eps, weight_decay, grad_clip.
  Weight decay skips vectors and scalars (norms, biases, heads' bias). Equal settings give the same
  transformation object within a process, so the step functions built on it (memoised on their arguments)
  and their compiled programs are shared by every stage that trains with those settings.
  """
  return _optimizer(_frozen(cfg), int(total_steps))


def _frozen(cfg: Mapping[str, Any]) -> tuple:
  """A hashable, order-independent copy of flat optimizer settings (sequences become tuples)."""
  items = []
  for key, value in sorted(dict(cfg).items()):
    if isinstance(value, list):
      value = tuple(value)
    try:
      hash(value)
    except TypeError:
      raise ValueError(f"optimizer.{key} must be a number, string or flat sequence, got {value!r}") from None
    items.append((key, value))
  return tuple(items)


@functools.lru_cache(maxsize=64)
def _optimizer(settings: tuple, total_steps: int) -> optax.GradientTransformation:
  cfg = dict(settings)
  schedule = learning_rate_schedule(cfg["lr"], total_steps, cfg.get("warmup_steps", 0),
                                    cfg.get("schedule", "cosine"), cfg.get("end_factor", 0.1))
  parts = []
  if cfg.get("grad_clip", 0.0):
    parts.append(optax.clip_by_global_norm(cfg["grad_clip"]))
  parts.append(optax.adamw(schedule, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.95), eps=cfg.get("eps", 1e-8),
                           weight_decay=cfg.get("weight_decay", 0.0), mask=_matrices))
  return optax.chain(*parts)


def _matrices(params: PyTree) -> PyTree:
  """Weight-decay mask: True on parameters with >= 2 dimensions."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def param_shardings(abstract_params: nnx.State, mesh: Mesh, rules) -> dict:
  """Plain-dict tree of NamedShardings for a model's (abstract) nnx state."""
  return nnx.State(shd.state_shardings(abstract_params, mesh, rules)).to_pure_dict()


def create_train_state(params: Mapping[str, PyTree], optimizers: Mapping[str, optax.GradientTransformation],
                       shardings: Mapping[str, PyTree], mesh: Mesh, seed: int,
                       scalars: Mapping[str, float] | None = None) -> tuple[TrainState, TrainState]:
  """Builds the state (optimizer states created in their shards) and the matching tree of shardings.

  params: model name -> plain dict of arrays; shardings: model name -> matching NamedShardings.
  Returns ``(state, state_shardings)``.
  """
  rep = shd.replicated(mesh)
  opt_shardings = {}
  opt_state = {}
  for name, tx in optimizers.items():
    abstract = _opt_init(tx).eval_shape(params[name])
    opt_shardings[name] = optax.tree_map_params(tx, lambda _, s: s, abstract, shardings[name],
                                                transform_non_params=lambda _: rep)
    opt_state[name] = _sharded_opt_init(tx, *shd.tree_key(opt_shardings[name]))(params[name])
  scalars = {k: jax.device_put(jnp.asarray(v, jnp.float32), rep) for k, v in (scalars or {}).items()}
  state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), rep), params=dict(params),
                     opt_state=opt_state, rng=jax.device_put(seed_key_data(seed), rep), scalars=scalars)
  state_sh = TrainState(step=rep, params={k: shardings[k] for k in params}, opt_state=opt_shardings, rng=rep,
                        scalars={k: rep for k in scalars})
  return state, state_sh


@functools.lru_cache(maxsize=64)
def _opt_init(tx: optax.GradientTransformation) -> Callable:
  """Jitted ``tx.init`` (for its ``eval_shape``: traced once per transformation in a process)."""
  return jax.jit(tx.init)


@functools.lru_cache(maxsize=64)
def _sharded_opt_init(tx: optax.GradientTransformation, treedef, leaves: tuple) -> Callable:
  """Jitted ``tx.init`` placing the state in the shardings ``(treedef, leaves)``; one per transformation and
  layout in a process."""
  return jax.jit(tx.init, out_shardings=jax.tree.unflatten(treedef, leaves))


def abstract_like(tree: PyTree, shardings: PyTree) -> PyTree:
  """ShapeDtypeStructs of ``tree`` carrying ``shardings`` (a restore target for Orbax)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def compile_step(step_fn: Callable, state_shardings: TrainState, batch_shardings: PyTree,
                 frozen_shardings: PyTree, mesh: Mesh) -> Callable:
  """``jit(step_fn)`` with explicit in/out shardings and the state donated.

  step_fn(state, batch, frozen) -> (state, metrics); metrics come back replicated. The same ``step_fn`` with
  equal shardings gives back the same jitted function in a process (a later stage, or the next round of an
  iterated run, reuses its traced and compiled programs).
  """
  return _compiled_step(step_fn, *shd.tree_key(state_shardings), *shd.tree_key(batch_shardings),
                        *shd.tree_key(frozen_shardings), mesh)


@functools.lru_cache(maxsize=64)
def _compiled_step(step_fn: Callable, state_def, state_leaves, batch_def, batch_leaves, frozen_def, frozen_leaves,
                   mesh: Mesh) -> Callable:
  shardings = (jax.tree.unflatten(state_def, state_leaves), jax.tree.unflatten(batch_def, batch_leaves),
               jax.tree.unflatten(frozen_def, frozen_leaves))
  return jax.jit(step_fn, in_shardings=shardings, out_shardings=(shardings[0], NamedSharding(mesh, PartitionSpec())),
                 donate_argnums=(0,))
