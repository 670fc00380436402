"""Built-in tasks: determinism, splits, gold terms and simulated labelers."""

import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from rlhf_jax import tasks
from rlhf_jax.tasks import instruct, labeler
from rlhf_jax.tasks import review_language as lang

SMALL = dict(num_train_prompts=64, num_test_prompts=16, num_pretraining_docs=64,
             num_demonstrations=64)
NAMES = tasks.names()


def _digest(task) -> str:
  data = {s: [task.prompts(s), task.pretraining_text(s), task.demonstrations(s)]
          for s in tasks.SPLITS}
  return hashlib.sha256(json.dumps(data).encode()).hexdigest()


def _groups(task, n_prompts, k=4):
  """K demonstrator responses per train prompt: stand-ins for SFT samples."""
  return [(p, [task.demonstrate(p, seed=j) for j in range(k)])
          for p in task.prompts("train")[:n_prompts]]


# -- registry and options -------------------------------------------------------


def test_names_default_first():
  assert NAMES[:2] == ["instruct", "arithmetic"]


def test_unknown_task_names_it_and_lists_known():
  with pytest.raises(ValueError, match=r"'nope'.*instruct, arithmetic"):
    tasks.get("nope")


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_is_named(name):
  with pytest.raises(TypeError, match="bogus_option"):
    tasks.get(name, bogus_option=3)


@pytest.mark.parametrize("option, value", [
    ("demo_quality", 1.5), ("labeler_temperature", -0.1), ("num_train_prompts", 0)])
def test_bad_option_value_is_named(option, value):
  with pytest.raises(ValueError, match=option):
    tasks.get("instruct", **{option: value})


def test_too_many_prompts_is_explained():
  with pytest.raises(ValueError, match="num_test_prompts"):
    tasks.get("instruct", num_test_prompts=10_000)
  with pytest.raises(ValueError, match="max_digits"):
    tasks.get("arithmetic", max_digits=1)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_split_raises(name):
  task = tasks.get(name, **SMALL)
  for method in (task.prompts, task.pretraining_text, task.demonstrations):
    with pytest.raises(ValueError, match="'validation'"):
      method("validation")


def test_options_are_reported():
  task = tasks.get("arithmetic", max_digits=4)
  assert task.options["max_digits"] == 4
  assert task.options["labeler_temperature"] == 0.4


# -- determinism and splits -----------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_bytes_different_seed_differs(name):
  a, b, c = (tasks.get(name, seed=s, **SMALL) for s in (3, 3, 4))
  assert _digest(a) == _digest(b)
  assert _digest(a) != _digest(c)
  prompt = a.prompts("test")[0]
  assert a.rank(prompt, ["x", "y", "z"], seed=1) == b.rank(prompt, ["x", "y", "z"], seed=1)


def test_same_bytes_in_a_fresh_process():
  # Python's str hash is salted per process; data must not depend on it.
  script = ("import hashlib, json; from rlhf_jax import tasks;"
            f"t = tasks.get('instruct', seed=5, **{SMALL!r});"
            "print(hashlib.sha256(json.dumps({s: [t.prompts(s), t.pretraining_text(s),"
            " t.demonstrations(s)] for s in tasks.SPLITS}).encode()).hexdigest())")
  env = dict(os.environ, PYTHONHASHSEED="12345")
  out = subprocess.run([sys.executable, "-c", script], env=env, check=True,
                       capture_output=True, text=True).stdout.strip()
  assert out == _digest(tasks.get("instruct", seed=5, **SMALL))


@pytest.mark.parametrize("name", NAMES)
def test_prompt_splits_disjoint_distinct_and_sized(name):
  task = tasks.get(name)
  train, test = task.prompts("train"), task.prompts("test")
  assert len(train) == task.options["num_train_prompts"]
  assert len(test) == task.options["num_test_prompts"]
  assert len(set(train)) == len(train) and len(set(test)) == len(test)
  assert not set(train) & set(test)
  assert len(task.pretraining_text("test")) == task.options["num_pretraining_docs"] // 8
  demos = task.demonstrations("train")
  assert len(demos) == task.options["num_demonstrations"]
  assert all(set(d) == {"prompt", "response"} and d["prompt"] in train for d in demos)


