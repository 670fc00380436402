"""The speed suite (experiments/benchmarks) runs at a tiny size and drives the library's own functions.

No timings are asserted: this only keeps the suite from rotting as the library changes.
"""

import functools
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.benchmarks import library, sizes, suite  # noqa: E402
from rlhf_jax import generate as generate_lib, state as state_lib  # noqa: E402

KEYS = {
    "matmul_peak": {"gflops", "gflops_max"},
    "mem_bandwidth": {"gbps"},
    "generate": {"new_tokens_per_s", "compile_s"},
    "generate_grouped": {"new_tokens_per_s", "compile_s", "samples_per_prompt"},
    "generate_top_p": {"new_tokens_per_s", "compile_s", "top_p"},
    "sft_step": {"tokens_per_s", "ms_per_step", "mfu", "compile_s"},
    "sft_step_varlen": {"fixed_real_tokens_per_s", "bucketed_real_tokens_per_s", "speedup", "packed_real_tokens_per_s",
                        "packed_speedup"},
    "sft_step_long": {"dense_tokens_per_s", "blocked_tokens_per_s", "speedup", "attention_block"},
    "reward_step": {"pairs_per_s", "compile_s"},
    "reward_step_kwise": {"per_row_ms_per_step", "shared_ms_per_step", "speedup"},
    "reward_step_varlen": {"shared_ms_per_step", "shared_fill", "packed_1x_ms_per_step", "packed_1x_fill",
                           "packed_1x_speedup", "packed_2x_speedup"},
    "dpo_step_varlen": {"shared_ms_per_step", "shared_fill", "packed_1x_ms_per_step", "packed_1x_fill",
                        "packed_1x_speedup", "packed_2x_speedup"},
    "dpo_step": {"pairs_per_s", "ms_per_step", "compile_s", "precomputed_ms_per_step"},
    "rl_iter": {"s_per_iter", "phases", "compile_s"},
    "rl_iter_shared": {"s_per_iter", "phases", "compile_s"},
    "rl_iter_sampler_lp": {"s_per_iter", "phases", "compile_s"},
    "rl_iter_rloo": {"s_per_iter", "phases", "compile_s"},
    "rl_iter_unfused": {"s_per_iter", "phases", "compile_s", "fused_experience"},
}
PHASES = {"generate", "reference", "reward", "value", "update"}


def _spy(calls, name, fn):
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    calls.append((name, fn))
    return fn(*args, **kwargs)
  return wrapper


@pytest.fixture(scope="module")
def results():
  """Every benchmark once at the tiny size, with spies on the library entry points it must go through."""
  calls = []
  patch = pytest.MonkeyPatch()
  patch.setattr(state_lib, "compile_step", _spy(calls, "compile_step", state_lib.compile_step))
  patch.setattr(generate_lib, "make_sampler", _spy(calls, "make_sampler", generate_lib.make_sampler))
  try:
    from rlhf_jax import rollout as rollout_lib
    patch.setattr(rollout_lib, "make_rollout_fn", _spy(calls, "make_rollout_fn", rollout_lib.make_rollout_fn))
  except ImportError:  # an older library samples rollouts with make_sampler alone
    pass
  original_find = library.find

  def find(name, *modules):
    found = original_find(name, *modules)
    return _spy(calls, name, found) if callable(found) else found  # constants (batch keys) as they are

  patch.setattr(library, "find", find)
  try:
    env = suite.make_env(sizes.SIZES["tiny"], reps=1)
    records = {name: bench(env) for name, bench in suite.BENCHMARKS.items()}
  finally:
    patch.undo()
  return records, calls


@pytest.mark.parametrize("name", sorted(KEYS))
def test_benchmark_record_has_its_keys(results, name):
  record = results[0][name]
  assert record["name"] == name
  assert KEYS[name] | {"peak_rss_mb"} <= set(record)
  json.dumps(record)
  if name.startswith("rl_iter"):
    assert PHASES <= set(record["phases"])
    assert all(v >= 0 for v in record["phases"].values())


