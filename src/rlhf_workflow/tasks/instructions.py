"""`instructions`: chat prompts with verifiable constraints, in the style of IFEval.

    Write a short note about the moon. Include the word 'blue'. Do not use any commas.

Each prompt carries one to three constraints of different kinds, stored in the prompt row as
``constraints`` (a list of ``{"kind", ...parameters}``), so the judge can check them later:

| kind          | instruction                                        | satisfied when                           |
| ------------- | -------------------------------------------------- | ---------------------------------------- |
| include_word  | Include the word 'blue'.                           | the word appears (any case, whole word)   |
| avoid_word    | Do not use the word 'very'.                        | it does not appear as a whole word        |
| no_commas     | Do not use any commas.                             | no ',' at all                             |
| lowercase     | Write only in lowercase letters.                   | has letters, none upper case              |
| max_words     | Answer in at most 12 words.                        | whitespace-separated words <= N           |
| end_with      | End your answer with the character '!'.            | the last non-space character is it        |
| start_with    | Start your answer with the word 'Yes'.             | the first word (punctuation off) is it    |
| sentences     | Answer in exactly 2 sentences.                     | sentence count (see `count_sentences`)    |

The judge (the demo's "simulated human") scores a response by the fraction of its prompt's
constraints it satisfies; `noisy_judge` replaces 20 % of scores by a uniform random number
(deterministic for a given prompt and response), to simulate noisy feedback.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Any

TOPICS = [
    "the moon", "the sea", "a cat", "winter", "coffee", "a library", "trains", "the desert", "music", "a garden",
    "rain", "mountains", "a city at night", "friendship", "bread", "the sun", "a forest", "bicycles", "snow",
    "a small village", "the ocean floor", "autumn leaves", "a lighthouse", "tea", "a river", "birds", "stars",
    "an old house", "summer", "a market", "chess", "the wind", "a bridge", "clouds", "a school", "honey",
]
OPENINGS = ["Write a short note about {}.", "Describe {}.", "Tell me about {}.", "Write a few lines about {}.",
            "Say something about {}.", "Give a short description of {}."]
INCLUDE_WORDS = ["blue", "quiet", "bright", "warm", "green", "gold", "soft", "happy", "old", "light"]
AVOID_WORDS = ["the", "is", "and", "very", "it", "a"]
END_CHARS = ["!", ".", "?"]
START_WORDS = ["Yes", "Today", "Once", "Well", "Imagine"]
KINDS = ["include_word", "avoid_word", "no_commas", "lowercase", "max_words", "end_with", "start_with", "sentences"]

_WORD = re.compile(r"[A-Za-z0-9']+")


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9']){re.escape(word)}(?![A-Za-z0-9'])", text, flags=re.IGNORECASE) is not None


def count_sentences(text: str) -> int:
    """Sentences: runs of text ended by '.', '!' or '?' (repeats like '...' end one), plus a last
    unterminated run that holds a word. Decimal points ('3.5') do not end a sentence."""
    stripped = re.sub(r"(?<=\d)\.(?=\d)", "", text.strip())
    parts = re.split(r"[.!?]+", stripped)
    return sum(1 for part in parts if _WORD.search(part))


def check(constraint: dict[str, Any], response: str) -> bool:
    """Whether ``response`` satisfies one constraint."""
    kind = constraint["kind"]
    text = response.strip()
    if kind == "include_word":
        return _has_word(text, constraint["word"])
    if kind == "avoid_word":
        return bool(text) and not _has_word(text, constraint["word"])
    if kind == "no_commas":
        return bool(text) and "," not in text
    if kind == "lowercase":
        return any(c.isalpha() for c in text) and text == text.lower()
    if kind == "max_words":
        return 0 < len(text.split()) <= constraint["n"]
    if kind == "end_with":
        return text.endswith(constraint["char"])
    if kind == "start_with":
        first = re.match(r"[A-Za-z0-9]+", text.lstrip(" \"'*#-"))  # quotes or markdown before the first word are fine
        return first is not None and first.group(0).lower() == constraint["word"].lower()
    if kind == "sentences":
        return count_sentences(text) == constraint["n"]
    raise ValueError(f"unknown constraint kind {kind!r}")


def describe(constraint: dict[str, Any]) -> str:
    """The instruction sentence for a constraint."""
    kind = constraint["kind"]
    return {
        "include_word": lambda c: f"Include the word '{c['word']}'.",
        "avoid_word": lambda c: f"Do not use the word '{c['word']}'.",
        "no_commas": lambda c: "Do not use any commas.",
        "lowercase": lambda c: "Write only in lowercase letters.",
        "max_words": lambda c: f"Answer in at most {c['n']} words.",
        "end_with": lambda c: f"End your answer with the character '{c['char']}'.",
        "start_with": lambda c: f"Start your answer with the word '{c['word']}'.",
        "sentences": lambda c: f"Answer in exactly {c['n']} sentence{'s' if c['n'] > 1 else ''}.",
    }[kind](constraint)


def _constraint(kind: str, rng: random.Random) -> dict[str, Any]:
    if kind == "include_word":
        return {"kind": kind, "word": rng.choice(INCLUDE_WORDS)}
    if kind == "avoid_word":
        return {"kind": kind, "word": rng.choice(AVOID_WORDS)}
    if kind == "max_words":
        return {"kind": kind, "n": rng.choice([8, 10, 12, 15, 20])}
    if kind == "end_with":
        return {"kind": kind, "char": rng.choice(END_CHARS)}
    if kind == "start_with":
        return {"kind": kind, "word": rng.choice(START_WORDS)}
    if kind == "sentences":
        return {"kind": kind, "n": rng.choice([1, 2, 3])}
    return {"kind": kind}


def _compatible(a: dict[str, Any], b: dict[str, Any]) -> bool:
    kinds = {a["kind"], b["kind"]}
    if a["kind"] == b["kind"]:
        return False
    if kinds == {"include_word", "avoid_word"}:
        return a.get("word") != b.get("word")
    if kinds == {"end_with", "sentences"}:  # "exactly 1 sentence" ending in '?' is fine; keep them apart anyway
        return False
    return True


def make_prompt(rng: random.Random, *, min_constraints: int = 1, max_constraints: int = 3,
                kinds: list[str] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """One prompt text and its constraints."""
    topic = rng.choice(TOPICS)
    opening = rng.choice(OPENINGS).format(topic)
    wanted = rng.randint(min_constraints, max_constraints)
    constraints: list[dict[str, Any]] = []
    pool = list(kinds or KINDS)
    while len(constraints) < wanted and pool:
        kind = rng.choice(pool)
        candidate = _constraint(kind, rng)
        if all(_compatible(candidate, c) for c in constraints):
            constraints.append(candidate)
        pool.remove(kind)
    return " ".join([opening] + [describe(c) for c in constraints]), constraints


def prompts(split: str, count: int, seed: int = 0, *, min_constraints: int = 1, max_constraints: int = 3,
            kinds: list[str] | None = None) -> list[dict[str, Any]]:
    """``count`` distinct prompt rows of ``split`` ("train" or "eval"), deterministic for a seed:
    ``{"id", "prompt", "task": "instructions", "constraints": [...]}``."""
    from rlhf_workflow.tasks import draw_split

    rng = random.Random(f"instructions:{seed}")

    def draw() -> tuple[str, dict[str, Any]]:
        text, constraints = make_prompt(rng, min_constraints=min_constraints, max_constraints=max_constraints, kinds=kinds)
        return text, {"prompt": text, "constraints": constraints}

    return draw_split("instructions", split, count, draw)


def judge(row: dict[str, Any], response: str) -> float:
    """The fraction of the row's constraints that ``response`` satisfies."""
    constraints = row.get("constraints")
    if not isinstance(constraints, list) or not constraints:
        raise ValueError(f"row {row.get('id')!r} has no 'constraints' (not an instructions prompt)")
    return sum(check(c, response) for c in constraints) / len(constraints)


NOISE = 0.2


def noisy_judge(row: dict[str, Any], response: str) -> float:
    """`judge`, except that for 20 % of (prompt, response) pairs the score is a uniform random number
    (chosen by a hash, so the same response always gets the same score): noisy human feedback."""
    digest = hashlib.sha1(f"{row.get('id')}\x00{response}".encode("utf-8")).digest()
    if int.from_bytes(digest[:4], "big") / 2**32 < NOISE:
        return int.from_bytes(digest[4:8], "big") / 2**32
    return judge(row, response)
