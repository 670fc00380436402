"""Where a decoder's weights sit while a sampler decodes: the training mesh's devices re-viewed tensor-parallel.

A decode step multiplies a few rows per device by every weight. On a data-parallel mesh each device holds all
the weights and a slice of the rows, so each step reads every weight on every device for ``rows / n`` rows
each. Viewed tensor-parallel over the same devices (heads, MLP columns and vocabulary split ``t`` ways, all
rows on each of them), each device reads ``1/t`` of the weights for all the rows, and the products run with
``t`` times the rows per weight read, for two all-reduces of [rows, d_model] per layer.

Inside the sampler's jit, ``DecodeLayout.place`` moves the weights to that view (each device slices what it
already holds, no transfer on a data-parallel mesh) and gathers the prompt rows, and ``back`` hands the
sampled rows to the training mesh's batch layout, so callers see the same shardings either way. Tokens
agree with the training layout's up to float rounding of the split sums.

Whether the view pays depends on the host as much as on the model (at bench-small it paid 1.09x on an Intel
Xeon and lost 0.73-0.79x on an AMD EPYC), so "auto" times a few decode steps in both layouts the first time a
sampler of a given shape is traced (``view_pays``) and keeps the faster.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from rlhf_jax import compute, data_parallel, distributed, sharding as shd
from rlhf_jax.atomic_file import write_atomic
from rlhf_jax.models.decoder import decode_cache_lengths, init_cache

MODES = ("auto", "tensor", "as_trained")
# "auto" never re-views a decode step of fewer FLOPs per device than this (``compute.forward_flops`` of its rows
# per device): there the view's per-layer all-reduces cost more than its larger products save on every host
# measured. On 2 CPU devices sampling 32 rows, 4 layers, new tokens/s of the view against the data-parallel
# layout (README, Performance): on an Intel Xeon 0.45-0.50x for the tiny preset (~5 MFLOP) and 0.97-0.99x at
# d_model 128 (42 MFLOP), on an AMD EPYC 0.38x at 128. Above it the view paid on one host and lost on the
# other (Intel 1.09x, AMD 0.73-0.79x at d_model 256, 139 MFLOP), so "auto" times both (``view_pays``).
AUTO_MIN_STEP_FLOPS = 64e6
# ``view_pays`` times this many decode steps per call, the best of this many calls per layout.
TIMED_STEPS = 8
TIMED_CALLS = 3
# ... and takes the view only where it ran at least this much faster: near a tie the training layout is kept,
# which needs no resharding and one program less.
VIEW_MIN_SPEEDUP = 1.05


def tensor_ways(cfg: Any, devices_per_process: int) -> int:
  """The largest t dividing ``devices_per_process`` and the query heads, KV heads and MLP width of a
  ``DecoderConfig``: the dims a layer splits (one t does not divide would stay whole on every device and be
  computed t times). A vocabulary t does not divide stays whole too (see ``decode_mesh``)."""
  common = math.gcd(cfg.num_heads, cfg.kv_heads, cfg.d_ff)
  return max(t for t in range(1, devices_per_process + 1) if devices_per_process % t == 0 and common % t == 0)


def check_mode(mode: str) -> str:
  """``mode`` if it is one of ``MODES``, else a ValueError naming the config key."""
  if mode not in MODES:
    raise ValueError(f"config.sharding.decode must be one of {MODES}, got {mode!r}")
  return mode


def decode_mesh(mesh: Mesh, rules: Any, cfg: Any, mode: str = "auto", step_flops: float = math.inf) -> Mesh | None:
  """The devices of ``mesh`` as axes (data=n/t, fsdp=1, tensor=t) for decoding a ``DecoderConfig``, in the
  same device order, each tensor group inside one process (the per-layer all-reduces never cross hosts).

  ``mode``: "tensor" re-views whenever t > 1 changes the layout; "as_trained" never; "auto" offers the view
  of a purely data-parallel mesh (``data_parallel.applies``) whose decode step does ``step_flops`` >=
  ``AUTO_MIN_STEP_FLOPS`` per device, where t divides the vocabulary: ``DecodeLayout`` then takes it only
  where ``view_pays``. A mesh already split over fsdp or tensor keeps the layout it was given. None: decode
  as the weights sit.
  """
  if check_mode(mode) == "as_trained":
    return None
  if mode == "auto" and (not data_parallel.applies(mesh, rules) or step_flops < AUTO_MIN_STEP_FLOPS):
    return None
  t = tensor_ways(cfg, mesh.devices.size // shd.mesh_processes(mesh))
  if t <= 1 or (mode == "auto" and cfg.vocab_size % t):
    return None  # auto: a vocabulary t does not divide keeps the LM head whole, computed on every device
  grid = decode_grid(np.asarray(mesh.devices).reshape(-1), t)
  if grid is None or grid.shape == mesh.devices.shape:
    return None  # a group would span hosts, or the mesh is this layout already
  return Mesh(grid, mesh.axis_names)


def decode_grid(devices: np.ndarray, t: int) -> np.ndarray | None:
  """Devices [n] (in mesh order) as a grid [n/t, 1, t] whose tensor rows each lie in one process; None if
  the order puts some group of t across processes (a per-layer all-reduce would then cross hosts)."""
  grid = np.asarray(devices).reshape(-1, 1, t)
  if any(len({d.process_index for d in group}) > 1 for group in grid[:, 0]):
    return None
  return grid


def _constrain_rows(tree: Any, mesh: Mesh, rules: tuple) -> Any:
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, shd.rows_sharding(mesh, rules, x.shape)), tree)


def _in_view(model: nnx.Module, view: Mesh, rules: tuple) -> nnx.Module:
  """``model`` with its weights constrained to ``view``'s layout (inside jit)."""
  state = nnx.state(model)
  nnx.update(model, jax.lax.with_sharding_constraint(state, shd.state_shardings(state, view, rules)))
  return model


