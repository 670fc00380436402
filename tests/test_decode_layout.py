"""The tensor-parallel decode view (decode_layout.py): which view a model and mesh get, and that sampling in
it gives the training layout's tokens with the weights split instead of the rows."""

import types

import numpy as np
import pytest
from flax import nnx

from rlhf_jax.decode_layout import DecodeLayout, _room_for_copy, decode_grid, tensor_ways
from tests.probes import run_probe


def _cfg(heads=4, kv=4, d_ff=1024, vocab=4096):
  return types.SimpleNamespace(num_heads=heads, kv_heads=kv, d_ff=d_ff, vocab_size=vocab)


@pytest.mark.parametrize("cfg, devices, ways", [
    (_cfg(), 2, 2), (_cfg(), 8, 4), (_cfg(kv=2), 8, 2), (_cfg(heads=12, kv=12, d_ff=3072, vocab=50257), 8, 4),
    (_cfg(heads=32, kv=8, d_ff=11008, vocab=32000), 8, 8), (_cfg(), 1, 1), (_cfg(heads=6, kv=6), 4, 2),
    (_cfg(heads=4, kv=4, d_ff=6), 4, 2)])
def test_tensor_ways_divides_every_split_dimension(cfg, devices, ways):
  assert tensor_ways(cfg, devices) == ways


def test_decode_grid_keeps_each_tensor_group_in_one_process():
  dev = [types.SimpleNamespace(process_index=i // 2) for i in range(4)]  # 2 processes x 2 devices
  grid = decode_grid(np.array(dev, dtype=object), 2)
  assert grid.shape == (2, 1, 2)
  assert [[d.process_index for d in g] for g in grid[:, 0]] == [[0, 0], [1, 1]]
  assert decode_grid(np.array(dev, dtype=object), 4) is None
  interleaved = [dev[0], dev[2], dev[1], dev[3]]  # processes alternate in mesh order
  assert decode_grid(np.array(interleaved, dtype=object), 2) is None


def test_unknown_mode_is_named():
  with pytest.raises(ValueError, match="config.sharding.decode must be one of"):
    DecodeLayout(mesh=None, rules=(), mode="tp")


@pytest.fixture(scope="module")
def probe():
  return run_probe("decode_layout_check.py", devices=4)


def test_views_chosen_for_each_mesh(probe):
  assert probe["views"] == {"data4": {"data": 2, "fsdp": 1, "tensor": 2},  # 2 KV heads: 2 ways, rows 2 ways
                            "fsdp4": {"data": 2, "fsdp": 1, "tensor": 2},
                            "data2_tensor2": None}  # already tensor-parallel that many ways
  assert probe["auto_view"] == {"data": 2, "fsdp": 1, "tensor": 2}  # a data-parallel mesh on the CPU backend
  assert probe["auto_fsdp"] is None  # "auto" keeps a model-sharded mesh as it is
  assert probe["auto_small_step"] is None  # and a step too small for the all-reduces to pay
  # A vocabulary t does not divide keeps the LM head whole: "auto" declines, "tensor" splits the layers.
  assert probe["odd_vocab"] == {"auto": None, "tensor": {"data": 2, "fsdp": 1, "tensor": 2}}
  assert probe["as_trained"] is None


def test_tensor_view_samples_the_same_greedy_tokens(probe):
  plain, tensor = probe["plain"], probe["tensor"]
  assert tensor["tokens"] == plain["tokens"]
  assert tensor["rollout_tokens"] == plain["rollout_tokens"] == plain["tokens"]
  np.testing.assert_allclose(tensor["log_probs"], plain["log_probs"], atol=2e-5)
  assert np.asarray(plain["tokens"]).shape == (8, 5)


def test_tensor_view_hands_rows_back_in_the_batch_layout(probe):
  for side in ("plain", "tensor"):
    assert probe[side]["sharding"] == probe[side]["rollout_sharding"] == "P('data',)"


def test_tensor_view_splits_the_weights_not_the_rows(probe):
  # Data-parallel decoding never talks between devices; the view sums each split product across its group.
  assert probe["plain"]["collectives"]["all-reduce"] == 0
  assert probe["auto"]["collectives"]["all-reduce"] == 0  # the probe's model is far below AUTO_MIN_STEP_FLOPS
  assert probe["auto"]["tokens"] == probe["plain"]["tokens"]
  assert probe["tensor"]["collectives"]["all-reduce"] >= 2 * 2  # >= two per layer (attention out, MLP down)


def test_timed_decode_steps_are_the_decode_in_each_layout(probe):
  trained, view = probe["timed_steps"]["trained"], probe["timed_steps"]["view"]
  assert view["tokens"] == trained["tokens"] and len(trained["tokens"]) == 8
  assert trained["collectives"]["all-reduce"] == 0
  assert view["collectives"]["all-reduce"] >= 2 * 2


def test_auto_takes_the_view_only_where_it_pays(probe):
  taken, declined = probe["forced"]["True"], probe["forced"]["False"]
  assert taken["collectives"]["all-reduce"] >= 2 * 2
  assert declined["collectives"]["all-reduce"] == 0
  assert taken["tokens"] == declined["tokens"] == probe["plain"]["tokens"]


def test_auto_times_each_shape_once(probe):
  measured = probe["measured"]
  # Two programs timed once (as trained, then the view) for 8 rows at the cache a step reads (6 prompt + 6 new
  # tokens - 1, one phase), however many samplers of that shape are traced.
  assert measured["timed"] == [[True, 8, 11], [False, 8, 11]]
  assert len(measured["answers"]) == 1 and isinstance(measured["answers"][0], bool)
  assert measured["choices"] == [[8, 11, {"data": 2, "fsdp": 1, "tensor": 2}]]
  assert measured["again"] == measured["tokens"]
  assert [row[:5] for row in measured["tokens"]] == probe["plain"]["tokens"]  # greedy: 5 tokens then a sixth


def test_no_timing_without_room_for_a_copy_of_the_weights():
  state = nnx.State({"w": nnx.Param(np.zeros((1000, 250), np.float32))})  # 1 MB

  def mesh(free_bytes):
    stats = None if free_bytes is None else {"bytes_limit": 10**9, "bytes_in_use": 10**9 - free_bytes}
    device = types.SimpleNamespace(process_index=0, memory_stats=lambda: stats)
    return types.SimpleNamespace(devices=np.array([device, device], dtype=object))

  assert _room_for_copy(state, mesh(None))  # CPU: no limit reported
  assert _room_for_copy(state, mesh(3 * 10**6))
  assert not _room_for_copy(state, mesh(1.5 * 10**6))


def test_a_run_keeps_the_layout_it_timed(probe):
  record = probe["record"]
  assert record["entries"] == 1 and record["timed_first"] == 2
  # A new process reads the record instead of timing, and decodes as it says (here the flipped answer).
  assert record["timed_again"] == 0
  assert record["taken"] == record["recorded_view"]
  assert (record["all_reduce"] > 0) == record["recorded_view"]
  assert "decode_layout.json: not a decode layout record" in record["damaged"]
  assert "delete it to time the layouts again" in record["damaged"]


def test_the_view_must_win_by_a_margin(probe):
  assert probe["margin"] == {"1.04": False, "1.06": True}  # as trained 1.04 or 1.06 s per call, view 1.0
