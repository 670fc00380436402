"""DPO / IPO: losses against numpy on hand-made rankings (padded K, ties, all-equal log-ratios), the step on a
tiny decoder, and online DPO and offline DPO with precomputed reference log-probs resuming after kill -9 with
identical metrics."""

import itertools
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax import losses, state as state_lib
from rlhf_jax.algorithms import dpo
from rlhf_jax.generate import SamplingConfig
from rlhf_jax.models import Decoder, DecoderConfig
from rlhf_jax.rl import dpo as dpo_math

ROOT = pathlib.Path(__file__).resolve().parents[1]


# --- maths against numpy ---------------------------------------------------------------------------------


def log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def numpy_preference_loss(h, ranks, valid, beta, loss="dpo", eps=0.0):
  """Loops over prompts and ordered pairs: each prompt's mean pair loss, then the mean over prompts."""
  per_prompt, acc, chosen, rejected, margins = [], [], [], [], []
  for b in range(h.shape[0]):
    real = [i for i in range(h.shape[1]) if valid[b, i]]
    pairs = [(w, l) for w, l in itertools.permutations(real, 2) if ranks[b, w] < ranks[b, l]]
    if not pairs:
      continue
    terms = []
    for w, l in pairs:
      d = h[b, w] - h[b, l]
      if loss == "dpo":
        terms.append(-(1 - eps) * log_sigmoid(beta * d) - eps * log_sigmoid(-beta * d))
      else:
        terms.append((d - 1 / (2 * beta)) ** 2)
    per_prompt.append(np.mean(terms))
    acc.append(np.mean([1.0 if h[b, w] > h[b, l] else 0.5 if h[b, w] == h[b, l] else 0.0 for w, l in pairs]))
    chosen.append(np.mean([beta * h[b, w] for w, _ in pairs]))
    rejected.append(np.mean([beta * h[b, l] for _, l in pairs]))
    margins.append(np.mean([beta * (h[b, w] - h[b, l]) for w, l in pairs]))
  if not per_prompt:
    return 0.0, {"accuracy": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0, "margin": 0.0, "num_prompts": 0}
  return np.mean(per_prompt), {"accuracy": np.mean(acc), "chosen_reward": np.mean(chosen),
                               "rejected_reward": np.mean(rejected), "margin": np.mean(margins),
                               "num_prompts": len(per_prompt)}


# Four prompts, K = 4 slots: k = 4, k = 3 (one padded slot), k = 2 with a tie in rank, k = 1 (no pair).
H = np.array([[1.5, -0.5, 0.25, 2.0], [0.3, 0.9, -1.2, 7.0], [0.4, 0.4, -0.1, 5.0], [9.0, 0.0, 0.0, 0.0]])
RANKS = np.array([[0, 2, 1, 3], [2, 0, 1, 4], [0, 0, 1, 4], [0, 4, 4, 4]])
VALID = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0], [1, 0, 0, 0]])


@pytest.mark.parametrize("loss, beta, eps", [("dpo", 0.1, 0.0), ("dpo", 0.5, 0.2), ("ipo", 0.1, 0.0),
                                             ("ipo", 2.0, 0.0)])
def test_k_wise_loss_matches_numpy_with_padded_k_and_ties(loss, beta, eps):
  got, aux = dpo_math.preference_loss(jnp.asarray(H), jnp.asarray(RANKS), jnp.asarray(VALID), beta, loss, eps)
  want, want_aux = numpy_preference_loss(H, RANKS, VALID, beta, loss, eps)
  assert float(got) == pytest.approx(want, rel=1e-5)
  for name, value in want_aux.items():
    assert float(aux[name]) == pytest.approx(value, rel=1e-5, abs=1e-6), name
  # Pairs: C(4,2) = 6, C(3,2) = 3, the tie leaves 2 of C(3,2), none for k = 1.
  assert float(aux["num_pairs"]) == 11 and float(aux["num_prompts"]) == 3