@dataclasses.dataclass(frozen=True)
class TimedChoice:
  """What ``view_pays`` timed for one sampler shape: ms per decode step in each layout (None where it could
  not time) and the answer every process took."""

  rows: int
  slots: int
  view_shape: dict
  trained_ms: float | None
  view_ms: float | None
  view: bool


# (graphdef, rows, slots, pick, mesh, view, rules, record) -> what was timed, for each shape asked in this process.
_VIEW_PAYS: dict[tuple, TimedChoice] = {}


def timed_choices() -> list[TimedChoice]:
  """Every choice ``view_pays`` made in this process, in order."""
  return list(_VIEW_PAYS.values())


# A sampler's token pick: (logits [B, V] float32, key) -> (token [B] int32, its log-prob [B]); hashable, so a
# timing is kept per way of sampling (``generate.TokenPicker``).
Pick = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def view_pays(model: nnx.Module, mesh: Mesh, view: Mesh, rules: tuple, rows: int, slots: int,
              pick: Pick | None = None, record: str = "") -> bool:
  """Whether decode steps of ``model`` (a decoder) for ``rows`` rows (global) reading a KV cache of ``slots``
  slots, each picking its token with ``pick`` (None: greedy), run faster with the weights in ``view`` than as
  they sit on ``mesh``.

  Timed the first time a process asks for a given model structure, shape, pick and meshes (later calls read
  the answer): ``TIMED_STEPS`` decode steps from a full cache, on zero weights of the model's shapes and
  training layout, compiled in each layout and run alternately, the best of ``TIMED_CALLS`` calls each; yes
  where the view was ``VIEW_MIN_SPEEDUP`` times faster. Safe to call while tracing (only ``model``'s shapes
  are read; the timing runs eagerly). With several processes every one times, and process 0's answer is taken
  by all, so they compile the same programs. Where a device reports less free memory than twice the weights
  (``_room_for_copy``), nothing is timed and the answer is no.

  ``record``: a JSON file (a run's ``decode_layout.json``) keeping the answers: one found there is taken
  without timing, a new one is added (by process 0). A resumed run then samples in the layout the run began
  with (the layouts' tokens differ by float rounding), whatever a new timing would say.
  """
  graphdef, state = nnx.split(model)
  key = (graphdef, rows, slots, pick, mesh, view, rules, record)
  if key not in _VIEW_PAYS:
    # What identifies the choice in the record, across processes and runs.
    name = repr((model.cfg, pick, rows, slots, dict(mesh.shape), dict(view.shape), rules))
    _VIEW_PAYS[key] = _timed_choice(graphdef, state, mesh, view, rules, rows, slots, pick, record,
                                    hashlib.sha256(name.encode()).hexdigest()[:16])
  return _VIEW_PAYS[key].view


