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


SCHEDULES = ("constant", "linear", "cosine")


def _check_schedule(decay: str) -> None:
  if decay not in SCHEDULES:
    raise ValueError(f"optimizer.schedule must be constant, linear or cosine, got {decay!r}")


def schedule_factor(count: jax.Array, total_steps, warmup_steps=0, decay: str | jax.Array = "cosine",
                    end_factor=0.1) -> jax.Array:
  """The learning-rate multiplier [] float32 at optimizer step ``count``: linear warmup from 0 over
  ``warmup_steps``, then ``constant``, ``linear`` or ``cosine`` decay to ``end_factor`` over the remaining
  ``total_steps - warmup_steps`` (at least 1), held there after. ``decay``: a name, or its index in
  ``SCHEDULES`` (may be traced). Every number may be traced: they ride in the optimizer state, so runs that
  differ only in them compile the same programs."""
  if isinstance(decay, str):
    _check_schedule(decay)
  count = jnp.asarray(count, jnp.float32)
  warmup = jnp.asarray(warmup_steps, jnp.float32)
  end = jnp.asarray(end_factor, jnp.float32)
  done = jnp.clip(count - jnp.maximum(warmup, 0.0), 0.0, None) / jnp.maximum(
      jnp.asarray(total_steps, jnp.float32) - jnp.maximum(warmup, 0.0), 1.0)
  done = jnp.minimum(done, 1.0)
  after = {"constant": jnp.ones_like(done), "linear": 1.0 + (end - 1.0) * done,
           "cosine": (1.0 - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * done)) + end}
  if isinstance(decay, str):
    chosen = after[decay]
  else:
    chosen = jnp.select([jnp.asarray(decay) == i for i in range(len(SCHEDULES))], [after[k] for k in SCHEDULES])
  return jnp.where(count < warmup, count / jnp.maximum(warmup, 1.0), chosen)


def learning_rate_schedule(lr: float, total_steps: int, warmup_steps: int = 0,
                           decay: str | jax.Array = "cosine", end_factor: float = 0.1) -> optax.Schedule:
  """``count -> lr * schedule_factor(count, ...)``: linear warmup then ``constant``, ``linear`` or ``cosine``
  decay to ``lr * end_factor`` (the numbers, and the decay's index in ``SCHEDULES``, may be traced)."""
  if isinstance(decay, str):
    _check_schedule(decay)
  return lambda count: lr * schedule_factor(count, total_steps, warmup_steps, decay, end_factor)


def learning_rate(opt_state: Any) -> jax.Array:
  """The learning rate [] float32 the next update of a ``make_optimizer`` state applies (its ``train/lr``)."""
  h = opt_state.hyperparams
  return h["lr"] * schedule_factor(opt_state.count, h["total_steps"], h["warmup_steps"], h["schedule"],
                                   h["end_factor"])


def make_optimizer(cfg: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
  """AdamW with global-norm clipping and a schedule, from ``config.<stage>.optimizer``.

  Keys: lr, warmup_steps, schedule, end_factor, b1, b2, eps, weight_decay, grad_clip.
  Weight decay skips vectors and scalars (norms, biases, heads' bias). The settings (and ``total_steps``; the
  schedule as its index in ``SCHEDULES``) live in the optimizer state (``optax.inject_hyperparams``), not in the
  compiled step: runs and stages that differ only in them (a learning-rate sweep's trials, an iterated run's
  rounds of other lengths) run the same programs, read back from the persistent compilation cache. Only
  whether ``grad_clip`` is on shapes the program. ``learning_rate(opt_state)`` reads the current rate. Equal
  settings give the same transformation object within a process, so the step functions built on it (memoised
  on their arguments) and their compiled programs are shared by every stage that trains with those settings.
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


def _adamw(lr, total_steps, warmup_steps, end_factor, schedule, b1, b2, eps, weight_decay, grad_clip,
           clip: bool) -> optax.GradientTransformation:
  """The optimizer with its numbers as arguments (traced inside ``inject_hyperparams``'s update)."""
  parts = [optax.clip_by_global_norm(grad_clip)] if clip else []
  parts.append(optax.adamw(learning_rate_schedule(lr, total_steps, warmup_steps, schedule, end_factor), b1=b1,
                           b2=b2, eps=eps, weight_decay=weight_decay, mask=_matrices))
  return optax.chain(*parts)


@functools.lru_cache(maxsize=64)
def _optimizer(settings: tuple, total_steps: int) -> optax.GradientTransformation:
  cfg = dict(settings)
  decay = cfg.get("schedule", "cosine")
  _check_schedule(decay)
  numbers = dict(lr=float(cfg["lr"]), total_steps=int(total_steps), warmup_steps=int(cfg.get("warmup_steps", 0)),
                 end_factor=float(cfg.get("end_factor", 0.1)), schedule=SCHEDULES.index(decay),
                 b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.95)), eps=float(cfg.get("eps", 1e-8)),
                 weight_decay=float(cfg.get("weight_decay", 0.0)), grad_clip=float(cfg.get("grad_clip", 0.0)))
  # float32 hyperparameters whatever the params' dtype: a bf16 learning rate would lose most of its digits.
  return optax.inject_hyperparams(_adamw, static_args=("clip",), hyperparam_dtype=jnp.float32)(
      **numbers, clip=numbers["grad_clip"] > 0)


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


def _injected(opt_state: Any) -> bool:
  return isinstance(opt_state, optax.InjectStatefulHyperparamsState)


def learning_rate_metrics(opt_state: Any, name: str = "train/lr") -> dict[str, jax.Array]:
  """``{name: learning_rate(opt_state)}`` for a ``make_optimizer`` state (the rate its next update applies);
  ``{}`` for any other optax state."""
  if _injected(opt_state) and "schedule" in opt_state.hyperparams:
    return {name: learning_rate(opt_state)}
  return {}


def legacy_opt_layout(state: TrainState) -> TrainState:
  """``state`` with each optimizer state as rlhf_jax checkpointed it before its numbers moved into the state
  (``make_optimizer``): the bare inner transformation's state. A restore target for such checkpoints."""
  return state.replace(opt_state={k: v.inner_state if _injected(v) else v for k, v in state.opt_state.items()})


def from_legacy_opt_layout(fresh: TrainState, restored: TrainState) -> TrainState:
  """A state restored in ``legacy_opt_layout`` put back in today's layout: each inner optimizer state in
  ``fresh``'s wrapper (whose numbers come from this run's config, which the workdir's config check keeps equal
  to the checkpoint's), its update count set to the inner state's."""
  opt_state = {}
  for name, value in restored.opt_state.items():
    wrapper = fresh.opt_state[name]
    if _injected(wrapper):
      counts = [c for _, c in optax.tree_utils.tree_get_all_with_path(value, "count")]
      count = counts[0] if counts else wrapper.count
      value = wrapper._replace(count=jnp.asarray(count, wrapper.count.dtype), inner_state=value)
    opt_state[name] = value
  return restored.replace(opt_state=opt_state)


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
