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
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rlhf_jax import compute, data_parallel, sharding as shd

MODES = ("auto", "tensor", "as_trained")
# "auto" re-views only when a decode step does at least this many FLOPs per device (``compute.forward_flops``
# of its rows per device). Below it the view's per-layer all-reduces cost more than its larger products save. On 2 CPU
# devices sampling 32 rows, new tokens/s of the view against the data-parallel layout, 4 layers (README,
# Performance): on an Intel Xeon 0.45-0.50x for the tiny preset (~5 MFLOP), 0.97-0.99x at d_model 128 (42 MFLOP),
# 1.02x at 192 (82), 1.09x at 256 (139), 1.02-1.07x at 384 (277) and 1.11-1.14x at 512 (470); on an AMD EPYC
# 0.38x at 128, 0.73-0.79x at 256, 0.82x at 384 and 1.01-1.05x at 512. The threshold takes the view only where
# it paid on both.
AUTO_MIN_STEP_FLOPS = 400e6


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

  ``mode``: "tensor" re-views whenever t > 1 changes the layout; "as_trained" never; "auto" re-views a
  purely data-parallel mesh (``data_parallel.applies``) on the CPU backend when a decode step does
  ``step_flops`` >= ``AUTO_MIN_STEP_FLOPS`` per device and t divides the vocabulary, where it was measured
  to pay. Otherwise "auto" keeps the layout: on accelerators a small model's per-layer all-reduces can cost
  more than the weight reads they save (not yet measured), and a mesh already split over fsdp or tensor
  keeps the layout it was given. None: decode as the weights sit.
  """
  if check_mode(mode) == "as_trained":
    return None
  if mode == "auto" and (jax.default_backend() != "cpu" or not data_parallel.applies(mesh, rules)
                         or step_flops < AUTO_MIN_STEP_FLOPS):
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


@dataclasses.dataclass(frozen=True)
class DecodeLayout:
  """How a sampler places a decoder while it decodes (``config.sharding.decode``): the training ``mesh``,
  its ``rules`` and the ``mode`` of ``decode_mesh``. ``place`` and ``back`` run inside jit."""

  mesh: Mesh
  rules: tuple
  mode: str = "auto"

  def __post_init__(self):
    check_mode(self.mode)

  def view(self, model: nnx.Module, prompt_shape: tuple[int, int]) -> Mesh | None:
    """The decode view for ``model`` sampling after prompts [B, P] (B global), or None."""
    rows, prompt_len = prompt_shape
    step_flops = compute.forward_flops(model.cfg, rows / shd.data_parallel_size(self.mesh, self.rules), prompt_len)
    return decode_mesh(self.mesh, self.rules, model.cfg, self.mode, step_flops)

  def place(self, model: nnx.Module, *rows: jax.Array) -> tuple[Mesh | None, nnx.Module, tuple[jax.Array, ...]]:
    """``rows``: the prompt [B, P] first, then other row arrays [B, ...] -> (the view, the decoder with its
    weights constrained to it, the row arrays split over the view's data axis where it divides them); the
    view None and everything as it was where there is none."""
    view = self.view(model, rows[0].shape)
    if view is None:
      return None, model, rows
    state = nnx.state(model)
    nnx.update(model, jax.lax.with_sharding_constraint(state, shd.state_shardings(state, view, self.rules)))
    return view, model, _constrain_rows(rows, view, self.rules)

  def back(self, view: Mesh | None, tree: Any) -> Any:
    """Sampled rows (a pytree of [B, ...] arrays) in the training mesh's batch layout.

    First pinned to the view's row layout, so the partitioner keeps the whole decode loop in the view
    instead of pulling the training layout's row split into it (which all-gathers the activations before
    every product)."""
    if view is None:
      return tree
    return _constrain_rows(_constrain_rows(tree, view, self.rules), self.mesh, self.rules)