def _recorded(record: str) -> list[dict]:
  """The choices a record file holds ([] where there is none yet)."""
  if not record or not epath.Path(record).exists():
    return []
  path = epath.Path(record)
  try:
    entries = json.loads(path.read_text())["choices"]
    if not all(isinstance(e, dict) and isinstance(e.get("key"), str) and isinstance(e.get("view"), bool)
               for e in entries):
      raise ValueError("an entry lacks its key or view")
    return entries
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{record}: not a decode layout record ({e}); delete it to time the layouts again") from None


def _timed_choice(graphdef: nnx.GraphDef, state: Any, mesh: Mesh, view: Mesh, rules: tuple, rows: int,
                  slots: int, pick: Pick | None, record: str, record_key: str) -> TimedChoice:
  with jax.ensure_compile_time_eval():
    entries, damage, stored = [], None, None
    if distributed.is_primary():
      try:
        entries = _recorded(record)
      except ValueError as e:
        damage = e
      stored = next((e for e in entries if e["key"] == record_key), None)
    # Every process learns what process 0 found: -2 a damaged record, -1 nothing, else the recorded answer.
    known = int(distributed.from_primary(np.int32(-2 if damage else -1 if stored is None else stored["view"])))
    if known == -2:
      raise damage or ValueError(f"{record}: not a decode layout record (read by process 0)")
    if known >= 0:
      logging.info("decode layout for %d rows, %d cache slots: %s, as %s records", rows, slots,
                   "view" if known else "as trained", record)
      stored = stored or {}  # other processes than 0 learn only the answer
      return TimedChoice(rows, slots, dict(view.shape), stored.get("trained_ms"), stored.get("view_ms"),
                         bool(known))
    if not distributed.all_processes(_room_for_copy(state, mesh)):
      logging.info("decode layout: too little free device memory to time a copy of the weights; as trained")
      return TimedChoice(rows, slots, dict(view.shape), None, None, False)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
    zeros = jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                    out_shardings=nnx.to_pure_dict(shd.state_shardings(state, mesh, rules)))()
    token = jax.device_put(np.zeros(rows, np.int32), shd.rows_sharding(mesh, rules, (rows,)))
    runs = {name: _decode_steps(graphdef, mesh, v, rules, rows, slots, pick).lower(zeros, token).compile()
            for name, v in (("trained", None), ("view", view))}
    best = {name: math.inf for name in runs}
    for call in range(TIMED_CALLS + 1):  # the first call of each warms up
      for name, run in runs.items():
        start = time.perf_counter()
        run(zeros, token).block_until_ready()
        seconds = time.perf_counter() - start
        if call:
          best[name] = min(best[name], seconds)
    pays = bool(distributed.from_primary(np.int32(best["view"] * VIEW_MIN_SPEEDUP < best["trained"])))
  choice = TimedChoice(rows, slots, dict(view.shape), 1e3 * best["trained"] / TIMED_STEPS,
                       1e3 * best["view"] / TIMED_STEPS, pays)
  logging.info("decode layout for %d rows, %d cache slots: as trained %.3f ms/step, tensor view %s %.3f ms/step: "
               "%s", rows, slots, choice.trained_ms, choice.view_shape, choice.view_ms,
               "view" if pays else "as trained")
  if record and distributed.is_primary():
    entries.append({"key": record_key, **dataclasses.asdict(choice)})
    write_atomic(record, json.dumps({"choices": entries}, indent=1) + "\n")
  return choice


def _room_for_copy(state: Any, mesh: Mesh) -> bool:
  """Whether each device of ``mesh`` here has free memory for twice ``state``'s arrays whole (the timing's
  zero weights and the view's slices of them); True where the backend reports no limit (CPU)."""
  weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.to_pure_dict(state)))
  for device in np.asarray(mesh.devices).flat:
    stats = device.memory_stats() if device.process_index == jax.process_index() else None
    if stats and "bytes_limit" in stats and stats["bytes_limit"] - stats.get("bytes_in_use", 0) < 2 * weights:
      return False
  return True


