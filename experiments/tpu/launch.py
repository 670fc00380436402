"""Cloud TPU pod slices: create one, install the project on every host, run one rlhf-jax command on all
hosts, copy the results, delete it.

  python experiments/tpu/launch.py create --name=NAME --zone=ZONE --accelerator=v5p-32 [--spot|--reserved]
  python experiments/tpu/launch.py run    --name=NAME --zone=ZONE --accelerator=v5p-32 --workdir=gs://BUCKET/DIR \
      -- rlhf-jax --config=configs/quickstart.py [--config.a.b=value ...]
  python experiments/tpu/launch.py copy   --name=NAME --zone=ZONE --workdir=gs://BUCKET/DIR [--results=DIR]
  python experiments/tpu/launch.py delete --name=NAME --zone=ZONE

``--dry-run`` prints every command instead of running it. ``create`` asks for a queued resource (spot,
reserved or on-demand), waits until it is ACTIVE and installs the project (this checkout's tracked files) in
a Python 3.11 virtual environment on every host. ``run`` starts the same command on all hosts at once
(``--worker=all``): one process per host joins the others through ``jax.distributed.initialize`` (JAX reads
the slice from the TPU metadata) and stops before its first step unless it sees all
``RLHF_JAX_EXPECTED_PROCESSES`` hosts (a host started on its own would otherwise train alone). Before starting,
each host clears a stale TPU lock (``/tmp/libtpu_lockfile``) and kills stale processes still holding the
TPU devices. Process 0's log is streamed here; the exit codes of all hosts are collected. The workdir is on
Cloud Storage, so checkpoints survive the slice: with ``--max_restarts=N``, a run whose slice was preempted
(the queued resource is no longer ACTIVE) re-creates it, reinstalls, and re-runs the same command, which
resumes from the last checkpoint. ``copy`` fetches the results (metrics, summaries, samples; checkpoints
with ``--with_checkpoints``).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[2]
ACTIONS = ("create", "run", "copy", "delete")
# Where things live on each host.
REMOTE_DIR = "~/rlhf_jax"
RUN_LOG = "~/rlhf_jax_run.log"
RUN_RC = "~/rlhf_jax_run.rc"
EXPECTED_ENV = "RLHF_JAX_EXPECTED_PROCESSES"  # rlhf_jax.distributed.EXPECTED_ENV (not imported: no JAX needed here)
# TPU software per generation (gcloud --version / runtime-version), unless --runtime_version says otherwise.
RUNTIMES = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
            "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}
# Queued-resource states after which the slice is gone (preempted, or never came up).
GONE_STATES = ("SUSPENDING", "SUSPENDED", "FAILED", "DELETING", "NOT_FOUND")

FLAGS = flags.FLAGS
flags.DEFINE_string("name", None, "Name of the queued resource and its TPU VM.")
flags.DEFINE_string("zone", None, "Zone, e.g. us-east5-a.")
flags.DEFINE_string("project", None, "Cloud project (default: gcloud's).")
flags.DEFINE_string("accelerator", "v5p-32", "Accelerator type, e.g. v5p-32 (4 hosts), v4-16, v5litepod-16, v6e-16.")
flags.DEFINE_string("runtime_version", None, "TPU software version (default: by generation, see RUNTIMES).")
flags.DEFINE_bool("spot", False, "Spot capacity (preemptible; pair with run --max_restarts).")
flags.DEFINE_bool("reserved", False, "Capacity from the project's reservation.")
flags.DEFINE_bool("dry_run", False, "Print every command instead of running it (also --dry-run).")
flags.DEFINE_string("workdir", None, "Run directory on Cloud Storage (gs://BUCKET/DIR), shared by every host; "
                    "passed to the command as --workdir.")
flags.DEFINE_string("results", None, "copy: local directory (default: ./results/NAME).")
flags.DEFINE_bool("with_checkpoints", False, "copy: include checkpoints and params (large).")
flags.DEFINE_integer("max_restarts", 0, "run: re-create a preempted slice and re-run (resuming) up to N times.")
flags.DEFINE_string("python", "3.11", "Python version of the hosts' virtual environment (installed by uv).")
flags.DEFINE_string("jax_extra", "tpu", "pip extra of jax to install on the hosts (jax[tpu]).")
flags.DEFINE_integer("poll_seconds", 30, "How often to poll the queued resource while it is being provisioned.")


class LaunchError(RuntimeError):
  """A step of the launch failed (its command and exit code in the message)."""


def host_count(accelerator: str) -> int:
  """Hosts (one rlhf-jax process each) of an accelerator type.

  v2/v3/v4/v5p name TensorCores (8 per host: 4 chips of 2 cores; v5p's 2 cores per chip count as 2);
  v5litepod/v6e name chips (up to 8 on one host, else 4 per host).
  """
  generation, _, size = accelerator.rpartition("-")
  if generation not in RUNTIMES or not size.isdigit() or int(size) < 1:
    raise app.UsageError(f"unknown accelerator {accelerator!r}: expected GENERATION-SIZE with a generation "
                         f"among {sorted(RUNTIMES)}, e.g. v5p-32")
  size = int(size)
  if generation in ("v5litepod", "v6e"):
    return 1 if size <= 8 else size // 4
  return max(size // 8, 1)


@dataclasses.dataclass(frozen=True)
class Slice:
  """One TPU slice: a queued resource ``name`` with a TPU VM (node) of the same name."""

  name: str
  zone: str
  accelerator: str = "v5p-32"
  project: str | None = None
  runtime_version: str | None = None
  spot: bool = False
  reserved: bool = False

  @property
  def hosts(self) -> int:
    return host_count(self.accelerator)

  @property
  def runtime(self) -> str:
    return self.runtime_version or RUNTIMES[self.accelerator.rpartition("-")[0]]

  def gcloud(self, *args: str) -> list[str]:
    return ["gcloud", "compute", "tpus", *args, f"--zone={self.zone}",
            *([f"--project={self.project}"] if self.project else [])]

  def ssh(self, command: str, worker: str = "all") -> list[str]:
    """``command`` (bash) on one host or all of them at once."""
    return self.gcloud("tpu-vm", "ssh", self.name, f"--worker={worker}", f"--command={command}")


# --- the commands of each action (pure functions: what --dry-run prints) --------------------------------


def create_commands(s: Slice) -> list[list[str]]:
  """Queued-resource request; the caller then waits for ACTIVE (``describe_command``) and installs."""
  if s.spot and s.reserved:
    raise app.UsageError("--spot and --reserved exclude each other")
  capacity = ["--spot"] if s.spot else ["--reserved"] if s.reserved else []
  return [s.gcloud("queued-resources", "create", s.name, f"--node-id={s.name}",
                   f"--accelerator-type={s.accelerator}", f"--runtime-version={s.runtime}", *capacity)]


def describe_command(s: Slice) -> list[str]:
  """Prints the queued resource's state (WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, SUSPENDED, ...)."""
  return s.gcloud("queued-resources", "describe", s.name, "--format=value(state.state)")


def install_commands(s: Slice, tarball: str, python: str = "3.11", jax_extra: str = "tpu") -> list[list[str]]:
  """Copies the project (a tarball of this checkout's tracked files) to every host and installs it, with
  jax[tpu] and Cloud Storage access, in ``REMOTE_DIR/.venv``."""
  setup = " && ".join([
      f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && tar xzf ~/rlhf_jax.tar.gz -C {REMOTE_DIR}",
      "(command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh)",
      f"cd {REMOTE_DIR} && ~/.local/bin/uv venv --python={python} .venv",
      f"~/.local/bin/uv pip install --python=.venv/bin/python -e . 'jax[{jax_extra}]' gcsfs google-cloud-storage",
  ])
  return [s.gcloud("tpu-vm", "scp", tarball, f"{s.name}:rlhf_jax.tar.gz", "--worker=all"), s.ssh(setup)]


def clear_tpu_command(s: Slice) -> list[str]:
  """On every host: remove a stale libtpu lock and kill processes still holding the TPU devices (a crashed
  or interrupted earlier run), so the new run can open them."""
  return s.ssh("sudo rm -f /tmp/libtpu_lockfile; "
               "pids=$(sudo lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | sort -u); "
               "if [ -n \"$pids\" ]; then echo \"killing stale TPU users: $pids\"; sudo kill -9 $pids; sleep 2; fi")


def job_line(s: Slice, job: list[str], workdir: str) -> str:
  """The shell line each host runs: the job in the project's environment, told how many hosts to expect."""
  if not job:
    raise app.UsageError("no command to run: give it after --, e.g. -- rlhf-jax --config=configs/quickstart.py")
  if any(a == "--workdir" or a.startswith("--workdir=") for a in job):
    raise app.UsageError("give the workdir to the launcher (--workdir=gs://...), not to the command")
  if s.hosts > 1 and not workdir.startswith("gs://"):
    raise app.UsageError(f"--workdir must be on Cloud Storage (gs://...): the {s.hosts} hosts of "
                         f"{s.accelerator} share no disk")
  return (f"cd {REMOTE_DIR} && source .venv/bin/activate && "
          f"{EXPECTED_ENV}={s.hosts} {shlex.join([*job, f'--workdir={workdir}'])}")


def run_commands(s: Slice, job: list[str], workdir: str) -> list[list[str]]:
  """Clear stale TPU users; start the job on every host in the background (its log and exit code in files);
  stream host 0's log until it finishes; then wait for every host's exit code (non-zero fails)."""
  line = job_line(s, job, workdir)
  start = (f"rm -f {RUN_RC}; nohup bash -c {shlex.quote(f'{line}; echo $? > {RUN_RC}')} "
           f"> {RUN_LOG} 2>&1 < /dev/null &")
  stream = (f"tail -n +1 -F {RUN_LOG} & tailer=$!; while [ ! -f {RUN_RC} ]; do sleep 5; done; "
            f"sleep 1; kill $tailer; exit $(cat {RUN_RC})")
  collect = (f"while [ ! -f {RUN_RC} ]; do sleep 5; done; rc=$(cat {RUN_RC}); "
             "echo \"host $(hostname): exit $rc\"; exit $rc")
  return [clear_tpu_command(s), s.ssh(start), s.ssh(stream, worker="0"), s.ssh(collect)]


def copy_commands(workdir: str, results: str, with_checkpoints: bool = False) -> list[list[str]]:
  """The workdir's results (config, metrics, summaries, samples, TensorBoard) to ``results``."""
  exclude = [] if with_checkpoints else ["--exclude=(^|.*/)(checkpoints|params|data)/.*"]
  return [["mkdir", "-p", results],
          ["gcloud", "storage", "rsync", "--recursive", *exclude, workdir, results]]


def delete_commands(s: Slice) -> list[list[str]]:
  """The queued resource and its TPU VM (``--force``: even while active)."""
  return [s.gcloud("queued-resources", "delete", s.name, "--force", "--quiet")]


# --- running them ----------------------------------------------------------------------------------------


class Shell:
  """Runs commands, or with ``dry_run`` prints them (``+ command``) and pretends they worked."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def __call__(self, cmd: list[str], check: bool = True) -> int:
    print("+ " + shlex.join(cmd), flush=True)
    if self.dry_run:
      return 0
    rc = subprocess.call(cmd)
    if check and rc:
      raise LaunchError(f"exit {rc}: {shlex.join(cmd)}")
    return rc

  def output(self, cmd: list[str], note: str = "") -> str:
    if self.dry_run:
      print("+ " + shlex.join(cmd) + (f"    # {note}" if note else ""), flush=True)
      return "ACTIVE"
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "NOT_FOUND"


def wait_active(sh: Shell, s: Slice, poll_seconds: int) -> None:
  state = ""
  while True:
    state = sh.output(describe_command(s), note="repeated until ACTIVE")
    if state == "ACTIVE":
      return
    if state in GONE_STATES:
      raise LaunchError(f"queued resource {s.name} is {state}; see `gcloud compute tpus queued-resources "
                        f"describe {s.name} --zone={s.zone}`")
    print(f"[launch] {s.name}: {state or 'requested'}; waiting", flush=True)
    time.sleep(poll_seconds)


def tarball_commands(path: str) -> list[list[str]]:
  """A tarball of this checkout's tracked files (as they are in the working tree)."""
  return [["bash", "-c", f"cd {shlex.quote(str(ROOT))} && git ls-files -z | tar --null -T - -czf {shlex.quote(path)}"]]


def create(sh: Shell, s: Slice) -> None:
  for cmd in create_commands(s):
    sh(cmd)
  wait_active(sh, s, FLAGS.poll_seconds)
  install(sh, s)


def install(sh: Shell, s: Slice) -> None:
  tarball = os.path.join(tempfile.gettempdir(), f"rlhf_jax-{s.name}.tar.gz")
  for cmd in tarball_commands(tarball) + install_commands(s, tarball, FLAGS.python, FLAGS.jax_extra):
    sh(cmd)


def run(sh: Shell, s: Slice, job: list[str], workdir: str, max_restarts: int) -> None:
  if sh.dry_run and max_restarts:
    print(f"# if the run fails and the queued resource is no longer ACTIVE (preempted): delete, create, "
          f"install and run again, up to {max_restarts} times; each re-run resumes from the last checkpoint",
          flush=True)
  for attempt in range(max_restarts + 1):
    try:
      for cmd in run_commands(s, job, workdir):
        sh(cmd)
      return
    except LaunchError as e:
      state = sh.output(describe_command(s))
      if attempt == max_restarts or state not in GONE_STATES:
        raise LaunchError(f"{e} (queued resource: {state})") from None
      print(f"[launch] {s.name} is {state} (preempted): re-creating it; the run resumes from its last "
            f"checkpoint in {workdir}", flush=True)
      sh(delete_commands(s)[0], check=False)
      create(sh, s)


def main(argv: list[str]) -> int:
  if len(argv) < 2 or argv[1] not in ACTIONS:
    raise app.UsageError(f"usage: launch.py {{{'|'.join(ACTIONS)}}} --name=NAME --zone=ZONE ... [-- rlhf-jax ...]")
  action, job = argv[1], argv[2:]
  if job and action != "run":
    raise app.UsageError(f"only run takes a command (got {job} for {action})")
  if not FLAGS.name or (not FLAGS.zone and action != "copy"):
    raise app.UsageError("--name and --zone are required")
  s = Slice(FLAGS.name, FLAGS.zone or "", FLAGS.accelerator, FLAGS.project, FLAGS.runtime_version, FLAGS.spot,
            FLAGS.reserved)
  print(f"[launch] {action} {s.name}: {s.accelerator}, {s.hosts} host(s), runtime {s.runtime}", flush=True)
  sh = Shell(FLAGS.dry_run)
  if action in ("run", "copy") and not FLAGS.workdir:
    raise app.UsageError(f"{action} needs --workdir=gs://BUCKET/DIR")
  try:
    if action == "create":
      create(sh, s)
    elif action == "run":
      run(sh, s, job, FLAGS.workdir, FLAGS.max_restarts)
    elif action == "copy":
      for cmd in copy_commands(FLAGS.workdir, FLAGS.results or os.path.join("results", s.name),
                               FLAGS.with_checkpoints):
        sh(cmd)
    else:
      for cmd in delete_commands(s):
        sh(cmd)
  except LaunchError as e:
    print(f"[launch] failed: {e}", file=sys.stderr, flush=True)
    return 1
  return 0


def normalise_argv(argv: list[str]) -> list[str]:
  """``--dry-run`` -> ``--dry_run`` before ``--`` (the command after it is passed on untouched)."""
  end = argv.index("--") if "--" in argv else len(argv)
  return [a.replace("--dry-run", "--dry_run", 1) if i < end and a.startswith("--dry-run") else a
          for i, a in enumerate(argv)]


if __name__ == "__main__":
  sys.argv = normalise_argv(sys.argv)
  app.run(main)
