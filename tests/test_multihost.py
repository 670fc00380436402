"""Multi-process runs for real: several ``python -m rlhf_jax`` processes on this machine, joined by JAX's
coordinator on a free localhost port (``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``),
each with fake CPU devices, make one run on one global mesh (gloo collectives between them).

* 2 processes x 2 devices run pretrain, SFT, label, reward and PPO of the default task at tiny size on a
  2x1x2 (data x fsdp x tensor) mesh, so batch rows are split across processes and tensor shards within
  each. One process is killed during PPO: the other must exit non-zero within a bounded time with JAX's
  error naming the dead task, not hang. The same command again resumes (finished stages skipped, PPO from
  its last checkpoint) and finishes; its summary must equal the single-process run on the same global mesh
  (1 process x 4 devices) within float tolerance, only process 0 writes logs and metrics, and every
  process writes its own checkpoint shards.
* A worker started alone where the launcher expected more processes stops at once with a clear error.
* ``RLHF_JAX_MULTIHOST=full`` adds 4 processes x 1 device (tensor shards across processes too).
"""

import importlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from fake_devices import cpu_env
from rlhf_jax import distributed

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config.stages=tokenizer,pretrain,sft,label,reward,ppo",
        "--config.pretrain.steps=6", "--config.pretrain.batch_size=8", "--config.pretrain.log_every=3",
        "--config.pretrain.checkpoint_every=3",
        "--config.sft.steps=4", "--config.sft.batch_size=8", "--config.sft.log_every=2",
        "--config.label.num_prompts=23", "--config.label.k=2",
        "--config.reward.steps=4", "--config.reward.batch_size=4", "--config.reward.log_every=2",
        # 5 eval prompts and 5 normalisation samples: padded to 6 on 2-way data parallelism (process 1
        # holds one real and one padded row); PPO's 6 rollouts are split over the processes.
        "--config.reward.normalize_samples=5",
        "--config.evaluation.num_prompts=5", "--config.evaluation.lm_loss_batches=1",
        "--config.evaluation.batch_size=6",
        "--config.ppo.iterations=3", "--config.ppo.prompts_per_iteration=3", "--config.ppo.samples_per_prompt=2",
        "--config.ppo.minibatches=1", "--config.ppo.log_every=1", "--config.ppo.eval_every=0",
        "--config.ppo.checkpoint_every=1",
        # Gumbel-max: a token flips only at a near tie, not whenever float noise moves a CDF boundary.
        "--config.label.sampling.method=gumbel", "--config.ppo.sampling.method=gumbel",
        "--config.evaluation.sampling.method=gumbel",
        "--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.tensor=2"]
# Seconds without heartbeats after which JAX declares a process dead (the default, 60, is for real hosts).
HEARTBEAT_S = 10
# The survivors of a kill must be gone within this many seconds of it.
EXIT_WITHIN_S = HEARTBEAT_S + 50
# One process and several on the same global mesh differ only in the order of float reductions (gloo's
# all-reduce between processes): measured at most 6e-6.
TOL = 1e-4

full = pytest.mark.skipif(os.environ.get("RLHF_JAX_MULTIHOST") != "full",
                          reason="RLHF_JAX_MULTIHOST=full adds the 4-process run (about 4 minutes on 2 cores)")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def env(devices: int, **extra) -> dict:
  out = cpu_env(devices, RLHF_JAX_HEARTBEAT_TIMEOUT=HEARTBEAT_S, RLHF_JAX_SHUTDOWN_TIMEOUT=30,
                RLHF_JAX_INIT_TIMEOUT=120)
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", distributed.EXPECTED_ENV):
    out.pop(name, None)
  out.update({k: str(v) for k, v in extra.items()})
  return out


def command(workdir, *extra: str) -> list[str]:
  return [sys.executable, "-m", "rlhf_jax", f"--config={ROOT}/configs/quickstart.py", f"--workdir={workdir}", *TINY,
          *extra]


