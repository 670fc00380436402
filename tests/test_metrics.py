"""Tests for rlhf_jax.metrics and rlhf_jax.progress."""

import io
import json
import os
import struct
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from rlhf_jax.metrics import MetricsWriter, read_metrics
from rlhf_jax.progress import Progress


def _tb_scalars(logdir):
  """{tag: [(step, value), ...]} from every event file in `logdir` (no TF)."""
  out = {}
  for name in sorted(os.listdir(logdir)):
    with open(os.path.join(logdir, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4  # length, its crc, payload, payload crc
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_jsonl_lines_types_and_flush(tmp_path):
  writer = MetricsWriter(tmp_path)
  writer.write("sft", 10, {"train/loss": jnp.float32(2.5), "train/tokens": np.int64(4096),
                           "train/lr": 1e-3, "train/ok": jnp.array(True)})
  writer.write("sft", 20, {"train/loss": float("nan"), "eval/gold_reward": np.float32(np.inf)})
  # Flushed on every write: readable while the writer is still open.
  rows = read_metrics(tmp_path)
  assert rows == [
      {"stage": "sft", "step": 10, "train/loss": 2.5, "train/tokens": 4096,
       "train/lr": 1e-3, "train/ok": True},
      {"stage": "sft", "step": 20, "train/loss": None, "eval/gold_reward": None},
  ]
  assert isinstance(rows[0]["train/tokens"], int)
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert "NaN" not in lines[1] and "Infinity" not in lines[1]
  writer.close()


def test_rejects_bad_metrics(tmp_path):
  with MetricsWriter(tmp_path) as writer:
    with pytest.raises(ValueError, match="reserved"):
      writer.write("sft", 1, {"step": 3})
    with pytest.raises(ValueError, match="scalar"):
      writer.write("sft", 1, {"x": jnp.ones(3)})
    with pytest.raises(TypeError, match="non-numeric"):
      writer.write("sft", 1, {"x": "high"})
  with pytest.raises(RuntimeError, match="closed"):
    writer.write("sft", 2, {"x": 1.0})


def test_tensorboard_event_file(tmp_path):
  with MetricsWriter(tmp_path) as writer:
    writer.write("rm", 1, {"train/loss": 0.7})
    writer.write("rm", 2, {"train/loss": 0.5, "eval/rm_accuracy": 0.75})
  logdir = tmp_path / "tensorboard" / "rm"
  files = os.listdir(logdir)
  assert len(files) == 1 and files[0].startswith("events.out.tfevents")
  scalars = _tb_scalars(logdir)
  assert scalars["train/loss"] == [(1, pytest.approx(0.7)), (2, pytest.approx(0.5))]
  assert scalars["eval/rm_accuracy"] == [(2, 0.75)]


def test_a_run_writes_tensorboard_without_importing_torch(tmp_path):
  """tensorboardX imports torch where it is installed (seconds of every run's start-up); the writer loads
  it without, and torch still imports afterwards."""
  script = f"""
import sys
from rlhf_jax import main
from rlhf_jax.metrics import MetricsWriter
with MetricsWriter({str(tmp_path)!r}) as writer:
  writer.write("sft", 1, {{"train/loss": 0.5}})
assert "torch" not in sys.modules, "torch was imported"
import torch
print(torch.ones(2).sum().item())
"""
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["2.0"]
  assert _tb_scalars(tmp_path / "tensorboard" / "sft")["train/loss"] == [(1, 0.5)]


def test_summary_merge_is_atomic_and_keeps_stages(tmp_path):
  with MetricsWriter(tmp_path) as writer:
    writer.write_summary("sft", {"eval/lm_loss": 3.0, "eval/gold_reward": np.float32(0.25)})
    writer.write_summary("ppo", {"eval/kl": 1.5})
    writer.write_summary("sft", {"eval/lm_loss": 2.0, "eval/win_rate_vs_sft": float("nan")})
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary == {
      "sft": {"eval/lm_loss": 2.0, "eval/gold_reward": 0.25, "eval/win_rate_vs_sft": None},
      "ppo": {"eval/kl": 1.5},
  }
  assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "summary.json"]


def test_truncated_last_line_is_ignored_and_dropped_on_reopen(tmp_path):
  with MetricsWriter(tmp_path) as writer:
    writer.write("sft", 1, {"train/loss": 1.0})
    writer.write("sft", 2, {"train/loss": 0.9})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"stage": "sft", "step": 3, "train/lo')  # killed mid-write
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
  with MetricsWriter(tmp_path) as writer:
    writer.write("sft", 3, {"train/loss": 0.8})
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_malformed_middle_line_raises(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"stage": "a", "step": 1}\n{oops\n{"stage": "a", "step": 2}\n')
  with pytest.raises(ValueError, match="metrics.jsonl:2"):
    read_metrics(tmp_path)


def _run(workdir, stage_steps, stop_at=None):
  """Writes sft then ppo metrics; stops (crash) after ppo step `stop_at`."""
  with MetricsWriter(workdir) as writer:
    for stage, steps in stage_steps:
      for step in steps:
        writer.write(stage, step, {"train/loss": 1.0 / step})
        if stage == "ppo" and step == stop_at:
          return


def test_truncate_after_makes_resume_match_uninterrupted(tmp_path):
  plan = [("sft", range(1, 4)), ("ppo", range(1, 7))]
  _run(tmp_path / "full", plan)
  _run(tmp_path / "crash", plan, stop_at=5)
  # Resume from a ppo checkpoint at step 3: steps 4-5 are redone.
  with MetricsWriter(tmp_path / "crash") as writer:
    writer.truncate_after("ppo", 3)
    assert [r["step"] for r in read_metrics(tmp_path / "crash", "ppo")] == [1, 2, 3]
    for step in range(4, 7):
      writer.write("ppo", step, {"train/loss": 1.0 / step})
  full = (tmp_path / "full" / "metrics.jsonl").read_text()
  assert (tmp_path / "crash" / "metrics.jsonl").read_text() == full
  assert len(read_metrics(tmp_path / "crash", "sft")) == 3
  assert not [n for n in os.listdir(tmp_path / "crash") if ".tmp" in n]


def test_non_primary_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  with MetricsWriter(workdir, is_primary=False) as writer:
    writer.write("sft", 1, {"train/loss": 1.0})
    writer.write_summary("sft", {"eval/lm_loss": 1.0})
    writer.truncate_after("sft", 0)
  assert not workdir.exists()
  assert read_metrics(workdir) == []


class _FakeClock:
  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


class _Tty(io.StringIO):
  def isatty(self):
    return True


def test_progress_plain_stream_is_throttled():
  clock, stream = _FakeClock(), io.StringIO()
  progress = Progress("sft", 400, stream=stream, log_every_s=10.0, clock=clock)
  for step in range(1, 401):
    clock.t += 0.125
    progress.update(step, {"loss": 2.3141, "tokens": 128})
  progress.close()
  lines = stream.getvalue().splitlines()
  # First update, then every 10 s (80 steps), and the final step.
  assert [line.split()[1] for line in lines] == ["1/400", "81/400", "161/400", "241/400", "321/400", "400/400"]
  assert lines[1] == "sft  81/400  20%  8 it/s  ETA 0:00:40  loss=2.314 tokens=128"
  assert "\r" not in stream.getvalue()


def test_progress_tty_redraws_one_line_and_resumes():
  clock, stream = _FakeClock(), _Tty()
  progress = Progress("ppo", 100, start_step=50, stream=stream, clock=clock)
  clock.t += 2.0
  progress.update(60, {"kl": 0.5})
  progress.close()
  out = stream.getvalue()
  assert out.startswith("\rppo  60/100  60%  5 it/s  ETA 0:00:08  kl=0.5")
  assert out.endswith("\n") and out.count("\n") == 1


def test_progress_disabled_prints_nothing():
  stream = io.StringIO()
  progress = Progress("rm", 10, stream=stream, enabled=False)
  progress.update(10, {"loss": 1.0})
  progress.close()
  assert stream.getvalue() == ""