def test_instruct_test_prompts_ask_for_unseen_combinations():
  task = tasks.get("instruct")
  train = {instruct.parse_prompt(p) for p in task.prompts("train")}
  assert not train & {instruct.parse_prompt(p) for p in task.prompts("test")}


def test_returned_lists_are_copies():
  task = tasks.get("instruct", **SMALL)
  task.prompts("train").clear()
  task.demonstrations("train")[0]["response"] = "changed"
  assert len(task.prompts("train")) == SMALL["num_train_prompts"]
  assert task.demonstrations("train")[0]["response"] != "changed"


def test_default_instruct_data_is_fast():
  task = tasks.get("instruct")
  start = time.perf_counter()
  for split in tasks.SPLITS:
    task.prompts(split), task.pretraining_text(split), task.demonstrations(split)
  assert time.perf_counter() - start < 1.0


# -- the instruct language ------------------------------------------------------


def test_instruct_text_is_short_lowercase_ascii():
  task = tasks.get("instruct")
  allowed = set("abcdefghijklmnopqrstuvwxyz0123456789 .,!")
  texts = task.prompts("train") + task.prompts("test") + task.pretraining_text("train")
  demos = task.demonstrations("train")
  assert all(set(t) <= allowed for t in texts + [d["response"] for d in demos])
  assert max(len(p.split()) for p in task.prompts("train")) <= 16
  assert max(len(d["response"].split()) for d in demos) <= 20
  words = {w for t in texts for w in lang.tokenize(t) if w[0].isalpha()}
  assert 250 <= len(words) <= 600  # a few hundred words


def test_pretraining_reviews_are_fluent_and_mixed():
  task = tasks.get("instruct")
  docs = task.pretraining_text("train")
  assert np.mean([lang.fluency(lang.tokenize(d)) for d in docs if "words" not in d]) == 1.0
  text = " ".join(docs).split()
  pos = sum(w.strip(".,!") in lang.POLARITY_WORDS["positive"] for w in text)
  neg = sum(w.strip(".,!") in lang.POLARITY_WORDS["negative"] for w in text)
  assert 0.8 < pos / neg < 1.25


def test_parse_prompt_every_phrasing():
  for template in instruct.PROMPT_TEMPLATES:
    prompt = template.format(subject="kettle", polarity="negative", length=11)
    assert instruct.parse_prompt(prompt) == instruct.PromptSpec("kettle", "negative", 11)
  with pytest.raises(ValueError, match="not an instruct prompt"):
    instruct.parse_prompt("what is 2 + 2 ?")


# -- instruct gold terms --------------------------------------------------------

PROMPT = "write a positive review of the cafe in 9 words."
GOOD = "the cafe was lovely and the staff was friendly."


def _terms(response):
  return instruct.score_terms(PROMPT, response)


def test_good_response_is_optimal():
  assert _terms(GOOD) == dict.fromkeys(instruct.WEIGHTS, 1.0)
  assert tasks.get("instruct").gold_score(PROMPT, GOOD) == pytest.approx(1.0)


@pytest.mark.parametrize("term, worse", [
    ("subject", "the bakery was lovely and the staff was friendly."),  # wrong subject
    ("subject", "the cafe was lovely and the bakery was friendly."),  # extra subject
    ("sentiment", "the cafe was awful and the staff was rude."),       # wrong polarity
    ("sentiment", "the cafe was lovely and the staff was rude."),      # mixed
    ("sentiment", "the cafe was small and the staff was tall."),       # no sentiment
    ("sentiment", "the cafe was lovely, cozy, friendly, charming and great."),  # gushing
    ("fluency", "cafe the lovely was and staff the was friendly."),    # word salad
    ("fluency", "the cafe was lovely and the staff was friendly"),     # no full stop
    ("length", "the cafe was lovely."),
    ("length", "the cafe was lovely and the staff was friendly, we visited it today."),
    ("repetition", "the cafe was lovely and the staff was lovely."),
])
def test_each_gold_term_prefers_the_good_response(term, worse):
  assert _terms(worse)[term] < _terms(GOOD)[term]
  task = tasks.get("instruct")
  assert task.gold_score(PROMPT, worse) < task.gold_score(PROMPT, GOOD)