def start(workdir, processes: int, devices: int, tag: str, flags: bool = False):
  """``processes`` processes of one run, each with ``devices`` fake devices -> [(process, its log)]. They
  find each other through the JAX_* variables, or with ``flags`` through --coordinator, --num_processes
  and --process_id. Runs in one workdir share a compilation cache (a resumed run reuses what the killed one
  compiled)."""
  port = free_port()
  cache = dict(JAX_COMPILATION_CACHE_DIR=f"{workdir}.jax_cache", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0)
  procs = []
  for i in range(processes):
    log = pathlib.Path(f"{workdir}.{tag}.p{i}.log")
    launch = dict(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=processes, JAX_PROCESS_ID=i)
    extra = [f"--coordinator=localhost:{port}", f"--num_processes={processes}", f"--process_id={i}"]
    with open(log, "w") as f:
      procs.append((subprocess.Popen(command(workdir, *(extra if flags else [])), cwd=ROOT, stdout=f,
                                     stderr=subprocess.STDOUT,
                                     env=env(devices, **cache, **({} if flags else launch))), log))
  return procs


def finish(procs, timeout: float = 900) -> None:
  deadline = time.monotonic() + timeout
  try:
    for proc, log in procs:
      rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
      assert rc == 0, f"{log}: exit {rc}\n{log.read_text()[-4000:]}"
  finally:
    for proc, _ in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()


def summary(workdir) -> dict:
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


def compared(entry: dict) -> dict:
  """Summary values that do not depend on how many processes ran (timings and the mesh entry left out)."""
  return {f"{stage}/{k}": v for stage, values in entry.items() if stage != "mesh"
          for k, v in values.items() if not k.startswith("time/")}


def assert_matches(got: dict, ref: dict) -> float:
  got, ref = compared(got), compared(ref)
  assert set(got) == set(ref)
  worst = max(abs(got[k] - ref[k]) for k in ref)
  assert worst <= TOL, {k: (got[k], ref[k]) for k in ref if abs(got[k] - ref[k]) > TOL}
  return worst


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """The single-process run on the same global mesh (1 process x 4 devices)."""
  workdir = tmp_path_factory.mktemp("multihost") / "one"
  proc = subprocess.run(command(workdir), cwd=ROOT, capture_output=True, text=True, timeout=900, env=env(4))
  assert proc.returncode == 0, proc.stderr[-4000:]
  return summary(workdir)


def test_two_processes_survive_a_kill_resume_and_match_one(one_process, tmp_path):
  workdir = tmp_path / "two"
  procs = start(workdir, 2, 2, "killed")
  # Wait until PPO has checkpointed its first iteration, then kill process 1 in the middle of PPO.
  marker = workdir / "ppo" / "checkpoints" / "1"
  deadline = time.monotonic() + 900
  while not marker.is_dir():
    dead = [(p.returncode, log) for p, log in procs if p.poll() is not None]
    assert not dead, f"a process exited before the kill: {dead}\n{dead[0][1].read_text()[-4000:]}"
    assert time.monotonic() < deadline, "PPO never checkpointed"
    time.sleep(0.2)
  (victim, _), (survivor, survivor_log) = procs[1], procs[0]
  victim.send_signal(signal.SIGKILL)
  killed_at = time.monotonic()
  try:
    rc = survivor.wait(timeout=EXIT_WITHIN_S + 60)
  finally:
    for proc, _ in procs:
      if proc.poll() is None:
        proc.kill()
      proc.wait()
  waited = time.monotonic() - killed_at
  text = survivor_log.read_text()
  assert rc != 0 and waited < EXIT_WITHIN_S, (rc, waited, text[-3000:])
  # Ours (a collective lost its peer) or JAX's (the coordination service saw the task stop).
  assert "another process of this 2-process run stopped" in text or "another task died" in text, text[-3000:]
  print(f"survivor exited {rc} {waited:.1f}s after the kill")

  # The same run again (joined by the command-line flags this time): finished stages are skipped, PPO
  # resumes from its checkpoint.
  procs = start(workdir, 2, 2, "resumed", flags=True)
  finish(procs)
  out0, out1 = (log.read_text() for _, log in procs)
  for stage in ("tokenizer", "pretrain", "sft", "label", "reward"):
    assert f"[rlhf-jax] {stage}: already finished, skipped" in out0
  assert "[rlhf-jax]" not in out1 and "ppo " not in out1  # logs and progress from process 0 only
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  ppo_steps = [r["step"] for r in rows if r["stage"] == "ppo" and "train/policy_loss" in r]
  assert ppo_steps == [1, 2, 3]  # each iteration logged once: lines after the checkpoint were replayed
  pretrain_steps = [r["step"] for r in rows if r["stage"] == "pretrain" and "train/loss" in r]
  assert pretrain_steps == [3, 6]
  # Every process wrote its own shards of the multi-process checkpoints.
  shards = sorted(p.name for p in (workdir / "ppo" / "checkpoints" / "3" / "state").glob("ocdbt.process_*"))
  assert shards == ["ocdbt.process_0", "ocdbt.process_1"]

  got = summary(workdir)
  assert got["mesh"]["mesh/data_parallel"] == 2 and got["label"]["label/comparisons"] == 23
  worst = assert_matches(got, one_process)
  print(f"2 processes x 2 devices (killed, resumed) vs 1 x 4: largest difference {worst:.3g}")


