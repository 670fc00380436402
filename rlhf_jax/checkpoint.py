"""Orbax checkpoints for one stage: `WORKDIR/STAGE/checkpoints/<step>/`.

Each step directory holds two items: `state` (any pytree of arrays, saved with
Orbax's standard tensorstore format, restorable onto any mesh) and `extra`
(a small JSON dict: data position, Python-side scalars, config fingerprint).

Completeness: Orbax writes a step into `<step>.orbax-checkpoint-tmp*/` and
renames it to `<step>/` only after every array and the metadata are on disk
(on object stores without atomic rename, e.g. GCS, it instead writes
`commit_success.txt` last and treats directories lacking it as temporary).
`latest_step`/`all_steps` list only finalised step directories (Orbax's own
step-name parser), so a run killed mid-save resumes from the previous step;
stale temporary directories are deleted when a writable `Checkpointer` opens.

Multi-host: every process must call `save`/`restore`/`close`; each writes
the shards of the arrays its devices hold, and Orbax elects the primary
process for the shared writes (metadata, finalising) itself. The directory
may be local (shared by all hosts) or on an object store (`gs://...`, any
path `etils.epath` opens), which every host must reach.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from rlhf_jax.atomic_file import is_remote

PyTree = Any

_STATE = "state"
_EXTRA = "extra"


def _jsonable(tree: Any) -> Any:
  """Turns numpy/jax scalars in a JSON-ish tree into Python numbers."""

  def leaf(x: Any) -> Any:
    if isinstance(x, (np.ndarray, np.generic, jax.Array)) and np.ndim(x) == 0:
      return np.asarray(x).item()
    if isinstance(x, (np.ndarray, jax.Array)):
      return np.asarray(x).tolist()
    return x

  return jax.tree.map(leaf, tree)


def _default_sharding() -> jax.sharding.Sharding:
  if jax.process_count() > 1:
    raise ValueError(
        "restore() needs an explicit sharding on every abstract leaf when "
        "running on more than one process."
    )
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _abstract(tree: PyTree) -> PyTree:
  """Concrete arrays -> ShapeDtypeStruct with their sharding; fills gaps."""

  def leaf(x: Any) -> Any:
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_default_sharding())
    return x

  return jax.tree.map(leaf, tree)


class Checkpointer:
  """Saves and restores one stage's state pytree plus a JSON `extra` dict.

  Args:
    directory: the stage's checkpoint directory (created unless `read_only`).
    save_every: `save(step)` writes only when `step % save_every == 0`
      (or `force=True`).
    keep: number of most recent checkpoints kept on disk.
    async_save: write in a background thread. `save` returns once arrays are
      copied to host memory, so the caller may donate/overwrite the state.
    read_only: open an existing directory for restoring only (no writes, no
      directory creation, no cleanup); e.g. loading the SFT policy in PPO.
  """

  def __init__(
      self,
      directory: str | os.PathLike[str],
      save_every: int = 1,
      keep: int = 1,
      async_save: bool = True,
      read_only: bool = False,
  ):
    if save_every < 1 or keep < 1:
      raise ValueError(f"save_every and keep must be >= 1, got {save_every}, {keep}")
    directory = os.fspath(directory)
    self.directory = epath.Path(directory if is_remote(directory) else os.path.abspath(directory))
    self.save_every = save_every
    self.read_only = read_only
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=async_save,
    )
    self._manager: ocp.CheckpointManager | None = None
    self._closed = False
    if not read_only:
      self._open_manager()

  def _open_manager(self) -> ocp.CheckpointManager:
    # Read-only managers open lazily so a missing directory is reported by
    # restore() as FileNotFoundError instead of at construction.
    if self._closed:
      raise RuntimeError(f"Checkpointer for {self.directory} is closed.")
    if self._manager is None:
      self._manager = ocp.CheckpointManager(
          self.directory, options=self._options, item_names=(_STATE, _EXTRA)
      )
    return self._manager

  def save(
      self,
      step: int,
      state: PyTree,
      extra: Mapping[str, Any] | None = None,
      force: bool = False,
  ) -> bool:
    """Saves `state` and `extra` at `step` if due (or `force`); returns whether it did.

    A step that already has a checkpoint is skipped (returns False), so a
    final forced save that coincides with a periodic one is harmless.
    """
    if self.read_only:
      raise RuntimeError(f"Checkpointer for {self.directory} is read-only.")
    manager = self._open_manager()
    if not force and step % self.save_every:
      return False
    if step in manager.all_steps():
      return False
    args = ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state),
        _EXTRA: ocp.args.JsonSave(_jsonable(dict(extra or {}))),
    })
    # The interval decision is ours; force bypasses Orbax's own policy.
    return manager.save(step, args=args, force=True)

  def all_steps(self) -> list[int]:
    """Sorted steps of the complete (finalised) checkpoints on disk."""
    if not self.directory.is_dir():
      return []
    name_format = ocp.path.step.standard_name_format()
    return sorted(m.step for m in name_format.find_all(self.directory))

  def latest_step(self) -> int | None:
    """Latest complete checkpoint step on disk, or None.

    Reads the directory rather than Orbax's in-memory list, so an
    asynchronous save still in flight is not reported until it is finalised.
    """
    steps = self.all_steps()
    return steps[-1] if steps else None

  def restore(
      self, abstract_state: PyTree, step: int | None = None
  ) -> tuple[PyTree, dict[str, Any]]:
    """Restores `(state, extra)` from `step` (default: latest complete one).

    `abstract_state` gives the structure, dtypes and placement: leaves are
    `jax.ShapeDtypeStruct`s with `sharding` set, or concrete arrays whose
    sharding is used. Arrays are read straight into those shardings, so a
    checkpoint saved on one mesh restores onto any other. A
    `ShapeDtypeStruct` without sharding goes to the first device
    (single-process only).
    """
    if self._closed:
      raise RuntimeError(f"Checkpointer for {self.directory} is closed.")
    if self._manager is not None:
      self._manager.wait_until_finished()
    if not self.directory.is_dir():
      raise FileNotFoundError(f"Checkpoint directory does not exist: {self.directory}")
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"No complete checkpoint in {self.directory}")
    elif step not in self.all_steps():
      raise FileNotFoundError(
          f"No complete checkpoint for step {step} in {self.directory} "
          f"(available: {self.all_steps()})"
      )
    manager = self._open_manager()
    manager.reload()
    restored = manager.restore(
        step,
        args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(_abstract(abstract_state)),
            _EXTRA: ocp.args.JsonRestore(),
        }),
    )
    return restored[_STATE], dict(restored[_EXTRA] or {})

  def wait(self) -> None:
    """Blocks until any asynchronous save is finalised on disk."""
    if self._manager is not None:
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax resources."""
    if self._manager is not None:
      self._manager.close()
      self._manager = None
    self._closed = True

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()
