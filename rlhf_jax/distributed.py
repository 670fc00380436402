"""One run over many processes (hosts): joining, the host-count check, who writes, host copies of arrays.

JAX runs on several hosts as one process per host (multi-controller): every process runs the same
program on the same global arrays and holds the shards of its own devices. A process joins a run
through ``jax.distributed.initialize`` when

* ``JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i`` are set (N > 1), or the
  command line's ``--coordinator``, ``--num_processes``, ``--process_id``: any machines, e.g. GPU nodes,
  or several processes on one machine as the tests start them;
* SLURM (``srun``, more than one task) or Open MPI (``mpirun``, more than one rank) started it: JAX
  reads the coordinator, count and index from their environment;
* ``RLHF_JAX_EXPECTED_PROCESSES=N`` (N > 1; the TPU launcher sets it) or ``--config.distributed=True``
  is given: JAX finds everything itself (Cloud TPU VMs, SLURM, Open MPI).

On CPU the collectives between processes go through gloo. A process that dies is noticed by the others
within ``RLHF_JAX_HEARTBEAT_TIMEOUT`` seconds (default 60; JAX's coordination service stops them with
"Terminating process because the JAX distributed service detected fatal errors"), or at once when they
were exchanging data with it; re-running the same command resumes from the last checkpoint.

Every process builds the same host-side values (batches are functions of seed and step), so anything a
process computes on the host from a global array must see the whole array: ``to_host``. Only process 0
writes the workdir's logs, metrics, summaries and markers (``is_primary``); every process writes its own
checkpoint shards (Orbax).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from rlhf_jax.config_io import ConfigError

# Read by JAX itself (jax.distributed.initialize) when set; the other two are ours.
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
# How many processes the launcher started; the run stops before its first step if JAX sees another count.
EXPECTED_ENV = "RLHF_JAX_EXPECTED_PROCESSES"
# Seconds (integers): a process silent this long is dead; a finished process waits this long for the others;
# a process waits this long for all to join.
TIMEOUT_ENVS = {"heartbeat_timeout_seconds": ("RLHF_JAX_HEARTBEAT_TIMEOUT", 60),
                "shutdown_timeout_seconds": ("RLHF_JAX_SHUTDOWN_TIMEOUT", 120),
                "initialization_timeout": ("RLHF_JAX_INIT_TIMEOUT", 300)}


class DistributedError(ConfigError):
  """The processes of a run do not make up the run they were launched as."""


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process joins a multi-process run: ``source`` says what asked for it; None fields are left
  to JAX's own detection (Cloud TPU metadata, SLURM, Open MPI)."""

  source: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None


def _int_env(environ: Mapping[str, str], name: str) -> int | None:
  value = environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise DistributedError(f"{name}={value!r} is not an integer") from None