@full
def test_four_processes_match_one(one_process, tmp_path):
  workdir = tmp_path / "four"
  finish(start(workdir, 4, 1, "run"))
  worst = assert_matches(summary(workdir), one_process)
  print(f"4 processes x 1 device vs 1 x 4: largest difference {worst:.3g}")


def test_processes_take_one_decode_layout(tmp_path):
  """``sharding.decode: auto`` times the layouts in every process; all take process 0's answer, so they
  compile the same sampler (tests/view_pays_multihost_check.py fakes clocks that disagree)."""
  port = free_port()
  procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "view_pays_multihost_check.py")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(2, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=2,
                                    JAX_PROCESS_ID=i)) for i in range(2)]
  outs = []
  try:
    for proc in procs:
      stdout, stderr = proc.communicate(timeout=300)
      assert proc.returncode == 0, stderr[-4000:]
      outs.append(json.loads(stdout.strip().splitlines()[-1]))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  assert [o["own_answer_would_be"] for o in outs] == [False, True]
  assert [o["answers"] for o in outs] == [[False], [False]]
  assert outs[0]["tokens"] == outs[1]["tokens"] and len(outs[0]["tokens"]) == 8


def test_a_worker_started_alone_stops_with_a_clear_error(tmp_path):
  # The launcher expected 4 processes; this one has no cluster to find the others in: exit 2, one line, no run.
  proc = subprocess.run(command(tmp_path / "alone"), cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=env(1, **{distributed.EXPECTED_ENV: 4}))
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "rlhf-jax: error: could not join the multi-process run" in proc.stderr, proc.stderr[-3000:]
  assert "JAX_COORDINATOR_ADDRESS" in proc.stderr
  assert not (tmp_path / "alone" / "metrics.jsonl").exists()


# --- detection (no processes started) -----------------------------------------------------------------