def test_sentiment_saturates_then_penalises_gushing():
  sentiment = [_terms(r)["sentiment"] for r in (
      "the cafe was small.", "the cafe was lovely.", "the cafe was lovely and cozy.",
      "the cafe was lovely and cozy, overall charming.",
      "the cafe was lovely and cozy, overall charming, friendly staff.")]
  assert sentiment == [0.0, 0.5, 1.0, 1.0, 0.75]


def test_piling_adjectives_lowers_gold():
  # What an over-optimised policy tends to write: more positive words than
  # the optimum, which a reward model that extrapolates "more is better" likes.
  task = tasks.get("instruct")
  piled = "the cafe was lovely, cozy, great, charming and friendly, superb staff!"
  assert task.gold_score(PROMPT, piled) < task.gold_score(PROMPT, GOOD) - 0.2


@pytest.mark.parametrize("response", ["", "   ", "!!!", "THE CAFE WAS LOVELY.", "café ☕",
                                      "the " * 200])
def test_gold_score_handles_any_text(response):
  score = tasks.get("instruct").gold_score(PROMPT, response)
  assert -0.35 <= score <= 1.0


def test_gold_scores_is_vectorised_gold_score():
  task = tasks.get("instruct", **SMALL)
  demos = task.demonstrations("train")
  prompts, responses = [d["prompt"] for d in demos], [d["response"] for d in demos]
  scores = task.gold_scores(prompts, responses)
  assert scores.dtype == np.float32 and scores.shape == (len(demos),)
  np.testing.assert_allclose(scores, [task.gold_score(p, r) for p, r in zip(prompts, responses)],
                             rtol=1e-6)
  with pytest.raises(ValueError):
    task.gold_scores(prompts, responses[:-1])


# -- demonstrations versus optimal ----------------------------------------------


def test_instruct_optimal_responses_score_one():
  task = tasks.get("instruct")
  prompts = task.prompts("test")
  scores = task.gold_scores(prompts, [task.optimal_response(p) for p in prompts])
  np.testing.assert_allclose(scores, 1.0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_demonstrations_leave_room_above_them(name):
  task = tasks.get(name)
  demos = task.demonstrations("train")
  prompts = [d["prompt"] for d in demos]
  demo = task.gold_scores(prompts, [d["response"] for d in demos]).mean()
  optimal = task.gold_scores(prompts, [task.optimal_response(p) for p in prompts]).mean()
  assert 0.6 < demo < optimal - 0.15


def test_instruct_demonstrations_beat_random_reviews():
  task = tasks.get("instruct")
  demos = task.demonstrations("test")
  reviews = [d for d in task.pretraining_text("train") if "words" not in d][:len(demos)]
  prompts = [d["prompt"] for d in demos]
  demo = task.gold_scores(prompts, [d["response"] for d in demos]).mean()
  assert demo > task.gold_scores(prompts, reviews).mean() + 0.3


@pytest.mark.parametrize("name", NAMES)
def test_demo_quality_controls_demonstrations(name):
  means = []
  for quality in (0.0, 0.5, 1.0):
    task = tasks.get(name, demo_quality=quality, **SMALL)
    demos = task.demonstrations("train")
    means.append(task.gold_scores([d["prompt"] for d in demos],
                                  [d["response"] for d in demos]).mean())
  assert means[0] < means[1] < means[2] == pytest.approx(1.0, abs=1e-6)


# -- arithmetic gold terms -----------------------------------------------------


def test_arithmetic_partial_credit():
  task = tasks.get("arithmetic")
  prompt = "what is 47 + 385 ?"
  ordered = ["432", " 432\n", "the answer is 432", "431", "1432", "342", "999", "43", "no"]
  scores = [task.gold_score(prompt, r) for r in ordered]
  assert scores[0] == scores[1] == 1.0
  assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores) - 1
  assert task.score_terms(prompt, "431")["digits"] == pytest.approx(2 / 3)
  assert task.optimal_response(prompt) == "432"


