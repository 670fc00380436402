"""Sequence packing (``data.pack_width``): the packer's layout, and that a packed batch trains as the rows did.

The decoder restarts positions per segment and attends within a segment only, so each packed sequence's
logits, the mean next-token loss and its gradient must equal those of the unpacked batch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax.algorithms.lm import lm_loss, make_lm_step
from rlhf_jax.data import bucketing, packing
from rlhf_jax.data.batching import lm_batch, sft_batch
from rlhf_jax.models import Decoder, DecoderConfig, positions_from_segments
from rlhf_jax import sharding, state as state_lib

PAD = 0


class CharTokenizer:
  bos_id, eos_id, pad_id = 1, 2, PAD

  def encode(self, text):
    return [3 + (ord(c) % 50) for c in text]


def tiny(flavour, **kw):
  base = dict(vocab_size=53, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_len=64, flavour=flavour,
              num_kv_heads=2 if flavour == "llama" else 0)
  base.update(kw)
  return DecoderConfig(**base)


def demo_batch(mask_prompt=True):
  prompts = ["ab", "a longer prompt", "x", "mid prompt", "q", "another one"]
  responses = ["yes", "r", "a much longer response", "ok then", "no", "fine"]
  return sft_batch(CharTokenizer(), prompts, responses, 16, 24, mask_prompt=mask_prompt)[0]


def test_first_fit_decreasing_places_longest_first_into_the_first_bin_with_room():
  assert packing.first_fit_decreasing(np.array([3, 7, 5, 2, 0, 4]), 9) == [[1, 3], [2, 5], [0]]
  assert packing.first_fit_decreasing(np.array([]), 9) == []
  with pytest.raises(ValueError, match="data.pack_width=6"):
    packing.first_fit_decreasing(np.array([3, 7]), 6)


@pytest.mark.parametrize("rows,granule", [(1, 1), (15, 1), (16, 2), (31, 2), (32, 4), (100, 8), (130, 16)])
def test_row_granule_is_a_power_of_two_near_an_eighth(rows, granule):
  assert packing.row_granule(rows) == granule


def test_pack_keeps_every_sequence_in_order_with_its_loss_mask_and_segment():
  batch = demo_batch(mask_prompt=False)
  packed = packing.pack(batch, 48, PAD)
  assert set(packed) == {"tokens", "mask", "loss_mask", "segments"}
  assert packed["tokens"].shape[1] == 48 and packed["tokens"].shape[0] < batch["tokens"].shape[0]
  assert packed["mask"].sum() == batch["mask"].sum()
  found = []
  for r in range(packed["tokens"].shape[0]):
    segs = packed["segments"][r]
    assert np.all((segs > 0) == (packed["mask"][r] == 1))
    ids = segs[segs > 0]
    assert np.all(np.diff(ids) >= 0) and (ids.size == 0 or ids[0] == 1)  # contiguous, numbered from 1
    for s in np.unique(ids):
      cols = np.flatnonzero(segs == s)
      assert np.all(np.diff(cols) == 1)
      found.append((packed["tokens"][r, cols].tolist(), packed["loss_mask"][r, cols].tolist()))
  expected = []
  for i in range(batch["tokens"].shape[0]):
    real = batch["mask"][i] == 1
    expected.append((batch["tokens"][i, real].tolist(), batch["loss_mask"][i, real].tolist()))
  assert sorted(found) == sorted(expected)  # each first token's loss mask is 0 already in its own row
  assert all(lm[0] == 0 for _, lm in found)
  assert packing.fill(packed) > packing.fill(batch)


def test_pack_zeroes_the_loss_on_a_segment_start_and_pads_rows_to_the_granule():
  tokens = np.arange(1, 19 * 4 + 1).reshape(19, 4)
  batch = {"tokens": tokens, "mask": np.ones((19, 4), np.int32), "loss_mask": np.ones((19, 4), np.float32)}
  packed = packing.pack(batch, 8, PAD)
  assert packed["tokens"].shape == (10, 8)  # 10 rows of two sequences, 10 rounded to the granule 1
  assert packed["loss_mask"].sum() == 19 * 3
  assert packed["mask"][-1].sum() == 4  # the odd one out
  assert packing.pack(batch, 4, PAD)["tokens"].shape == (20, 4)  # 19 rows -> a multiple of 2
  empty = packing.pack({k: v[:0] for k, v in batch.items()}, 8, PAD)
  assert empty["mask"].shape == (1, 8) and empty["mask"].sum() == 0
  with pytest.raises(ValueError, match="loss_mask"):
    packing.pack({"tokens": tokens, "mask": batch["mask"]}, 8, PAD)


def test_packed_rows_keep_their_segments_when_trimmed_to_a_bucket():
  packed = packing.pack(demo_batch(), 200, PAD)  # all six in one row of ~90 tokens: the 128 bucket
  trimmed = bucketing.trim_texts(packed, 16)
  assert trimmed["segments"].shape == trimmed["tokens"].shape
  assert trimmed["tokens"].shape == (1, 128) and trimmed["mask"].sum() == packed["mask"].sum()


def test_comparison_fill_counts_a_shared_prompt_once_and_padding_responses_as_slots():
  # 2 examples x K=3 slots, P=4 prompt columns (left-padded), R=5 response columns (right-padded).
  mask = np.zeros((2, 3, 9), np.int32)
  mask[0, :, 1:4] = 1  # prompt of 3 tokens, in every slot
  mask[0, 0, 4:9], mask[0, 1, 4:6], mask[0, 2, 4:7] = 1, 1, 1  # responses of 5, 2, 3 tokens
  mask[1, :, 0:4] = 1  # prompt of 4 tokens
  mask[1, 0, 4:8], mask[1, 1, 4:5] = 1, 1  # responses of 4 and 1; slot 2 pads (a copy of response 0)
  mask[1, 2] = mask[1, 0]
  batch = {"mask": mask, "response_mask": np.array([[1, 1, 1], [1, 1, 0]], np.int32)}
  real_shared = (3 + 4) + (5 + 2 + 3) + (4 + 1)
  assert packing.comparison_fill(batch, 4) == pytest.approx(real_shared / (2 * 4 + 2 * 3 * 5))
  real_rows = (3 * 3 + 5 + 2 + 3) + (2 * 4 + 4 + 1)
  assert packing.comparison_fill(batch, 0) == pytest.approx(real_rows / (2 * 3 * 9))
  one = {"mask": mask[:, :1], "response_mask": batch["response_mask"][:, :1]}  # K=1: nothing shared
  assert packing.comparison_fill(one, 4) == pytest.approx((3 + 5 + 4 + 4) / (2 * 9))
  with pytest.raises(ValueError, match=r"\[B, K, T\]"):
    packing.comparison_fill({"mask": mask[:, 0], "response_mask": batch["response_mask"]})


def test_positions_restart_at_each_segment():
  mask = jnp.asarray([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
  segments = jnp.asarray([[1, 1, 2, 2, 2, 0], [1, 2, 2, 3, 3, 3]])
  np.testing.assert_array_equal(positions_from_segments(mask, segments), [[0, 1, 0, 1, 2, 2], [0, 0, 1, 0, 1, 2]])


@pytest.mark.parametrize("flavour,kw", [("gpt2", {}), ("llama", {}), ("gpt2", {"scan_layers": True, "remat": True})])
def test_packed_logits_loss_and_gradient_equal_the_unpacked_batch(flavour, kw):
  graphdef, params = nnx.split(Decoder(tiny(flavour, **kw), rngs=nnx.Rngs(0)))
  batch = demo_batch()
  packed = packing.pack(batch, 64, PAD)
  assert packed["tokens"].shape[0] < batch["tokens"].shape[0]
  model = nnx.merge(graphdef, params)
  logits, _ = model(jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"]))
  packed_logits, _ = model(jnp.asarray(packed["tokens"]), jnp.asarray(packed["mask"]),
                           segments=jnp.asarray(packed["segments"]))
  # Every sequence's logits, found by its tokens: each row of the batch is one sequence.
  for i in range(batch["tokens"].shape[0]):
    real = batch["mask"][i] == 1
    seq = batch["tokens"][i, real]
    hits = [(r, c) for r in range(packed["tokens"].shape[0]) for c in range(64 - seq.size + 1)
            if packed["segments"][r, c] > 0 and (c == 0 or packed["segments"][r, c - 1] != packed["segments"][r, c])
            and np.array_equal(packed["tokens"][r, c:c + seq.size], seq)]
    r, c = hits[0]
    np.testing.assert_allclose(packed_logits[r, c:c + seq.size], logits[i, real], atol=2e-5)

  def loss(p, b):
    return lm_loss(graphdef, p, {k: jnp.asarray(v) for k, v in b.items()}, None)

  (l0, n0), g0 = jax.value_and_grad(loss, has_aux=True)(params, batch)
  (l1, n1), g1 = jax.value_and_grad(loss, has_aux=True)(params, packed)
  assert float(n0) == float(n1) > 0
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g0)


def test_segments_are_refused_with_a_cache():
  from rlhf_jax.models import init_cache
  model = Decoder(tiny("gpt2"), rngs=nnx.Rngs(0))
  tokens = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="segments"):
    model(tokens, tokens, init_cache(model.cfg, 1, 8), segments=tokens)


def test_a_packed_sft_step_with_pretraining_mix_matches_the_unpacked_step():
  """The train step as the sft stage builds it, packed text and ptx rows against the plain ones."""
  graphdef, params = nnx.split(Decoder(tiny("gpt2"), rngs=nnx.Rngs(2)))
  mesh = sharding.make_mesh({"data": 1})
  # eps well above float noise: the key biases' true gradient is 0, and Adam at eps 1e-8 turns their
  # ~1e-11 rounding noise into steps of ~1e-6 that differ with the summation order.
  tx = optax.adamw(1e-3, eps=1e-6)
  step = make_lm_step(graphdef, tx, ptx_coef=0.5, mesh=mesh)
  ptx = lm_batch(CharTokenizer(), ["some text", "more pretraining text here", "t"], 32)[0]
  plain = {**demo_batch(), **{f"ptx_{k}": v for k, v in ptx.items()}}
  packed = {**packing.pack(demo_batch(), 64, PAD), **{f"ptx_{k}": v for k, v in packing.pack(ptx, 64, PAD).items()}}
  results = []
  for batch in (plain, packed):
    rep = jax.tree.map(lambda _: sharding.replicated(mesh), params)
    state, _ = state_lib.create_train_state({"policy": params}, {"policy": tx}, {"policy": rep}, mesh, seed=0)
    state, metrics = jax.jit(step)(state, {k: jnp.asarray(v) for k, v in batch.items()}, None)
    results.append((state.params["policy"], metrics))
  for key in ("train/loss", "train/ptx_loss", "train/target_tokens", "train/grad_norm"):
    np.testing.assert_allclose(results[1][1][key], results[0][1][key], rtol=2e-6, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), results[1][0], results[0][0])


def test_packed_pretrain_and_sft_stages_log_the_unpacked_losses(tmp_path):
  """The command line's pretrain and sft stages, with ``data.pack_width`` and without: the same sequences
  each step, so the same losses and target counts, for fewer FLOPs on the pretraining text."""
  import json
  import pathlib
  import subprocess
  import sys
  root = pathlib.Path(__file__).resolve().parents[1]
  runs = {}
  for width in (0, 96):
    workdir = tmp_path / f"w{width}"
    cmd = [sys.executable, "-m", "rlhf_jax", f"--config={root}/configs/quickstart.py", f"--workdir={workdir}",
           "--config.stages=tokenizer,pretrain,sft", "--config.pretrain.steps=8", "--config.pretrain.batch_size=16",
           "--config.pretrain.log_every=2", "--config.sft.steps=4", "--config.sft.batch_size=16",
           "--config.sft.log_every=2", "--config.sft.ptx_coef=0.1", "--config.evaluation.num_prompts=8",
           "--config.evaluation.lm_loss_batches=1", f"--config.data.pack_width={width}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=root)
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    runs[width] = [r for r in rows if "train/loss" in r]
  assert [(r["stage"], r["step"]) for r in runs[96]] == [(r["stage"], r["step"]) for r in runs[0]]
  assert len(runs[0]) == 6
  for plain, packed in zip(runs[0], runs[96]):
    for key in ("train/loss", "train/ptx_loss", "train/target_tokens"):
      if key in plain:
        assert packed[key] == pytest.approx(plain[key], rel=1e-4), (plain["stage"], plain["step"], key)
  last = {w: [r for r in runs[w] if r["stage"] == "pretrain"][-1] for w in runs}
  assert last[96]["compute/flops"] < 0.8 * last[0]["compute/flops"]
  assert last[0]["data/fill"] < 0.75 < last[96]["data/fill"] <= 1.0
