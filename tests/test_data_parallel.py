"""data_parallel.rows_call: each training step's gradient crosses a data-parallel mesh once, leaf by leaf in
one process and as one flat sum across processes."""

import pytest

from probes import run_probe

STEPS = ("lm", "lm_packed", "reward", "reward_packed", "dpo", "ppo")


@pytest.fixture(scope="module")
def data_parallel_run():
  return run_probe("data_parallel_check.py", 2)


@pytest.mark.parametrize("step", STEPS)
def test_a_step_all_reduces_its_gradient_once(data_parallel_run, step):
  """Exactly the parameter count per model pass all-reduced (PPO: both models over the experience, then the
  policy over the pretraining rows): a tensor per leaf in one process, one tensor per pass in the flat form
  used across processes. XLA's own partitioning sent each weight twice when the prompt is computed once
  per group (reward, DPO)."""
  run = data_parallel_run[step]
  assert run["rows_call_flat"]["floats"] == run["expected_floats"]
  assert run["rows_call"]["floats"] == run["expected_leaf_floats"]
  assert run["rows_call_flat"]["tensors"] == run["expected_flat_tensors"]
  assert run["rows_call"]["tensors"] > 10 * run["expected_flat_tensors"]  # one per leaf
  if step in ("reward", "dpo"):
    assert run["plain"]["floats"] > 1.9 * run["params"] and run["plain"]["tensors"] > 50


@pytest.mark.parametrize("step", STEPS)
def test_a_step_matches_plain_autodiff(data_parallel_run, step):
  """The same SGD step as without the mesh (XLA's partitioning of plain autodiff), up to float rounding."""
  run = data_parallel_run[step]
  assert run["max_param_step"] > 1e-3
  for form in ("rows_call", "rows_call_flat"):
    assert run[f"max_param_diff_{form}"] < 1e-5 * run["max_param_step"] + 1e-8


def test_rows_that_do_not_split_into_groups_take_the_plain_call(data_parallel_run):
  assert data_parallel_run["fallback_grad_diff"] == 0.0


def test_applies_only_where_parameters_sit_whole_on_every_device(data_parallel_run):
  assert data_parallel_run["applies"] == {"data2": True, "fsdp2": False, "tensor2": False, "one_device": False}
