"""The "instruct" task: write a short review with a given subject, sentiment and length.

Prompts look like ``write a positive review of the cafe in 8 words.`` (three
phrasings; 48 subjects, 2 sentiments, lengths 5-14). Responses are in the
review language of ``review_language``: a few hundred lower-case words and
a clause grammar.

Gold score: a weighted sum of five terms, in [-0.35, 1] (1 is optimal)::

  0.15 subject     1 if the asked subject is named, 0 if not; -0.5 (floor 0)
                   if any other subject is named.
  0.35 sentiment   (min(p, 2) - min(n, 2)) / 2 with p, n the counts of
                   sentiment words (adjectives and verbs) of the asked and the
                   opposite polarity, minus 0.25 per sentiment word beyond 3
                   ("gushing"), clipped to [-1, 1].
  0.20 fluency     fraction of category bigrams, with start and end, that the
                   grammar allows.
  0.20 length      1 - |words - asked| / 4, floor 0; punctuation is not a word.
  0.10 repetition  1 - 0.5 per repeated content word, floor 0; 0 when there are
                   no content words.

The length target and the gushing penalty are the terms a small reward model
learns poorly from rankings: the first needs counting, and the second is
rare in the samples it is trained on, where more sentiment words
usually means better. A policy that over-optimises such a proxy piles up
adjectives, which raises the proxy while length, gushing and repetition
lower the gold score.

The demonstrator writes grammatical reviews but, with probability
``(1 - demo_quality) * rate``, makes each of these mistakes: a length off by
1-2 words (rate 0.8), a clause of the opposite sentiment (0.5), too few
sentiment words (0.4), gushing (0.2), a missing or wrong subject (0.3), a
repeated content word (0.3) and a dropped word (0.2).

Pretraining documents are one or two reviews of random subject, length and
mostly-consistent sentiment, or (one in seven) a bare prompt line: the
language without the instruction mapping.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from rlhf_jax.tasks import base, seeding
from rlhf_jax.tasks import review_language as lang
from rlhf_jax.tasks.seeding import pick

LENGTHS = tuple(range(5, 15))
POLARITIES = ("positive", "negative")
PROMPT_TEMPLATES = (
    "write a {polarity} review of the {subject} in {length} words.",
    "describe the {subject} in {length} words, in a {polarity} tone.",
    "give a {polarity} review of the {subject} using {length} words.",
)
_SUBJECT_SET = frozenset(lang.SUBJECTS)
WEIGHTS = {"subject": 0.15, "sentiment": 0.35, "fluency": 0.2, "length": 0.2,
           "repetition": 0.1}
MAX_SENTIMENT_WORDS = 3  # beyond this, sentiment words read as gushing
# A prompt's (subject, polarity, length) goes to test when its rank in a
# seeded shuffle is below 1/8 of all of them; all phrasings follow it.
TEST_SPEC_FRACTION = 8

_POLARITY_RE = re.compile(r"\b(positive|negative)\b")
_SUBJECT_RE = re.compile(r"\bthe ([a-z]+)\b")
_LENGTH_RE = re.compile(r"\b(\d+) words\b")


@dataclasses.dataclass(frozen=True)
class PromptSpec:
  """What a prompt asks for."""

  subject: str
  polarity: str
  length: int


def parse_prompt(prompt: str) -> PromptSpec:
  """The subject, polarity and length a prompt asks for."""
  polarity = _POLARITY_RE.search(prompt)
  subject = _SUBJECT_RE.search(prompt)
  length = _LENGTH_RE.search(prompt)
  if not (polarity and subject and length and subject.group(1) in _SUBJECT_SET):
    raise ValueError(f"not an instruct prompt: {prompt!r}")
  return PromptSpec(subject.group(1), polarity.group(1), int(length.group(1)))


def score_terms(prompt: str, response: str) -> dict[str, float]:
  """Each gold term of ``response`` (see module docstring), before weighting."""
  spec = parse_prompt(prompt)
  tokens = lang.tokenize(response)
  words = [t for t in tokens if t[0].isalnum()]

  others = any(w in _SUBJECT_SET and w != spec.subject for w in words)
  subject = max(0.0, float(spec.subject in words) - 0.5 * others)

  p = sum(w in lang.POLARITY_WORDS[spec.polarity] for w in words)
  n = sum(w in lang.POLARITY_WORDS[lang.OPPOSITE[spec.polarity]] for w in words)
  gushing = 0.25 * max(0, p + n - MAX_SENTIMENT_WORDS)
  sentiment = float(np.clip((min(p, 2) - min(n, 2)) / 2 - gushing, -1.0, 1.0))

  length = max(0.0, 1.0 - abs(len(words) - spec.length) / 4)

  content = [w for w in words if lang.is_content(w)]
  repeats = len(content) - len(set(content))
  repetition = max(0.0, 1.0 - 0.5 * repeats) if content else 0.0

  return {"subject": subject, "sentiment": sentiment, "fluency": lang.fluency(tokens),
          "length": length, "repetition": repetition}


@dataclasses.dataclass(frozen=True)
class InstructOptions(base.TaskOptions):
  """Options of the instruct task: those of ``TaskOptions``."""

  # Gives ~80% pairwise agreement with gold on groups of demonstrator
  # responses, near the 73-77% agreement between InstructGPT's labelers.
  labeler_temperature: float = 0.12


class InstructTask(base.Task):
  """Open-ended reviews scored by a hidden multi-term gold reward."""

  name = "instruct"
  Options = InstructOptions

  def __init__(self, seed: int = 0, options: InstructOptions | None = None):
    super().__init__(seed, options)
    capacity = self._pool_sizes()
    for split, want in (("train", self.opts.num_train_prompts),
                        ("test", self.opts.num_test_prompts)):
      if want > capacity[split]:
        raise ValueError(f"option num_{split}_prompts={want} exceeds the "
                         f"{capacity[split]} distinct {split} prompts of this task")

  def gold_score(self, prompt: str, response: str) -> float:
    """Weighted sum of ``score_terms``; in [-0.35, 1]."""
    terms = score_terms(prompt, response)
    return float(sum(WEIGHTS[k] * v for k, v in terms.items()))

  def score_terms(self, prompt: str, response: str) -> dict[str, float]:
    """The unweighted gold terms, for diagnosing what a policy learned."""
    return score_terms(prompt, response)

  # -- data ------------------------------------------------------------------

  def _make_prompts(self, split: str, count: int) -> list[str]:
    specs = [(s, p, n) for s in lang.SUBJECTS for p in POLARITIES for n in LENGTHS]
    order = seeding.stream(self.seed, "instruct/prompt-split").permutation(len(specs))
    n_test = len(specs) // TEST_SPEC_FRACTION
    chosen = order[:n_test] if split == "test" else order[n_test:]
    prompts = [t.format(subject=specs[i][0], polarity=specs[i][1], length=specs[i][2])
               for i in chosen for t in PROMPT_TEMPLATES]
    rng = seeding.stream(self.seed, f"instruct/prompt-order/{split}")
    return [prompts[i] for i in rng.permutation(len(prompts))[:count]]

  def _pool_sizes(self) -> dict[str, int]:
    n_specs = len(lang.SUBJECTS) * len(POLARITIES) * len(LENGTHS)
    n_test = n_specs // TEST_SPEC_FRACTION
    return {"test": n_test * len(PROMPT_TEMPLATES),
            "train": (n_specs - n_test) * len(PROMPT_TEMPLATES)}

  def _make_pretraining_doc(self, rng: np.random.Generator) -> str:
    if rng.random() < 1 / 7:
      return pick(rng, PROMPT_TEMPLATES).format(
          subject=pick(rng, lang.SUBJECTS), polarity=pick(rng, POLARITIES),
          length=pick(rng, LENGTHS))
    reviews = []
    for _ in range(1 + int(rng.random() < 0.3)):
      polarity = pick(rng, POLARITIES)
      clauses = lang.plan(rng, int(rng.integers(3, 17)), 0, 4,
                          with_subject=rng.random() < 0.8)
      polarities = [polarity if rng.random() < 0.8 else lang.OPPOSITE[polarity]
                    for _ in clauses]
      reviews.append(lang.render(lang.fill(rng, clauses, polarities,
                                           pick(rng, lang.SUBJECTS))))
    return " ".join(reviews)

  def _optimal(self, prompt: str, rng: np.random.Generator) -> str:
    spec = parse_prompt(prompt)
    clauses = lang.plan(rng, spec.length, 2, MAX_SENTIMENT_WORDS)
    return lang.render(lang.fill(rng, clauses, [spec.polarity] * len(clauses),
                                 spec.subject))

  def _demonstrate(self, prompt: str, rng: np.random.Generator) -> str:
    spec = parse_prompt(prompt)
    slip = 1.0 - self.opts.demo_quality

    def mistake(rate: float) -> bool:
      # Always draw, so one mistake's outcome does not shift the others.
      return bool(rng.random() < slip * rate)

    wrong_length, opposite, weak, gush, no_subject, repeat, drop = (
        mistake(r) for r in (0.8, 0.5, 0.4, 0.2, 0.3, 0.3, 0.2))
    length = spec.length + (pick(rng, (-2, -1, 1, 2)) if wrong_length else 0)
    lo, hi = (0, 1) if weak else (4, 5) if gush else (2, MAX_SENTIMENT_WORDS)
    subject = spec.subject
    with_subject = True
    if no_subject:
      if rng.random() < 0.5:
        with_subject = False
      else:
        subject = pick(rng, [s for s in lang.SUBJECTS if s != spec.subject])

    clauses = lang.plan(rng, length, lo, hi, with_subject=with_subject)
    polarities = [spec.polarity] * len(clauses)
    if opposite:
      flip = [i for i, (_, c) in enumerate(clauses) if c.n_sentiment and i > 0]
      flip = flip or [i for i, (_, c) in enumerate(clauses) if c.n_sentiment]
      if flip:
        polarities[pick(rng, flip)] = lang.OPPOSITE[spec.polarity]
    tokens = lang.fill(rng, clauses, polarities, subject)
    if repeat:
      _repeat_a_word(rng, tokens)
    if drop:
      words = [i for i, t in enumerate(tokens) if t[0].isalnum()]
      del tokens[pick(rng, words)]
    return lang.render(tokens)


def _repeat_a_word(rng: np.random.Generator, tokens: list[str]) -> None:
  """Overwrites a later content word with an earlier one of its category."""
  pairs = [(i, j) for j, t in enumerate(tokens) if lang.is_content(t)
           for i in range(j) if lang.category(tokens[i]) == lang.category(t)
           and tokens[i] != t]
  if pairs:
    i, j = pick(rng, pairs)
    tokens[j] = tokens[i]
