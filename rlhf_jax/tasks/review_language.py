"""The small review language of the instruct task.

Words live in categories (subjects, aspects, adjectives, verbs, ...), each
word in exactly one. Sentences are clauses from ``SUBJECT_CLAUSES`` and
``OTHER_CLAUSES`` joined by ``,``, ``and``, ``but``, ``.`` or ``!`` and ended by
``.`` or ``!``. Fluency is judged at the level of category bigrams: a
transition is valid when some sentence of the grammar contains it.

Clause symbols: upper-case names are word slots, ``SADJ``/``SVERB`` carry
the clause's sentiment, ``NADJ``/``NVERB`` are neutral, a leading ``?``
marks an optional slot, and lower-case symbols are literal words.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from collections.abc import Sequence

import numpy as np

from rlhf_jax.tasks.seeding import pick

PLACES = (
    "cafe", "hotel", "museum", "park", "library", "bakery", "restaurant", "gym",
    "theater", "market", "airport", "beach", "zoo", "clinic", "bookstore",
    "diner", "salon", "cinema", "hostel", "garden", "mall", "pool", "pub",
    "gallery",
)
PRODUCTS = (
    "phone", "laptop", "camera", "blender", "jacket", "backpack", "bicycle",
    "watch", "lamp", "chair", "kettle", "printer", "tent", "umbrella",
    "keyboard", "mattress", "toaster", "speaker", "sofa", "scooter", "oven",
    "desk", "helmet", "tablet",
)
SUBJECTS = PLACES + PRODUCTS
PLACE_ASPECTS = (
    "staff", "service", "food", "coffee", "room", "view", "menu", "music",
    "decor", "owner", "location", "entrance", "lobby", "bathroom", "bed",
    "breakfast", "bread", "tea", "cake", "parking", "lighting", "seating",
    "queue", "atmosphere", "waiter", "terrace", "courtyard", "wifi", "shower",
    "exhibit",
)
PRODUCT_ASPECTS = (
    "battery", "screen", "design", "sound", "handle", "lid", "fabric",
    "zipper", "wheel", "strap", "button", "manual", "packaging", "delivery",
    "charger", "cable", "motor", "blade", "frame", "cushion", "switch",
    "display", "finish", "grip", "volume", "warranty", "case", "hinge",
    "lens", "price",
)
POSITIVE_ADJECTIVES = (
    "great", "lovely", "friendly", "clean", "cozy", "delightful", "excellent",
    "fresh", "charming", "pleasant", "superb", "wonderful", "amazing", "tasty",
    "bright", "spotless", "helpful", "reliable", "elegant", "generous",
    "perfect", "stylish", "comfortable", "gorgeous", "brilliant", "fantastic",
    "relaxing", "welcoming", "smooth", "sturdy", "peaceful", "vibrant",
    "crisp", "neat", "cheerful", "affordable", "quick", "solid", "polite",
    "attentive", "flawless", "handy", "lively", "soothing", "graceful",
    "classy", "tidy", "efficient", "durable", "inviting",
)
NEGATIVE_ADJECTIVES = (
    "awful", "dirty", "rude", "slow", "noisy", "cramped", "bland", "stale",
    "broken", "terrible", "dull", "greasy", "overpriced", "shabby", "filthy",
    "unhelpful", "gloomy", "sticky", "flimsy", "boring", "poor", "horrible",
    "dreadful", "smelly", "crowded", "chaotic", "damp", "tacky", "sloppy",
    "grim", "lousy", "mediocre", "unreliable", "clumsy", "leaky", "dusty",
    "buggy", "harsh", "soggy", "faded", "weak", "careless", "disappointing",
    "messy", "sour", "worn", "useless", "clunky", "fragile", "hostile",
)
NEUTRAL_ADJECTIVES = (
    "small", "big", "old", "new", "local", "modern", "simple", "large", "tall",
    "usual", "typical", "wooden", "nearby", "plain", "standard", "black",
    "white", "blue", "red", "green", "square", "round", "basic", "compact",
    "metal",
)
POSITIVE_VERBS = (
    "loved", "enjoyed", "adored", "liked", "appreciated", "praised", "admired",
    "treasured",
)
NEGATIVE_VERBS = (
    "hated", "disliked", "regretted", "resented", "despised", "loathed",
    "dreaded", "detested",
)
NEUTRAL_VERBS = (
    "visited", "tried", "bought", "used", "booked", "found", "checked",
    "ordered", "tested", "picked", "chose", "reviewed", "borrowed", "rented",
    "noticed", "got",
)
INTENSIFIERS = (
    "very", "really", "truly", "quite", "so", "extremely", "rather", "pretty",
    "fairly", "incredibly", "super", "totally", "surprisingly", "remarkably",
    "genuinely", "honestly",
)
PEOPLE = (
    "friend", "family", "partner", "sister", "brother", "mother", "father",
    "kids", "son", "daughter", "colleague", "neighbor", "wife", "husband",
    "cousin", "uncle", "aunt",
)
TIMES = (
    "today", "yesterday", "recently", "again", "twice", "once", "lately",
    "tonight", "finally", "earlier",
)
COPULAS = ("was", "felt", "looked", "seemed", "is")

# Word-slot symbol -> the grammatical category its words share.
SLOT_CATEGORY = {
    "SUBJ": "SUBJ", "ASP": "ASP", "SADJ": "ADJ", "NADJ": "ADJ",
    "SVERB": "VERB", "NVERB": "VERB", "INT": "INT", "PERSON": "PERSON",
    "TIME": "TIME", "COP": "COP",
}
_CATEGORY_WORDS = {
    "SUBJ": SUBJECTS, "ASP": PLACE_ASPECTS + PRODUCT_ASPECTS,
    "ADJ": POSITIVE_ADJECTIVES + NEGATIVE_ADJECTIVES + NEUTRAL_ADJECTIVES,
    "VERB": POSITIVE_VERBS + NEGATIVE_VERBS + NEUTRAL_VERBS,
    "INT": INTENSIFIERS, "PERSON": PEOPLE, "TIME": TIMES, "COP": COPULAS,
}
# Content words count towards repetition; copulas and literals do not.
CONTENT_CATEGORIES = frozenset(_CATEGORY_WORDS) - {"COP"}
POLARITY_WORDS = {
    "positive": frozenset(POSITIVE_ADJECTIVES + POSITIVE_VERBS),
    "negative": frozenset(NEGATIVE_ADJECTIVES + NEGATIVE_VERBS),
}
OPPOSITE = {"positive": "negative", "negative": "positive"}

SUBJECT_CLAUSES = (
    ("the", "SUBJ", "COP", "?INT", "SADJ"),
    ("this", "?INT", "SADJ", "SUBJ"),
    ("i", "SVERB", "this", "SUBJ"),
    ("the", "SUBJ", "has", "SADJ", "ASP"),
    ("the", "SUBJ", "COP", "SADJ", "and", "SADJ"),
    ("we", "NVERB", "the", "SUBJ", "?TIME"),
    ("the", "SUBJ", "COP", "NADJ"),
    ("the", "SUBJ", "has", "NADJ", "ASP"),
)
OTHER_CLAUSES = (
    ("the", "ASP", "COP", "?INT", "SADJ"),
    ("?INT", "SADJ", "ASP"),
    ("i", "SVERB", "the", "?NADJ", "ASP"),
    ("my", "PERSON", "SVERB", "the", "ASP"),
    ("overall", "?INT", "SADJ"),
    ("the", "ASP", "COP", "SADJ", "and", "SADJ"),
    ("the", "ASP", "COP", "NADJ"),
    ("we", "NVERB", "it", "?TIME"),
    ("my", "PERSON", "NVERB", "it", "?TIME"),
    ("i", "NVERB", "the", "?NADJ", "ASP"),
)
JOINS = (",", "and", "but", ".", "!")
ENDS = (".", "!")
BOS, EOS = "<s>", "</s>"

_TOKEN_RE = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")


def _build_categories() -> dict[str, str]:
  category = {}
  for cat, words in _CATEGORY_WORDS.items():
    for word in words:
      if word in category:
        raise AssertionError(f"{word!r} is in both {category[word]} and {cat}")
      category[word] = cat
  return category


CATEGORY = _build_categories()


@dataclasses.dataclass(frozen=True)
class Clause:
  """One clause template with its optional slots resolved."""

  symbols: tuple[str, ...]
  n_words: int
  n_sentiment: int


def _variants(templates: Sequence[tuple[str, ...]]) -> tuple[Clause, ...]:
  out = []
  for template in templates:
    optional = [i for i, s in enumerate(template) if s.startswith("?")]
    for keep in itertools.product((False, True), repeat=len(optional)):
      dropped = {i for i, k in zip(optional, keep) if not k}
      symbols = tuple(s.lstrip("?") for i, s in enumerate(template) if i not in dropped)
      n_sent = sum(s in ("SADJ", "SVERB") for s in symbols)
      out.append(Clause(symbols, len(symbols), n_sent))
  return tuple(out)


SUBJECT_VARIANTS = _variants(SUBJECT_CLAUSES)
OTHER_VARIANTS = _variants(OTHER_CLAUSES)


def _symbol_category(symbol: str) -> str:
  return SLOT_CATEGORY.get(symbol, symbol)


def _build_transitions() -> frozenset[tuple[str, str]]:
  clauses = SUBJECT_VARIANTS + OTHER_VARIANTS
  firsts = {_symbol_category(c.symbols[0]) for c in clauses}
  lasts = {_symbol_category(c.symbols[-1]) for c in clauses}
  pairs = set()
  for clause in clauses:
    cats = [_symbol_category(s) for s in clause.symbols]
    pairs.update(zip(cats, cats[1:]))
  pairs.update((BOS, f) for f in firsts)
  for sep in JOINS:
    pairs.update((last, sep) for last in lasts)
    pairs.update((sep, f) for f in firsts)
  for end in ENDS:
    pairs.update((last, end) for last in lasts)
    pairs.add((end, EOS))
  return frozenset(pairs)


TRANSITIONS = _build_transitions()


def tokenize(text: str) -> list[str]:
  """Words and punctuation marks of ``text`` (lower-cased)."""
  return _TOKEN_RE.findall(text.lower())


def category(token: str) -> str:
  """The grammatical category of a token; literals are their own category."""
  return CATEGORY.get(token, token)


def fluency(tokens: Sequence[str]) -> float:
  """Fraction of category bigrams (with start and end) the grammar allows."""
  if not tokens:
    return 0.0
  cats = [BOS] + [category(t) for t in tokens] + [EOS]
  valid = sum((a, b) in TRANSITIONS for a, b in zip(cats, cats[1:]))
  return valid / (len(cats) - 1)


def is_content(token: str) -> bool:
  """Whether ``token`` counts as a content word for repetition."""
  return CATEGORY.get(token) in CONTENT_CATEGORIES


def render(tokens: Sequence[str]) -> str:
  """Tokens as text: words spaced, punctuation attached to the word before."""
  text = " ".join(tokens)
  for mark in (",", ".", "!"):
    text = text.replace(" " + mark, mark)
  return text


# -- sampling ------------------------------------------------------------------


def plan(
    rng: np.random.Generator,
    n_words: int,
    min_sentiment: int,
    max_sentiment: int,
    with_subject: bool = True,
    tries: int = 64,
) -> list[tuple[str | None, Clause]]:
  """A clause sequence of exactly ``n_words`` words: [(join before, clause)].

  The first clause mentions the subject when ``with_subject``; the number of
  sentiment slots lies in [min_sentiment, max_sentiment]. When no plan meets
  the sentiment bounds within ``tries`` attempts, they are relaxed.
  """
  n_words = max(n_words, 2)
  for attempt in range(2 * tries):
    lo, hi = (min_sentiment, max_sentiment) if attempt < tries else (0, 99)
    result = _try_plan(rng, n_words, lo, hi, with_subject)
    if result is not None:
      return result
  raise RuntimeError(f"no clause plan of {n_words} words")  # unreachable for n >= 2


@functools.cache
def _fitting(with_subject: bool, remaining: int, budget: int) -> tuple[Clause, ...]:
  """Clauses that leave a fillable remainder and stay within the sentiment budget."""
  pool = SUBJECT_VARIANTS if with_subject else OTHER_VARIANTS
  # No clause has one word, so a remainder of exactly one cannot be filled.
  return tuple(c for c in pool if c.n_words <= remaining
               and remaining - c.n_words != 1 and c.n_sentiment <= budget)


def _try_plan(rng, n_words, lo, hi, with_subject):
  options = _fitting(with_subject, n_words, hi)
  if not options:
    return None
  first = pick(rng, options)
  out: list[tuple[str | None, Clause]] = [(None, first)]
  remaining, sentiment = n_words - first.n_words, first.n_sentiment
  while remaining > 0:
    join = pick(rng, JOINS)
    cost = join[0].isalpha()
    options = _fitting(False, remaining - cost, hi - sentiment)
    if not options:
      return None
    clause = pick(rng, options)
    out.append((join, clause))
    remaining -= clause.n_words + cost
    sentiment += clause.n_sentiment
  return out if sentiment >= lo else None


def fill(
    rng: np.random.Generator,
    clauses: Sequence[tuple[str | None, Clause]],
    polarities: Sequence[str],
    subject: str,
    used: set[str] | None = None,
) -> list[str]:
  """Tokens for a plan, one polarity per clause; content words not in ``used``.

  The response ends with '.' or '!'. ``used`` is updated in place.
  """
  used = set() if used is None else used
  aspects = PLACE_ASPECTS if subject in PLACES else PRODUCT_ASPECTS
  tokens: list[str] = []
  for (join, clause), polarity in zip(clauses, polarities, strict=True):
    if join is not None:
      tokens.append(join)
    for symbol in clause.symbols:
      if symbol == "SUBJ":
        word = subject
      elif symbol in SLOT_CATEGORY:
        word = _fresh(rng, _slot_words(symbol, polarity, aspects), used)
      else:
        word = symbol
      tokens.append(word)
  tokens.append(pick(rng, ENDS))
  return tokens


def _slot_words(symbol: str, polarity: str, aspects: Sequence[str]) -> Sequence[str]:
  positive = polarity == "positive"
  return {
      "ASP": aspects,
      "SADJ": POSITIVE_ADJECTIVES if positive else NEGATIVE_ADJECTIVES,
      "SVERB": POSITIVE_VERBS if positive else NEGATIVE_VERBS,
      "NADJ": NEUTRAL_ADJECTIVES, "NVERB": NEUTRAL_VERBS, "INT": INTENSIFIERS,
      "PERSON": PEOPLE, "TIME": TIMES, "COP": COPULAS,
  }[symbol]


def _fresh(rng: np.random.Generator, words: Sequence[str], used: set[str]) -> str:
  for _ in range(8):
    word = pick(rng, words)
    if word not in used:
      break
  if CATEGORY[word] in CONTENT_CATEGORIES:
    used.add(word)
  return word