def test_detect_reads_the_jax_variables():
  launch = distributed.detect(environ={"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
                                       "JAX_PROCESS_ID": "3"})
  assert launch == distributed.Launch("environment", "10.0.0.1:1234", 4, 3)
  assert distributed.detect(environ={}) is None
  assert distributed.detect(environ={"JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}) is None


def test_detect_clusters_and_flags():
  assert distributed.detect(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}).source == "slurm"
  assert distributed.detect(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
  assert distributed.detect(environ={"OMPI_COMM_WORLD_SIZE": "2"}).source == "openmpi"
  assert distributed.detect(environ={distributed.EXPECTED_ENV: "4"}) == distributed.Launch(distributed.EXPECTED_ENV)
  assert distributed.detect(enabled=True, environ={}).source == "config.distributed"


def test_detect_refuses_half_set_variables():
  with pytest.raises(distributed.DistributedError, match="JAX_PROCESS_ID"):
    distributed.detect(environ={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
  with pytest.raises(distributed.DistributedError, match="not in"):
    distributed.detect(environ={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})
  with pytest.raises(distributed.DistributedError, match="not an integer"):
    distributed.detect(environ={"JAX_NUM_PROCESSES": "two"})


def test_timeouts_default_and_override():
  assert distributed.timeouts({}) == {"heartbeat_timeout_seconds": 60, "shutdown_timeout_seconds": 120,
                                      "initialization_timeout": 300}
  assert distributed.timeouts({"RLHF_JAX_HEARTBEAT_TIMEOUT": "5"})["heartbeat_timeout_seconds"] == 5


def test_host_count_check(monkeypatch):
  distributed.check_process_count({})  # nothing expected
  distributed.check_process_count({distributed.EXPECTED_ENV: "1"})
  with pytest.raises(distributed.DistributedError, match="expected 4 processes .* JAX sees 1"):
    distributed.check_process_count({distributed.EXPECTED_ENV: "4"})


# --- gs:// paths (an in-memory filesystem stands in for Cloud Storage) --------------------------------


@pytest.fixture
def fake_gcs(monkeypatch):
  """gs:// paths served by fsspec's in-memory filesystem (etils.epath reaches gs:// through fsspec)."""
  from fsspec.implementations.memory import MemoryFileSystem

  class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store, pseudo_dirs = {}, [""]  # its own store, not the shared memory:// one

    def __init__(self, *args, finalize_on_close=None, **kwargs):
      super().__init__(*args, **kwargs)

  registry = importlib.import_module("fsspec.registry")._registry
  for name in ("gs", "gcs"):  # undone after the test
    monkeypatch.setitem(registry, name, FakeGCS)
  FakeGCS.store.clear()
  FakeGCS.clear_instance_cache()
  yield FakeGCS
  FakeGCS.store.clear()


def test_metrics_summary_and_markers_on_gs(fake_gcs, monkeypatch):
  from etils import epath

  from rlhf_jax import metrics as metrics_lib
  from rlhf_jax.atomic_file import write_atomic
  from rlhf_jax.stages import graph

  class NoTensorBoard:  # tensorboardX writes gs:// through google-cloud-storage, not installed here
    def __init__(self, **_):
      pass
    add_scalar = flush = close = lambda self, *a, **k: None

  monkeypatch.setattr(metrics_lib, "summary_writer_class", lambda: NoTensorBoard)
  workdir = "gs://bucket/run"
  with metrics_lib.MetricsWriter(workdir) as writer:
    for step in (1, 2, 3):
      writer.write("sft", step, {"train/loss": 1.0 / step})
    writer.flush()
    assert [r["step"] for r in metrics_lib.read_metrics(workdir)] == [1, 2, 3]
    writer.truncate_after("sft", 2)
    writer.write("sft", 3, {"train/loss": 0.25})
    writer.write_summary("sft", {"eval/gold_reward": 0.5})
  rows = metrics_lib.read_metrics(workdir)
  assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.25)]
  assert json.loads(epath.Path(workdir, "summary.json").read_text()) == {"sft": {"eval/gold_reward": 0.5}}
  # A reopened writer continues the file.
  with metrics_lib.MetricsWriter(workdir) as writer:
    writer.write("ppo", 1, {"train/loss": 2.0})
  assert len(metrics_lib.read_metrics(workdir)) == 4
  assert not graph.finished(workdir, "sft")
  write_atomic(f"{workdir}/sft/DONE.json", "{}")
  assert graph.finished(workdir, "sft")


def test_data_tokenizer_and_checkpoint_paths_on_gs(fake_gcs, tmp_path):
  from etils import epath

  from rlhf_jax.checkpoint import Checkpointer
  from rlhf_jax.data import formats
  from rlhf_jax.data.tokenizer import Tokenizer, train_tokenizer

  texts = [f"the cat {i} sat on the mat {i * 7}" for i in range(200)]
  local = train_tokenizer(texts, tmp_path / "spm.model", vocab_size=300, hard_vocab_limit=False)
  epath.Path("gs://bucket/tok/spm.model").write_bytes((tmp_path / "spm.model").read_bytes())
  remote = Tokenizer.load("gs://bucket/tok/spm.model")
  assert remote.encode("the cat 3") == local.encode("the cat 3")
  formats.write_records("gs://bucket/data/demos.jsonl", "demonstrations",
                        [{"prompt": "p", "response": "r"}] * 3)
  assert len(formats.read_records("gs://bucket/data/demos.jsonl", "demonstrations")) == 3
  # Orbax writes gs:// itself (tensorstore); the path reaches it unchanged (not made absolute).
  ckpt = Checkpointer("gs://bucket/run/sft/checkpoints", read_only=True)
  assert str(ckpt.directory) == "gs://bucket/run/sft/checkpoints" and ckpt.all_steps() == []


def test_a_lost_peer_is_explained(monkeypatch):
  import jax

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(distributed.DistributedError, match="another process of this 2-process run stopped .* resumes"):
    with distributed.peer_loss_explained():
      raise jax.errors.JaxRuntimeError("UNKNOWN: Gloo AllGather failed: Connection closed by peer [127.0.0.1]:1")
  with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):  # other errors pass through
    with distributed.peer_loss_explained():
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory")