def test_each_pair_of_a_prompt_weighs_one_over_c_k_2():
  weight, pairs = dpo_math.pair_weights(jnp.asarray(RANKS), jnp.asarray(VALID))
  np.testing.assert_allclose(np.asarray(pairs), [6, 3, 2, 0])
  np.testing.assert_allclose(np.asarray(weight).sum(axis=(1, 2)), [1, 1, 1, 0], atol=1e-6)
  assert float(weight[0, 0, 1]) == pytest.approx(1 / 6) and float(weight[0, 1, 0]) == 0.0
  assert float(weight[1, :, 3].sum()) == 0.0 and float(weight[2, 0, 1] + weight[2, 1, 0]) == 0.0  # pad, tie


def test_k_2_is_the_pairwise_dpo_loss_and_the_rm_ranking_loss():
  h = np.array([[0.7, -0.2], [-1.0, 0.5], [0.0, 3.0]])
  ranks = np.array([[0, 1], [1, 0], [0, 1]])
  valid = np.ones((3, 2))
  beta = 0.3
  got, aux = dpo_math.preference_loss(jnp.asarray(h), jnp.asarray(ranks), jnp.asarray(valid), beta)
  d = np.array([0.7 - -0.2, 0.5 - -1.0, 0.0 - 3.0])
  assert float(got) == pytest.approx(np.mean(-log_sigmoid(beta * d)), rel=1e-6)
  assert float(aux["accuracy"]) == pytest.approx(2 / 3)
  # DPO is the reward model's ranking loss on the implicit reward beta * h.
  rm_loss, _ = losses.ranking_loss(jnp.asarray(beta * h), jnp.asarray(ranks), jnp.asarray(valid))
  assert float(got) == pytest.approx(float(rm_loss), rel=1e-6)


@pytest.mark.parametrize("loss, beta, want", [("dpo", 0.1, np.log(2.0)), ("ipo", 0.1, 25.0), ("ipo", 0.5, 1.0)])
def test_all_equal_log_ratios(loss, beta, want):
  # The policy equals the reference at the first step: every margin is 0.
  h = jnp.full((2, 3), 0.37)
  ranks = jnp.array([[0, 1, 2], [2, 1, 0]])
  got, aux = dpo_math.preference_loss(h, ranks, jnp.ones((2, 3)), beta, loss)
  assert float(got) == pytest.approx(want, rel=1e-6)
  assert float(aux["accuracy"]) == 0.5 and float(aux["margin"]) == 0.0  # equal rewards: a coin flip
  assert float(aux["chosen_reward"]) == pytest.approx(beta * 0.37) == float(aux["rejected_reward"])


def test_no_pair_anywhere_gives_zero_loss_and_zero_gradient():
  h = jnp.asarray(H)
  f = lambda x: dpo_math.preference_loss(x, jnp.zeros((4, 4), jnp.int32), jnp.asarray(VALID), 0.1)[0]  # noqa: E731
  assert float(f(h)) == 0.0 and float(jnp.abs(jax.grad(f)(h)).sum()) == 0.0


def test_gradient_matches_numpy_finite_differences():
  f = lambda x: dpo_math.preference_loss(x, jnp.asarray(RANKS), jnp.asarray(VALID), 0.5, "dpo", 0.1)[0]  # noqa: E731
  grad = np.asarray(jax.grad(f)(jnp.asarray(H, jnp.float32)))
  step = 1e-3
  for b, i in itertools.product(range(4), range(4)):
    e = np.zeros_like(H)
    e[b, i] = step
    numeric = (numpy_preference_loss(H + e, RANKS, VALID, 0.5, "dpo", 0.1)[0]
               - numpy_preference_loss(H - e, RANKS, VALID, 0.5, "dpo", 0.1)[0]) / (2 * step)
    assert grad[b, i] == pytest.approx(numeric, abs=1e-4), (b, i)
  assert np.all(grad[:, 3][1:] == 0) and np.all(grad[3] == 0)  # padded slots and the one-response prompt