def detect(enabled: bool = False, environ: Mapping[str, str] | None = None) -> Launch | None:
  """The multi-process launch this process is part of, or None for a single-process run.

  ``enabled`` is ``config.distributed``. Explicit ``JAX_*`` variables come first; a set of them that
  is incomplete, or names one process, is an error rather than a silent single-process run.
  """
  environ = os.environ if environ is None else environ
  address = environ.get(COORDINATOR_ENV) or None
  count, index = _int_env(environ, NUM_PROCESSES_ENV), _int_env(environ, PROCESS_ID_ENV)
  expected = _int_env(environ, EXPECTED_ENV)
  explicit = {COORDINATOR_ENV: address, NUM_PROCESSES_ENV: count, PROCESS_ID_ENV: index}
  if any(v is not None for v in explicit.values()):
    if count == 1 and index in (None, 0):
      return None
    missing = [k for k, v in explicit.items() if v is None]
    if missing and not (enabled or (expected or 0) > 1):
      raise DistributedError(f"{', '.join(k for k, v in explicit.items() if v is not None)} set but not "
                             f"{', '.join(missing)}: set all three to join a multi-process run")
    if count is not None and index is not None and not 0 <= index < count:
      raise DistributedError(f"{PROCESS_ID_ENV}={index} is not in [0, {NUM_PROCESSES_ENV}={count})")
    return Launch("environment", address, count, index)
  if (_int_env(environ, "SLURM_STEP_NUM_TASKS") or _int_env(environ, "SLURM_NTASKS") or 1) > 1 \
      and "SLURM_JOB_ID" in environ:
    return Launch("slurm")
  if (_int_env(environ, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
    return Launch("openmpi")
  if (expected or 1) > 1:
    return Launch(EXPECTED_ENV)
  if enabled:
    return Launch("config.distributed")
  return None


def set_launch_env(coordinator: str | None, num_processes: int | None, process_id: int | None,
                   environ: dict | None = None) -> None:
  """The command line's ``--coordinator``/``--num_processes``/``--process_id``, as the ``JAX_*`` variables
  they stand for (a flag wins over the variable)."""
  environ = os.environ if environ is None else environ
  for name, value in ((COORDINATOR_ENV, coordinator), (NUM_PROCESSES_ENV, num_processes),
                      (PROCESS_ID_ENV, process_id)):
    if value is not None:
      environ[name] = str(value)


def timeouts(environ: Mapping[str, str] | None = None) -> dict[str, int]:
  """``jax.distributed.initialize`` timeout arguments from ``RLHF_JAX_*_TIMEOUT`` (or our defaults)."""
  environ = os.environ if environ is None else environ
  out = {}
  for arg, (name, default) in TIMEOUT_ENVS.items():
    value = _int_env(environ, name)
    out[arg] = default if value is None else value
  return out


def initialize(enabled: bool = False, environ: Mapping[str, str] | None = None) -> Launch | None:
  """Joins the multi-process run this process was started in (see the module docstring), then checks
  the process count. Call before anything touches a device; a second call does nothing."""
  environ = os.environ if environ is None else environ
  launch = detect(enabled, environ)
  if launch is not None and not jax.distributed.is_initialized():
    # CPU collectives between processes (gloo is JAX's default where it has one; older JAX has none).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
      jax.distributed.initialize(coordinator_address=launch.coordinator_address,
                                 num_processes=launch.num_processes, process_id=launch.process_id,
                                 **timeouts(environ))
    except (RuntimeError, ValueError) as e:
      hint = "" if launch.coordinator_address else (
          f"; where JAX finds no cluster (Cloud TPU VM, SLURM, Open MPI) set {COORDINATOR_ENV}, "
          f"{NUM_PROCESSES_ENV} and {PROCESS_ID_ENV}")
      raise DistributedError(f"could not join the multi-process run (asked for by {launch.source}): "
                             f"{' '.join(str(e).split()).rstrip('.')}{hint}") from e
    logging.info("process %d of %d joined (%s): %d of %d devices here", jax.process_index(), jax.process_count(),
                 launch.source, jax.local_device_count(), jax.device_count())
  check_process_count(environ)
  return launch


def check_process_count(environ: Mapping[str, str] | None = None) -> None:
  """Raises ``DistributedError`` if ``RLHF_JAX_EXPECTED_PROCESSES`` (or ``JAX_NUM_PROCESSES``) is set and
  JAX sees another number of processes: e.g. a worker started on its own, which would otherwise train
  alone as process 0 of 1 and write over the others' workdir."""
  environ = os.environ if environ is None else environ
  expected = _int_env(environ, EXPECTED_ENV) or _int_env(environ, NUM_PROCESSES_ENV)
  if expected is not None and expected != jax.process_count():
    raise DistributedError(
        f"this run expected {expected} processes (one per host) but JAX sees {jax.process_count()} (this is "
        f"process {jax.process_index()}): start the same command on every host at once (gcloud ... ssh "
        "--worker=all), with JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID where JAX cannot "
        "detect them")


# What a collective or barrier says when a process of the run is gone (gloo on CPU; the coordination service).
_PEER_LOST = ("Gloo", "Connection closed", "connection reset", "coordination service", "UNAVAILABLE",
              "DEADLINE_EXCEEDED")


@contextlib.contextmanager
def peer_loss_explained() -> Iterator[None]:
  """Turns the runtime error a process gets when another process of the run died (a collective that lost
  its peer) into a ``DistributedError`` that says so and how to resume. (If JAX's coordination service
  notices first, it ends the process itself, with "another task died" in its message.)"""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    text = " ".join(str(e).split())
    if jax.process_count() > 1 and any(p in text for p in _PEER_LOST):
      raise DistributedError(
          f"process {jax.process_index()}: another process of this {jax.process_count()}-process run stopped "
          f"({text[:300]}); start the same command on every host again: finished stages are skipped and the "
          "interrupted one resumes from its last checkpoint") from e
    raise


def is_primary() -> bool:
  """Process 0: the one that writes logs, metrics, summaries and markers."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Barrier across processes (no-op with one): e.g. after process 0 wrote a file the others read."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def process_sum(value: Any) -> np.ndarray:
  """The sum over processes of a small array (the same shape and dtype on every process), on every process.

  A collective (every process calls it at the same point), as ``jax.experimental.multihost_utils``'s, but with
  its shardings explicit instead of through ``jax.set_mesh``, so it may run while a function is being traced:
  for a decision made at trace time that every process must make alike."""
  value = np.asarray(value)
  if jax.process_count() == 1:
    return value
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  mesh = Mesh(np.array(jax.devices()).reshape(jax.process_count(), jax.local_device_count()), ("processes", "local"))
  rows = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("processes")), value[None])
  total = jax.jit(lambda x: x.sum(axis=0, dtype=x.dtype), out_shardings=NamedSharding(mesh, PartitionSpec()))(rows)
  return np.asarray(total.addressable_data(0))


def from_primary(value: Any) -> np.ndarray:
  """Process 0's value of a small array, on every process (a collective, as ``process_sum``)."""
  value = np.asarray(value)
  return process_sum(value if is_primary() else np.zeros_like(value))


def all_processes(flag: bool) -> bool:
  """Whether ``flag`` is true on every process (a collective, as ``process_sum``)."""
  return int(process_sum(np.int32(bool(flag)))) == jax.process_count()


def to_host(tree: Any) -> Any:
  """The whole value of every array of a pytree as numpy, on every process.

  An array split over several processes' devices is gathered (a collective: every process must call
  this at the same point); arrays held whole here (one process, replicated, numpy) are just read.
  """

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(one, tree)