def test_arithmetic_operands_respect_max_digits():
  task = tasks.get("arithmetic", max_digits=4, **SMALL)
  operands = [int(x) for p in task.prompts("train") for x in p.split() if x.isdigit()]
  assert max(operands) < 10_000 and max(operands) >= 1000


# -- simulated labelers ----------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_rank_is_a_permutation_and_exact_at_zero_temperature(name):
  noisy = tasks.get(name, **SMALL)
  exact = tasks.get(name, labeler_temperature=0.0, **SMALL)
  for prompt, responses in _groups(noisy, 16, k=6):
    ranking = noisy.rank(prompt, responses, seed=0)
    assert sorted(ranking) == list(range(len(responses)))
    gold = exact.gold_scores([prompt] * len(responses), responses)
    assert exact.rank(prompt, responses, seed=0) == list(np.argsort(-gold, kind="stable"))


def test_score_agreement_skips_reference_ties_and_halves_predicted_ties():
  gold = [np.array([3.0, 2.0, 2.0, 0.0])]  # 5 pairs with a preference (the two 2.0s are tied)
  assert labeler.score_agreement(gold, [np.array([9.0, 5.0, 4.0, 1.0])]) == 1.0
  assert labeler.score_agreement(gold, [np.array([0.0, 1.0, 1.0, 2.0])]) == 0.0
  # The prediction ties responses 0 and 1 (gold prefers 0): that pair counts half.
  assert labeler.score_agreement(gold, [np.array([5.0, 5.0, 1.0, 0.0])]) == pytest.approx(4.5 / 5)
  assert labeler.score_agreement(gold, [np.zeros(4)]) == 0.5  # a constant reward model is at chance
  assert np.isnan(labeler.score_agreement([np.ones(3)], [np.arange(3.0)]))
  # Against a ranking it is pairwise_agreement whenever the prediction has no ties.
  rng = np.random.default_rng(0)
  for _ in range(20):
    scores, ranking = rng.normal(size=5), [int(i) for i in rng.permutation(5)]
    assert labeler.score_agreement([labeler.ranking_scores(ranking)], [scores]) == pytest.approx(
        labeler.pairwise_agreement([scores], [ranking]))
  np.testing.assert_array_equal(labeler.ranking_scores([2, 0, 1]), [1.0, 0.0, 2.0])


def test_pairwise_agreement_counts_untied_pairs():
  scores = [np.array([3.0, 2.0, 1.0, 1.0])]
  assert labeler.pairwise_agreement(scores, [[0, 1, 2, 3]]) == 1.0
  assert labeler.pairwise_agreement(scores, [[3, 2, 1, 0]]) == 0.0
  assert labeler.pairwise_agreement(scores, [[1, 0, 2, 3]]) == pytest.approx(4 / 5)
  assert np.isnan(labeler.pairwise_agreement([np.ones(3)], [[0, 1, 2]]))


@pytest.mark.parametrize("name", NAMES)
def test_agreement_falls_with_temperature_and_default_is_realistic(name):
  default = tasks.get(name)
  groups = _groups(default, 256)
  agreement = [tasks.get(name, labeler_temperature=t).labeler_agreement(groups)
               for t in (0.0, 0.05, 0.2, 1.0)]
  assert agreement[0] == 1.0
  assert all(a > b for a, b in zip(agreement, agreement[1:]))
  assert 0.75 <= default.labeler_agreement(groups) <= 0.85