def test_sequence_log_ratio_sum_and_per_token_mean():
  lp = np.array([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
  ref = np.array([[-1.5, -1.0, -3.0], [-1.0, -0.25, 0.0]])
  mask = np.array([[1, 1, 0], [1, 1, 1]])
  np.testing.assert_allclose(dpo_math.sequence_log_ratio(lp, ref, mask), [0.5 - 1.0, 0.5 - 0.25 - 9.0])
  np.testing.assert_allclose(dpo_math.sequence_log_ratio(lp, ref, mask, average=True), [-0.25, -8.75 / 3])
  assert float(dpo_math.sequence_log_ratio(lp, ref, np.zeros_like(mask), average=True)[0]) == 0.0


def test_ranks_from_scores_tie_equal_scores_and_from_rankings():
  scores = np.array([[0.2, 0.9, 0.2, -1.0], [1.0, 2.0, 3.0, 99.0]])
  valid = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])
  np.testing.assert_array_equal(dpo_math.ranks_from_scores(scores, valid), [[1, 0, 1, 3], [2, 1, 0, 0]])
  np.testing.assert_array_equal(dpo.ranks_from_ranking([2, 0, 1]), [1, 2, 0])


def test_settings_are_checked():
  assert dpo.DPOSettings.from_mapping(dpo.dpo_config()) == dpo.DPOSettings()
  for bad, message in [(dict(loss="kto"), "dpo.loss"), (dict(beta=0.0), "beta"),
                       (dict(loss="ipo", label_smoothing=0.1), "label_smoothing")]:
    with pytest.raises(ValueError, match=message):
      dpo.DPOSettings(**bad)


# --- the step on a tiny decoder ----------------------------------------------------------------------------

MODEL = DecoderConfig(vocab_size=16, num_layers=1, d_model=32, num_heads=4, d_ff=64, max_len=32)
SAMPLING = SamplingConfig(max_new_tokens=4, eos_id=3)
P = 3


def comparison_batch():
  """Two prompts, K = 3 slots (the second prompt has 2 responses), prompts left-padded, responses right-padded."""
  prompt = np.array([[0, 2, 9], [2, 5, 6]])
  prompt_mask = np.array([[0, 1, 1], [1, 1, 1]])
  response = np.array([[[7, 8, 3, 0], [7, 3, 0, 0], [11, 12, 13, 3]], [[4, 4, 3, 0], [9, 3, 0, 0], [4, 4, 3, 0]]])
  response_mask = (response > 0).astype(np.int32)
  tokens = np.concatenate([np.repeat(prompt[:, None], 3, 1), response], axis=-1)
  mask = np.concatenate([np.repeat(prompt_mask[:, None], 3, 1), response_mask], axis=-1)
  return {"tokens": tokens.astype(np.int32), "mask": mask.astype(np.int32),
          "response_mask": np.array([[1, 1, 1], [1, 1, 0]], np.int32), "ranks": np.array([[2, 0, 1], [0, 1, 3]])}