def test_benchmarks_drive_library_functions(results):
  _, calls = results
  called = {name for name, _ in calls}
  assert {"compile_step", "make_lm_step", "make_reward_step", "make_dpo_step", "make_ppo_update",
          "make_experience_fn", "make_experience_inputs_fn"} <= called
  # One epoch of one minibatch: the update finishes the experience, unless told not to.
  assert results[0]["rl_iter"]["fused_experience"] and not results[0]["rl_iter_unfused"]["fused_experience"]
  assert results[0]["rl_iter"]["phases"]["value"] == 0 < results[0]["rl_iter_unfused"]["phases"]["value"]
  assert "make_sampler" in called or "make_rollout_fn" in called
  assert "trim_texts" in called and "pack" in called
  varlen = results[0]["sft_step_varlen"]
  assert varlen["bucketed_width"] < varlen["fixed_width"] == sizes.SIZES["tiny"].sft_len
  assert varlen["packed_rows"] < varlen["fixed_rows"] and varlen["packed_width"] == varlen["fixed_width"]
  for name, fn in calls:
    assert fn.__module__.startswith("rlhf_jax."), (name, fn.__module__)


def test_command_line_prints_json_lines():
  """--matmul_dtype=bfloat16 runs the model with bf16 weight products and times the peak the same way."""
  out = subprocess.run([sys.executable, str(ROOT / "experiments/benchmarks/run.py"), "--size=tiny", "--reps=1",
                        "--only=generate", "--matmul_dtype=bfloat16"], capture_output=True, text=True, check=True,
                       timeout=600).stdout
  records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  assert [r["name"] for r in records] == ["matmul_peak", "mem_bandwidth", "generate"]
  assert {r["model_matmul_dtype"] for r in records} == {"bfloat16"}
  assert records[0]["dtype"] == "bfloat16"


def test_ab_compares_the_working_tree_with_a_revision():
  """experiments/benchmarks/ab.py: both libraries in one process, one JSON line per benchmark."""
  out = subprocess.run([sys.executable, str(ROOT / "experiments/benchmarks/ab.py"), "--size=tiny", "--pairs=1",
                        "--only=reward_step"], capture_output=True, text=True, check=True, timeout=600,
                       cwd=ROOT).stdout
  records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  assert [r["name"] for r in records] == ["reward_step"]
  assert records[0]["base_s"] > 0 and records[0]["new_s"] > 0 and records[0]["speedup"] > 0


def test_gradient_sum_times_both_versions_across_processes():
  """experiments/benchmarks/gradient_sum.py: 2 local processes joined by gloo, one JSON line per step (the
  reward step only: the sft step is the same code with another step maker)."""
  out = subprocess.run([sys.executable, str(ROOT / "experiments/benchmarks/gradient_sum.py"), "--size=tiny",
                        "--reps=1", "--steps=reward_step"], capture_output=True, text=True, check=True, timeout=600,
                       cwd=ROOT).stdout
  records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  assert [r["name"] for r in records] == ["reward_step"]
  assert all(r["processes"] == 2 and r["rows_call_ms"] > 0 and r["plain_ms"] > 0 for r in records)


def test_size_overrides_change_the_named_fields_and_name_bad_keys():
  base = sizes.SIZES["bench-small"]
  size = sizes.with_overrides(base, "rl_new=448, model.attention_block=0,model.dropout=0.1,model.remat=true")
  assert size.rl_new == 448 and size.model.attention_block == 0 and size.model.dropout == 0.1 and size.model.remat
  assert size.model.d_model == base.model.d_model and sizes.with_overrides(base, "") == base
  for spec, message in [("rl_neww=4", "unknown key 'rl_neww'"), ("model.widht=4", "unknown key 'model.widht'"),
                        ("rl_new", "is not key=value"), ("rl_new=many", "rl_new='many' is not a valid int"),
                        ("model.scan_layers=yes", "is not a valid bool")]:
    with pytest.raises(ValueError, match=message):
      sizes.with_overrides(base, spec)