def _decode_steps(graphdef: nnx.GraphDef, mesh: Mesh, view: Mesh | None, rules: tuple, rows: int, slots: int,
                  pick: Pick | None = None):
  """Jitted ``(params, token [rows]) -> token [rows]``: ``TIMED_STEPS`` decode steps of the decoder
  ``graphdef`` from a cache of ``slots`` valid slots, each token picked with ``pick`` (None: greedy), its
  weights in ``view`` (None: as they sit), the tokens handed back in ``mesh``'s row layout as a sampler's
  are."""

  def steps(params, token):
    model = nnx.merge(graphdef, params)
    if view is not None:
      model, token = _in_view(model, view, rules), _constrain_rows(token, view, rules)
    cache = init_cache(model.cfg, rows, slots)
    cache = cache.replace(valid=jnp.ones_like(cache.valid), fresh=False, start=None)
    alive = jnp.ones((rows, 1), jnp.int32)

    def body(i, carry):
      token, cache = carry
      hidden, cache = model.trunk(token[:, None], alive, cache)
      logits = model.logits_from_hidden(hidden[:, 0])
      if pick is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache
      return pick(logits, jax.random.fold_in(jax.random.key(0), i))[0], cache

    token, _ = jax.lax.fori_loop(0, TIMED_STEPS, body, (token, cache))
    return DecodeLayout(mesh, rules, "tensor").back(view, token)

  return jax.jit(steps)


@dataclasses.dataclass(frozen=True)
class DecodeLayout:
  """How a sampler places a decoder while it decodes (``config.sharding.decode``): the training ``mesh``,
  its ``rules`` and the ``mode`` of ``decode_mesh``. ``place`` and ``back`` run inside jit."""

  mesh: Mesh
  rules: tuple
  mode: str = "auto"
  # Where "auto" keeps what it timed (``view_pays``): a run's ``decode_layout.json``; "" nowhere.
  record: str = ""

  def __post_init__(self):
    check_mode(self.mode)

  def view(self, model: nnx.Module, prompt_shape: tuple[int, int], new_tokens: int,
           pick: Pick | None = None) -> Mesh | None:
    """The decode view for ``model`` sampling ``new_tokens`` tokens with ``pick`` after prompts [B, P] (B
    global), or None. "auto" takes the view ``decode_mesh`` offers only where ``view_pays`` at the cache
    length a decode step reads on average (``decode_cache_lengths``: one length per phase, each phase an
    equal share of the steps)."""
    rows, prompt_len = prompt_shape
    step_flops = compute.forward_flops(model.cfg, rows / shd.data_parallel_size(self.mesh, self.rules), prompt_len)
    view = decode_mesh(self.mesh, self.rules, model.cfg, self.mode, step_flops)
    if view is None or self.mode != "auto":
      return view
    slots = round(np.mean(decode_cache_lengths(prompt_len, new_tokens)))
    return view if view_pays(model, self.mesh, view, self.rules, rows, slots, pick, self.record) else None

  def place(self, model: nnx.Module, *rows: jax.Array, new_tokens: int,
            pick: Pick | None = None) -> tuple[Mesh | None, nnx.Module, tuple[jax.Array, ...]]:
    """``rows``: the prompt [B, P] first, then other row arrays [B, ...]; ``new_tokens``: how many the sampler
    decodes, each picked with ``pick`` -> (the view, the decoder with its weights constrained to it, the row
    arrays split over the view's data axis where it divides them); the view None and everything as it was
    where there is none."""
    view = self.view(model, rows[0].shape, new_tokens, pick)
    if view is None:
      return None, model, rows
    return view, _in_view(model, view, self.rules), _constrain_rows(rows, view, self.rules)

  def back(self, view: Mesh | None, tree: Any) -> Any:
    """Sampled rows (a pytree of [B, ...] arrays) in the training mesh's batch layout.

    First pinned to the view's row layout, so the partitioner keeps the whole decode loop in the view
    instead of pulling the training layout's row split into it (which all-gathers the activations before
    every product)."""
    if view is None:
      return tree
    return _constrain_rows(_constrain_rows(tree, view, self.rules), self.mesh, self.rules)
