"""The Cloud TPU launcher's commands (``experiments/tpu/launch.py --dry-run``): nothing is created."""

import pathlib
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ZONE = "--zone=us-east5-a"


def dry_run(*args: str) -> tuple[list[str], list[list[str]]]:
  """(notes, commands) printed by the launcher with ``--dry-run``."""
  proc = subprocess.run([sys.executable, str(ROOT / "experiments/tpu/launch.py"), *args[:1], "--dry-run",
                         *args[1:]], capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  commands = [shlex.split(line[2:].split("    # ")[0]) for line in lines if line.startswith("+ ")]
  return [line for line in lines if not line.startswith("+ ")], commands


def ssh(worker: str, command: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "demo", f"--worker={worker}", f"--command={command}", ZONE]


def test_v5p_32_run_on_four_hosts():
  notes, commands = dry_run("run", "--name=demo", ZONE, "--accelerator=v5p-32", "--workdir=gs://b/runs/demo",
                            "--", "rlhf-jax", "--config=configs/quickstart.py", "--config.ppo.iterations=10")
  assert notes[0] == "[launch] run demo: v5p-32, 4 host(s), runtime v2-alpha-tpuv5"
  job = ("cd ~/rlhf_jax && source .venv/bin/activate && RLHF_JAX_EXPECTED_PROCESSES=4 rlhf-jax "
         "--config=configs/quickstart.py --config.ppo.iterations=10 --workdir=gs://b/runs/demo")
  assert commands == [
      ssh("all", "sudo rm -f /tmp/libtpu_lockfile; "
                 "pids=$(sudo lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | sort -u); "
                 "if [ -n \"$pids\" ]; then echo \"killing stale TPU users: $pids\"; sudo kill -9 $pids; sleep 2; fi"),
      ssh("all", f"rm -f ~/rlhf_jax_run.rc; nohup bash -c {shlex.quote(job + '; echo $? > ~/rlhf_jax_run.rc')} "
                 "> ~/rlhf_jax_run.log 2>&1 < /dev/null &"),
      ssh("0", "tail -n +1 -F ~/rlhf_jax_run.log & tailer=$!; while [ ! -f ~/rlhf_jax_run.rc ]; do sleep 5; done; "
               "sleep 1; kill $tailer; exit $(cat ~/rlhf_jax_run.rc)"),
      ssh("all", "while [ ! -f ~/rlhf_jax_run.rc ]; do sleep 5; done; rc=$(cat ~/rlhf_jax_run.rc); "
                 "echo \"host $(hostname): exit $rc\"; exit $rc"),
  ]


def test_create_spot_installs_on_every_host():
  _, commands = dry_run("create", "--name=demo", ZONE, "--accelerator=v5p-32", "--spot", "--project=p")
  assert commands[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "demo", "--node-id=demo",
                         "--accelerator-type=v5p-32", "--runtime-version=v2-alpha-tpuv5", "--spot", ZONE,
                         "--project=p"]
  assert commands[1][:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "demo"]
  assert commands[2][:2] == ["bash", "-c"] and "git ls-files" in commands[2][2]
  assert commands[3][3:5] == ["tpu-vm", "scp"] and "--worker=all" in commands[3]
  assert "--worker=all" in commands[4] and "jax[tpu]" in commands[4][7] and "-e ." in commands[4][7]


def test_copy_and_delete():
  _, commands = dry_run("copy", "--name=demo", "--workdir=gs://b/runs/demo", "--results=out")
  assert commands == [["mkdir", "-p", "out"],
                      ["gcloud", "storage", "rsync", "--recursive", "--exclude=(^|.*/)(checkpoints|params|data)/.*",
                       "gs://b/runs/demo", "out"]]
  _, commands = dry_run("delete", "--name=demo", ZONE, "--reserved")
  assert commands == [["gcloud", "compute", "tpus", "queued-resources", "delete", "demo", "--force", "--quiet", ZONE]]


@pytest.mark.parametrize("accelerator,hosts", [("v5p-8", 1), ("v5p-32", 4), ("v5p-128", 16), ("v4-16", 2),
                                               ("v5litepod-8", 1), ("v5litepod-16", 4), ("v6e-64", 16)])
def test_host_counts(accelerator, hosts):
  notes, _ = dry_run("delete", "--name=demo", ZONE, f"--accelerator={accelerator}")
  assert f"{hosts} host(s)" in notes[0]


def test_refuses_a_local_workdir_on_several_hosts():
  proc = subprocess.run([sys.executable, str(ROOT / "experiments/tpu/launch.py"), "run", "--dry-run", "--name=d", ZONE,
                         "--workdir=/tmp/x", "--", "rlhf-jax", "--config=configs/quickstart.py"],
                        capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert proc.returncode != 0 and "must be on Cloud Storage" in proc.stderr
