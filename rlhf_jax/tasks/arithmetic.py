"""The "arithmetic" task: add two numbers, with a verifiable answer.

Prompts look like ``what is 47 + 385 ?``; each operand has 1 to
``max_digits`` digits (the digit count uniform, then the value). The answer
is the bare sum, ``432``.

Gold score, in [0, 1] (1 is the exact answer)::

  0.4 exact    1 if the first number in the response is the sum.
  0.4 digits   fraction of digit positions, aligned from the right over the
               longer of answer and sum, that are right.
  0.1 length   1 if the answer has as many digits as the sum.
  0.1 format   1 if the response is nothing but the number.

The demonstrator answers correctly with probability ``demo_quality``;
otherwise it makes one slip: a dropped carry, one digit off by one, a
dropped digit or two swapped digits (the last falls back to a wrong digit
when the digits are equal). Pretraining documents are one to three correct
equations such as ``47 + 385 = 432.``, so a pretrained model knows numbers
and sums but not the question format.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from rlhf_jax.tasks import base, seeding
from rlhf_jax.tasks.seeding import pick

WEIGHTS = {"exact": 0.4, "digits": 0.4, "length": 0.1, "format": 0.1}
_PROMPT_RE = re.compile(r"what is (\d+) \+ (\d+) \?")
_NUMBER_RE = re.compile(r"\d+")


def parse_prompt(prompt: str) -> tuple[int, int]:
  """The two operands of an arithmetic prompt."""
  m = _PROMPT_RE.fullmatch(prompt.strip())
  if m is None:
    raise ValueError(f"not an arithmetic prompt: {prompt!r}")
  return int(m.group(1)), int(m.group(2))


def score_terms(prompt: str, response: str) -> dict[str, float]:
  """Each gold term of ``response`` (see module docstring), before weighting."""
  a, b = parse_prompt(prompt)
  target = str(a + b)
  m = _NUMBER_RE.search(response)
  if m is None:
    return {"exact": 0.0, "digits": 0.0, "length": 0.0, "format": 0.0}
  answer = m.group(0)
  width = max(len(answer), len(target))
  right = sum(x == y for x, y in zip(answer.rjust(width, " "), target.rjust(width, " "))
              if y != " ")
  return {
      "exact": float(int(answer) == a + b),
      "digits": right / width,
      "length": float(len(answer) == len(target)),
      "format": float(response.strip() == answer),
  }


@dataclasses.dataclass(frozen=True)
class ArithmeticOptions(base.TaskOptions):
  """Options of the arithmetic task."""

  # Wrong answers differ from right ones by ~0.5 gold, far more than in
  # instruct, so the labeler needs more noise for ~80% pairwise agreement.
  labeler_temperature: float = 0.4
  # Probability that a demonstration is exactly right.
  demo_quality: float = 0.7
  max_digits: int = 3

  def __post_init__(self):
    super().__post_init__()
    if not isinstance(self.max_digits, int) or not 1 <= self.max_digits <= 9:
      raise ValueError(f"option max_digits must be an int in [1, 9], got {self.max_digits!r}")


class ArithmeticTask(base.Task):
  """Multi-digit addition with partial credit."""

  name = "arithmetic"
  Options = ArithmeticOptions

  def __init__(self, seed: int = 0, options: ArithmeticOptions | None = None):
    super().__init__(seed, options)
    n_pairs = (10 ** self.opts.max_digits) ** 2
    wanted = self.opts.num_train_prompts + self.opts.num_test_prompts
    # Rejection sampling of distinct pairs needs room to spare.
    if wanted > n_pairs // 4:
      raise ValueError(
          f"{wanted} prompts requested but max_digits={self.opts.max_digits} "
          f"allows at most {n_pairs // 4}; lower the prompt counts or raise max_digits")

  def gold_score(self, prompt: str, response: str) -> float:
    """Weighted sum of ``score_terms``; in [0, 1]."""
    return float(sum(WEIGHTS[k] * v for k, v in score_terms(prompt, response).items()))

  def score_terms(self, prompt: str, response: str) -> dict[str, float]:
    """The unweighted gold terms, for diagnosing what a policy learned."""
    return score_terms(prompt, response)

  # -- data ------------------------------------------------------------------

  def _make_prompts(self, split: str, count: int) -> list[str]:
    # Test pairs are drawn first; train draws skip them, keeping splits disjoint.
    test = self._draw_pairs("test", self.opts.num_test_prompts, frozenset())
    pairs = test if split == "test" else self._draw_pairs("train", count, frozenset(test))
    return [f"what is {a} + {b} ?" for a, b in pairs[:count]]

  def _draw_pairs(self, split: str, count: int, exclude: frozenset) -> list[tuple[int, int]]:
    rng = seeding.stream(self.seed, f"arithmetic/prompts/{split}")
    seen, pairs = set(exclude), []
    while len(pairs) < count:
      pair = (self._operand(rng), self._operand(rng))
      if pair not in seen:
        seen.add(pair)
        pairs.append(pair)
    return pairs

  def _operand(self, rng: np.random.Generator) -> int:
    digits = 1 + int(rng.random() * self.opts.max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return low + int(rng.random() * (10 ** digits - low))

  def _make_pretraining_doc(self, rng: np.random.Generator) -> str:
    equations = []
    for _ in range(1 + int(rng.random() * 3)):
      a, b = self._operand(rng), self._operand(rng)
      equations.append(f"{a} + {b} = {a + b}.")
    return " ".join(equations)

  def _optimal(self, prompt: str, rng: np.random.Generator) -> str:
    return str(sum(parse_prompt(prompt)))

  def _demonstrate(self, prompt: str, rng: np.random.Generator) -> str:
    a, b = parse_prompt(prompt)
    if rng.random() < self.opts.demo_quality:
      return str(a + b)
    return pick(rng, (_dropped_carry, _digit_off, _dropped_digit, _swapped))(a, b, rng)


def _dropped_carry(a: int, b: int, rng: np.random.Generator) -> str:
  """Column-wise sum that forgets the carry out of one column that has one."""
  da, db = str(a)[::-1], str(b)[::-1]
  columns = [int(da[i] if i < len(da) else 0) + int(db[i] if i < len(db) else 0)
             for i in range(max(len(da), len(db)))]
  carrying = [i for i in range(len(columns)) if _carry_into(columns, i + 1)]
  if not carrying:
    return _digit_off(a, b, rng)
  forget = pick(rng, carrying)
  digits, carry = [], 0
  for i, column in enumerate(columns):
    total = column + carry
    digits.append(total % 10)
    carry = 0 if i == forget else total // 10
  if carry:
    digits.append(carry)
  return "".join(str(d) for d in reversed(digits))


def _carry_into(columns: list[int], i: int) -> bool:
  carry = 0
  for column in columns[:i]:
    carry = (column + carry) // 10
  return carry > 0


def _digit_off(a: int, b: int, rng: np.random.Generator) -> str:
  digits = list(str(a + b))
  i = int(rng.random() * len(digits))
  digits[i] = str((int(digits[i]) + pick(rng, (1, 9))) % 10)
  return "".join(digits).lstrip("0") or "0"


def _dropped_digit(a: int, b: int, rng: np.random.Generator) -> str:
  digits = str(a + b)
  if len(digits) == 1:
    return _digit_off(a, b, rng)
  i = int(rng.random() * len(digits))
  return digits[:i] + digits[i + 1:]


def _swapped(a: int, b: int, rng: np.random.Generator) -> str:
  digits = list(str(a + b))
  pairs = [i for i in range(len(digits) - 1) if digits[i] != digits[i + 1]]
  if not pairs:
    return _digit_off(a, b, rng)
  i = pick(rng, pairs)
  digits[i], digits[i + 1] = digits[i + 1], digits[i]
  return "".join(digits).lstrip("0") or "0"
