"""One JAX CPU device per core by default (``cpu_devices``): the count asked for, who wins, and that a fresh
process gets it. Each process case runs in its own interpreter: JAX fixes its devices when it starts."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from rlhf_jax import cpu_devices

ROOT = pathlib.Path(__file__).resolve().parents[1]
PINS = ("RLHF_JAX_CPU_DEVICES", "JAX_NUM_CPU_DEVICES", "XLA_FLAGS")


@pytest.mark.parametrize("setting, environ, cores, want", [
    (0, {}, 2, 2),  # auto: one per core
    (0, {}, 1, 1),
    (0, {}, 64, cpu_devices.AUTO_MAX),  # capped
    (3, {}, 2, 3),  # the config's explicit count
    (0, {"RLHF_JAX_CPU_DEVICES": "1"}, 2, 1),  # the environment wins over the config
    (4, {"RLHF_JAX_CPU_DEVICES": "0"}, 2, 2),
    (4, {"RLHF_JAX_CPU_DEVICES": " "}, 2, 4),  # blank: unset
    (0, {"JAX_NUM_CPU_DEVICES": "5"}, 2, None),  # the caller fixed it for JAX itself
    (3, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_cpu_foo"}, 2, None),
])
def test_requested_count(setting, environ, cores, want):
  assert cpu_devices.requested_count(setting, environ, cores) == want


def test_bad_settings_name_their_source():
  with pytest.raises(ValueError, match="config key cpu_devices must be >= 0"):
    cpu_devices.requested_count(-1, {}, 2)
  with pytest.raises(ValueError, match="environment variable RLHF_JAX_CPU_DEVICES must be an integer"):
    cpu_devices.requested_count(0, {"RLHF_JAX_CPU_DEVICES": "two"}, 2)


PROBE = """
import json, sys
import jax
from rlhf_jax import cpu_devices
early = cpu_devices.configure(int(sys.argv[1]))
count = jax.device_count()  # the backend starts here
late = cpu_devices.configure(int(sys.argv[1]) + 1)
print(json.dumps({"asked": early, "devices": count, "late": late, "after": jax.device_count()}))
"""


def probe(setting: int, **env) -> dict:
  environ = {k: v for k, v in os.environ.items() if k not in PINS}
  environ.update(JAX_PLATFORMS="cpu", **env)
  out = subprocess.run([sys.executable, "-c", PROBE, str(setting)], capture_output=True, text=True, check=True,
                       env=environ, cwd=ROOT, timeout=300).stdout
  return json.loads(out.strip().splitlines()[-1])


def test_a_fresh_process_gets_one_device_per_core_and_keeps_it():
  want = min(cpu_devices.usable_cores(), cpu_devices.AUTO_MAX)
  # Once JAX has started, a later call changes nothing (and does not raise).
  assert probe(0) == {"asked": want, "devices": want, "late": None, "after": want}


def test_an_explicit_count_and_the_callers_flags():
  assert probe(3)["devices"] == 3
  assert probe(0, RLHF_JAX_CPU_DEVICES="1")["devices"] == 1
  got = probe(3, XLA_FLAGS="--xla_force_host_platform_device_count=5")
  assert got["asked"] is None and got["devices"] == 5


@pytest.mark.parametrize("setting", [None, 1])
def test_the_command_line_runs_on_one_device_per_core_by_default(tmp_path, setting):
  environ = {k: v for k, v in os.environ.items() if k not in PINS}
  environ["JAX_PLATFORMS"] = "cpu"
  args = [sys.executable, "-m", "rlhf_jax", "--config=configs/quickstart.py", f"--workdir={tmp_path / 'run'}",
          "--config.stages=tokenizer"]
  if setting is not None:
    args.append(f"--config.cpu_devices={setting}")
  out = subprocess.run(args, capture_output=True, text=True, check=True, env=environ, cwd=ROOT, timeout=300).stdout
  n = setting or min(cpu_devices.usable_cores(), cpu_devices.AUTO_MAX)
  assert f"[rlhf-jax] mesh data={n} fsdp=1 tensor=1 over {n} cpu device(s)" in out