def test_log_ratios_are_the_response_tokens_of_one_forward_pass():
  graphdef, params = nnx.split(Decoder(MODEL, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(params)
  ref = nnx.to_pure_dict(nnx.split(Decoder(MODEL, rngs=nnx.Rngs(1)))[1])
  batch = comparison_batch()
  got = np.asarray(dpo.log_ratios(graphdef, params, ref, batch, P, SAMPLING, average=False))

  def token_lp(p):
    tokens, mask = batch["tokens"].reshape(6, -1), batch["mask"].reshape(6, -1)
    logits, _ = nnx.merge(graphdef, p)(jnp.asarray(tokens), jnp.asarray(mask))
    lp = np.asarray(losses.token_log_probs(logits, jnp.asarray(tokens)))
    return (lp * mask * (np.arange(tokens.shape[1]) >= P)).sum(axis=1).reshape(2, 3)

  np.testing.assert_allclose(got, token_lp(params) - token_lp(ref), rtol=1e-5, atol=1e-5)


def test_dpo_step_starts_at_log_2_and_learns_the_ranking():
  graphdef, params = nnx.split(Decoder(MODEL, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(params)
  reference = jax.tree.map(jnp.copy, params)
  tx = optax.adam(3e-3)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params={"policy": params},
                               opt_state={"policy": tx.init(params)}, rng=state_lib.seed_key_data(0), scalars={})
  step = jax.jit(dpo.make_dpo_step(graphdef, tx, dpo.DPOSettings(beta=0.5), P, SAMPLING))
  batch = jax.tree.map(jnp.asarray, comparison_batch())
  state, first = step(state, batch, {"reference": reference})
  assert float(first["train/loss"]) == pytest.approx(np.log(2.0), rel=1e-5)  # policy == reference
  assert float(first["train/num_pairs"]) == 4 and float(first["train/accuracy"]) == 0.5
  for _ in range(30):
    state, metrics = step(state, batch, {"reference": reference})
  assert float(metrics["train/loss"]) < 0.5 * np.log(2.0) and float(metrics["train/accuracy"]) == 1.0
  assert float(metrics["train/chosen_reward"]) > float(metrics["train/rejected_reward"])


@pytest.mark.parametrize("average", [False, True])
def test_precomputed_reference_log_probs_give_the_same_step(average):
  """A batch carrying the reference's sequence log-probs (``precompute_reference``) takes the same step as
  one whose reference pass runs inside the step, and needs no reference params."""
  graphdef, params = nnx.split(Decoder(MODEL, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(params)
  reference = nnx.to_pure_dict(nnx.split(Decoder(MODEL, rngs=nnx.Rngs(1)))[1])
  batch = jax.tree.map(jnp.asarray, comparison_batch())
  table = dpo.make_reference_fn(graphdef, P, SAMPLING, average)(reference, batch)
  assert table.shape == (2, 3)
  # The table is the reference's side of the log-ratio: policy == reference gives h = 0 for every response.
  h = dpo.log_ratios(graphdef, reference, None, {**batch, dpo.REFERENCE_KEY: table}, P, SAMPLING, average)
  np.testing.assert_allclose(np.asarray(h), 0.0, atol=1e-5)
  tx = optax.sgd(0.5)  # Adam would scale rounding in near-zero gradients up to whole steps
  step = jax.jit(dpo.make_dpo_step(graphdef, tx, dpo.DPOSettings(beta=0.5, average_log_probs=average), P, SAMPLING))

  def run(batch, frozen):
    state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params={"policy": jax.tree.map(jnp.copy, params)},
                                 opt_state={"policy": tx.init(params)}, rng=state_lib.seed_key_data(0), scalars={})
    for _ in range(3):
      state, metrics = step(state, batch, frozen)
    return state, metrics

  inside, m_inside = run(batch, {"reference": reference})
  pre, m_pre = run({**batch, dpo.REFERENCE_KEY: table}, {"reference": None})
  assert set(m_pre) == set(m_inside)
  for k in m_inside:
    np.testing.assert_allclose(float(m_pre[k]), float(m_inside[k]), rtol=2e-5, atol=2e-6, err_msg=k)
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for a, b in zip(jax.tree.leaves(pre.params["policy"]), jax.tree.leaves(params)))
  assert moved > 1e-3
  for a, b in zip(jax.tree.leaves(pre.params), jax.tree.leaves(inside.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_precomputed_reference_step_counts_drop_the_reference_pass():
  full = dpo.step_counts(MODEL, 12, 16, P, 3)
  policy = dpo.step_counts(MODEL, 12, 16, P, 3, reference=False)
  reference = dpo.reference_counts(MODEL, 12, 16, P, 3)
  assert policy.grad_steps == full.grad_steps == 1 and reference.grad_steps == 0
  assert policy.flops + reference.flops == pytest.approx(full.flops)
  assert reference.flops == pytest.approx(full.flops / 4, rel=0.05)  # a forward of forward + backward + forward


def test_online_dpo_refuses_a_precomputed_reference():
  from types import SimpleNamespace

  from rlhf_jax.stages import dpo as dpo_stage
  from rlhf_jax.stages.context import StageError

  section = dpo.dpo_config()
  section.update(dict(online=True, ranker="labeler", precompute_reference=True))
  with pytest.raises(StageError, match="dpo_online.precompute_reference applies to offline DPO"):
    dpo_stage.check(None, SimpleNamespace(name="dpo_online", section=section))


def test_online_batch_groups_k_consecutive_rows():
  prompt = np.arange(12).reshape(4, 3)
  response = 100 + np.arange(8).reshape(4, 2)
  batch = dpo.online_batch(prompt, prompt > 0, response, response > 0, np.array([[1, 0], [0, 0]]))
  assert batch["tokens"].shape == (2, 2, 5) and batch["tokens"][1, 0].tolist() == [6, 7, 8, 104, 105]
  assert batch["mask"][0, 0].tolist() == [0, 1, 1, 1, 1] and batch["response_mask"].tolist() == [[1, 1], [1, 1]]


# --- online DPO through the command line: kill -9, resume, identical metrics -------------------------------

# SFT from a fresh init (no pretrain stage): the test is about resuming, not about a good policy.
TINY = [f"--config={ROOT}/configs/dpo.py", "--config.sft.init_from=", "--config.sft.steps=4",
        "--config.sft.batch_size=16", "--config.evaluation.num_prompts=8", "--config.evaluation.lm_loss_batches=1"]
# K-wise online DPO (3 samples per prompt) ranked by the labelers, so no label or reward stage has to run.
ONLINE = ["--config.stages=dpo_online", "--config.dpo_online.steps=9", "--config.dpo_online.batch_size=4",
          "--config.dpo_online.samples_per_prompt=3", "--config.dpo_online.ranker=labeler",
          "--config.dpo_online.reward=", "--config.dpo_online.checkpoint_every=3", "--config.dpo_online.log_every=1",
          "--config.dpo_online.eval_every=0", "--config.dpo_online.optimizer.lr=1e-3"]


def cli(workdir, *args):
  proc = subprocess.run([sys.executable, "-m", "rlhf_jax", f"--workdir={workdir}", *TINY, *args],
                        capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return proc


# Offline DPO on 12 comparisons (K = 3) of a label stage, the reference's log-probs precomputed: 9 steps of
# 4 prompts are 3 epochs, and a resumed run computes the table again.
LABEL = ["--config.label.num_prompts=15", "--config.label.k=3", "--config.reward.eval_comparisons=3"]
OFFLINE = [*LABEL, "--config.stages=dpo", "--config.dpo.steps=9", "--config.dpo.batch_size=4", "--config.dpo.reward=",
           "--config.dpo.precompute_reference=True", "--config.dpo.checkpoint_every=3", "--config.dpo.log_every=1",
           "--config.dpo.eval_every=0", "--config.dpo.optimizer.lr=1e-3"]


@pytest.mark.parametrize("mode", ["online", "offline_precomputed"])
def test_dpo_kill_9_then_resume_matches_uninterrupted_run(tmp_path, mode):
  from test_pipeline import kill_when_checkpointed, rows  # the kill -9 helpers of the pipeline tests

  name, args = ("dpo_online", ONLINE) if mode == "online" else ("dpo", OFFLINE)
  prepared = tmp_path / "prepared"
  first = ["--config.stages=tokenizer,sft"] if mode == "online" else [*LABEL, "--config.stages=tokenizer,sft,label"]
  cli(prepared, *first)
  whole, killed = tmp_path / "whole", tmp_path / "killed"
  shutil.copytree(prepared, whole)
  shutil.copytree(prepared, killed)
  cli(whole, *args)
  kill_when_checkpointed(killed, name, 3, args, base=TINY)
  cli(killed, *args)
  a, b = rows(whole, name), rows(killed, name)
  assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 10)) + [9]
  for ra, rb in zip(a, b):
    assert set(ra) == set(rb)
    for k in set(ra) - {"stage"}:
      assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (ra["step"], k)
  last = a[-2]
  assert last["compute/grad_steps"] == 9 and last["compute/flops"] > 0
  if mode == "online":
    assert last["compute/samples"] == 9 * 4 * 3 and last["train/num_pairs"] <= 4 * 3
  else:  # every prompt's 3 responses ranked: 3 pairs each; the table counted once, not again on the resume
    assert last["train/num_pairs"] == 4 * 3
    per_step = a[1]["compute/flops"] - a[0]["compute/flops"]
    assert a[0]["compute/flops"] > per_step and last["compute/flops"] == pytest.approx(
        a[0]["compute/flops"] + 8 * per_step, rel=0.2)  # later steps differ only by their bucketed widths
  sa = json.loads((whole / "summary.json").read_text())[name]
  sb = json.loads((killed / "summary.json").read_text())[name]
  untimed = lambda d: {k: v for k, v in d.items() if not k.startswith("time/")}  # noqa: E731
  assert untimed(sa) == pytest.approx(untimed(sb), rel=1e-5)
  assert {"eval/gold_reward", "eval/kl", "eval/win_rate_vs_sft"} <= set(sa)
  if mode == "online":
    assert "compute/tokens_generated" in sa
  else:
    assert "eval/preference_accuracy" in sa
