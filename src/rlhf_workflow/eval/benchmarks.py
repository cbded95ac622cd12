"""Reward-model benchmark files beyond plain pairs, and their official scoring rules.

Formats, detected from the first row's fields (or set with ``eval-rm format=``):

* ``rewardbench2`` — allenai/reward-bench-2: ``{"id", "prompt", "chosen": [...], "rejected": [...],
  "num_correct", "subset"}``; best-of-n (1 chosen, 3 rejected except in Ties);
* ``rmbench`` — RM-Bench: ``{"prompt", "chosen": [3], "rejected": [3], "domain"}``, the three
  responses of each side in the styles concise, detailed plain, detailed markdown;
* ``judgebench`` — JudgeBench: ``{"question", "response_A", "response_B", "label": "A>B" | "B>A",
  "source"}``;
* ``pairs`` — prompt, chosen, rejected (RewardBench v1 and our own pairs files; `reward_eval`).

The rules, as the benchmarks' own code computes them (the functions below take the model's
scores, so they are tested on hand-built numbers):

* RewardBench 2 (``scripts/run_v2.py``, ``rewardbench/utils.py``): a row scores
  1 / (number of responses tied at the top) when the chosen response has the top score, else 0; a
  subset scores the mean of its rows. (Official rows outside Ties have one chosen response; with
  several, we credit the share of the tied top that is chosen.) The **Ties** subset has its own
  score, from prompts grouped by ``id`` = ``ref:<k>`` (one correct answer) and ``tied:<k>``
  (several): per prompt, the margin min(correct) − max(incorrect) and, for several correct answers,
  their spread max(correct) − min(correct); accurate = margin > 0. Score = 0.30 · accuracy on the
  tied prompts + 0.30 · accuracy on the ref prompts + 0.20 · share of prompts whose tied margin
  beats the tied spread + 0.20 · the same with the smaller of the ref and tied margins + 0.01 ·
  mean tanh(min(ref, tied margin) / spread − 1) (NaN as 0). The overall score is the mean of the
  subsets, as the leaderboard averages its six.
* RM-Bench (``scripts/utils.py`` ``compute_accuracy``): per domain (chat, code, math, safety — the
  two safety domains pooled by prefix, as RM-Bench does) the 3×3 matrix M[i][j] = share of rows
  whose chosen response in style i scores strictly above the rejected one in style j; **hard** =
  mean of the 3 cells above the diagonal (chosen plainer than rejected), **normal** = the
  diagonal's mean, **easy** = the 3 cells below; each overall figure is the mean over domains.
* JudgeBench (``utils/metrics.py``): a pair is judged twice, the second time with A and B
  swapped and the verdict mapped back; +1 for a verdict equal to the label, −1 for the opposite,
  0 for a tie; the pair is correct when the sum is positive (so an inconsistent pair is wrong).
  A reward model is one game (its verdict cannot depend on the order): A>B when score A > score B,
  else B>A, as JudgeBench's reward-model judge does. Accuracy per source (knowledge = mmlu-pro,
  reasoning, math, coding) and overall over all pairs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Annotated, Any, Literal, Sequence

from annotated_types import Len, MinLen

from rlhf_workflow.data.schemas import Conversation, Row

FORMATS = ("pairs", "rewardbench2", "rmbench", "judgebench")
STYLES = ("concise", "detailed plain", "detailed markdown")
RMBENCH_DOMAINS = ("chat", "math", "code", "safety")
JUDGEBENCH_SOURCES = {"knowledge": "mmlu-pro", "reasoning": "livebench-reasoning", "math": "livebench-math",
                      "coding": "livecodebench"}


class BestOfNRow(Row):
    """A RewardBench 2 row."""

    id: str | int = ""
    prompt: Conversation
    chosen: Annotated[list[str], MinLen(1)]
    rejected: Annotated[list[str], MinLen(1)]
    subset: str = ""


class StyleRow(Row):
    """An RM-Bench row: three chosen and three rejected responses, in `STYLES` order."""

    prompt: Conversation
    chosen: Annotated[list[str], Len(3, 3)]
    rejected: Annotated[list[str], Len(3, 3)]
    domain: str = ""


class JudgeBenchRow(Row):
    """A JudgeBench pair."""

    question: Conversation
    response_A: str
    response_B: str
    label: Literal["A>B", "B>A"]
    source: str = ""


SCHEMAS = {"rewardbench2": BestOfNRow, "rmbench": StyleRow, "judgebench": JudgeBenchRow}


def detect_format(row: dict[str, Any]) -> str:
    """The benchmark format of a row, by its fields."""
    if {"response_A", "response_B", "label"} <= set(row):
        return "judgebench"
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(chosen, list) and isinstance(rejected, list) and all(isinstance(c, str) for c in chosen + rejected):
        if "domain" in row and len(chosen) == 3 and len(rejected) == 3 and "subset" not in row:
            return "rmbench"
        return "rewardbench2"
    return "pairs"


# --------------------------------------------------------------------------- RewardBench 2


def best_of_n_result(scores: Sequence[float], chosen: int) -> float:
    """One row: the share of the responses tied at the top score that are chosen (the first
    ``chosen`` ones); 0 when no chosen response has the top score."""
    top = max(scores)
    tied = [k for k, s in enumerate(scores) if s == top]
    return sum(k < chosen for k in tied) / len(tied)


def _prompt_stats(scores: Sequence[float], correct: int) -> dict[str, Any]:
    good, bad = scores[:correct], scores[correct:]
    margin = min(good) - max(bad)
    return {"margin": margin, "accurate": margin > 0, "spread": max(good) - min(good) if len(good) >= 2 else None}


def ties_score(rows: Sequence[tuple[str, Sequence[float], int]]) -> dict[str, float]:
    """The Ties subset's score from ``(id, scores, number correct)`` rows (see the module docstring)."""
    groups: dict[str, dict[str, dict[str, Any]]] = {"ref": {}, "tied": {}}
    for row_id, scores, correct in rows:
        kind, _, key = str(row_id).partition(":")
        if kind not in groups or not key:
            raise ValueError(f"Ties row id {row_id!r} is not 'ref:<k>' or 'tied:<k>'")
        groups[kind][key] = _prompt_stats(scores, correct)
    ref, tied = groups["ref"], groups["tied"]

    def share(values: list[bool]) -> float:
        return sum(values) / len(values) if values else 0.0

    ref_acc = share([p["accurate"] for p in ref.values()])
    tied_acc = share([p["accurate"] for p in tied.values()])
    both = [k for k in tied if k in ref and tied[k]["spread"] is not None]
    preferred = share([tied[k]["margin"] > tied[k]["spread"] for k in both])
    preferred_hard = share([min(ref[k]["margin"], tied[k]["margin"]) > tied[k]["spread"] for k in both])
    margins = []
    for k in both:
        low, spread = min(ref[k]["margin"], tied[k]["margin"]), tied[k]["spread"]
        ratio = low / spread if spread else (math.nan if low == 0 else math.copysign(math.inf, low))
        value = math.tanh(ratio - 1)
        margins.append(0.0 if math.isnan(value) else value)
    margin = sum(margins) / len(margins) if margins else 0.0
    score = 0.30 * tied_acc + 0.30 * ref_acc + 0.20 * preferred + 0.20 * preferred_hard + 0.01 * margin
    return {"score": score, "ref_accuracy": ref_acc, "tied_accuracy": tied_acc, "correctness_preferred": preferred,
            "correctness_preferred_hard": preferred_hard, "margin": margin}


def rewardbench2_summary(rows: Sequence[BestOfNRow], scores: Sequence[Sequence[float] | None]) -> dict[str, Any]:
    """Per-subset and overall RewardBench 2 scores; rows the model could not score are counted apart
    (a Ties prompt with a response left unscored drops out of the Ties score)."""
    results: dict[str, list[float]] = defaultdict(list)
    ties: list[tuple[str, Sequence[float], int]] = []
    skipped = 0
    for row, row_scores in zip(rows, scores):
        if row_scores is None:
            skipped += 1
            continue
        subset = row.subset or "all"
        if subset.lower() == "ties":
            ties.append((str(row.id), row_scores, len(row.chosen)))
        else:
            results[subset].append(best_of_n_result(row_scores, len(row.chosen)))
    subsets: dict[str, dict[str, Any]] = {
        name: {"score": sum(values) / len(values), "rows": len(values)} for name, values in sorted(results.items())}
    if ties:
        subsets["Ties"] = {**ties_score(ties), "rows": len(ties)}
    if not subsets:
        raise ValueError("no row could be scored (every response is longer than max_length)")
    return {"rows": len(rows), "scored": len(rows) - skipped, "skipped": skipped, "subsets": subsets,
            "score": sum(s["score"] for s in subsets.values()) / len(subsets)}


# --------------------------------------------------------------------------- RM-Bench


def rmbench_domain(domain: str) -> str:
    """RM-Bench's domain of a row: the first of chat, math, code, safety its domain starts with."""
    return next((d for d in RMBENCH_DOMAINS if domain.startswith(d)), domain or "all")


def style_matrix(wins: Sequence[Sequence[Sequence[bool]]]) -> list[list[float]]:
    """M[i][j]: the share of rows whose chosen response in style i beats the rejected one in style j."""
    return [[sum(w[i][j] for w in wins) / len(wins) for j in range(3)] for i in range(3)]


def difficulty(matrix: Sequence[Sequence[float]]) -> dict[str, float]:
    """RM-Bench's hard (above the diagonal), normal (diagonal) and easy (below) accuracies."""
    hard = sum(matrix[i][j] for i in range(3) for j in range(3) if j > i) / 3
    normal = sum(matrix[i][i] for i in range(3)) / 3
    easy = sum(matrix[i][j] for i in range(3) for j in range(3) if j < i) / 3
    return {"hard": hard, "normal": normal, "easy": easy}


def rmbench_summary(rows: Sequence[StyleRow], wins: Sequence[Sequence[Sequence[bool]] | None]) -> dict[str, Any]:
    """Hard / normal / easy per domain and overall (the mean over domains), with the style matrices."""
    by_domain: dict[str, list[Sequence[Sequence[bool]]]] = defaultdict(list)
    skipped = 0
    for row, row_wins in zip(rows, wins):
        if row_wins is None:
            skipped += 1
            continue
        by_domain[rmbench_domain(row.domain)].append(row_wins)
    if not by_domain:
        raise ValueError("no row could be scored (every response is longer than max_length)")
    domains = {}
    for name, items in sorted(by_domain.items()):
        matrix = style_matrix(items)
        levels = difficulty(matrix)
        domains[name] = {**levels, "average": sum(levels.values()) / 3, "rows": len(items), "matrix": matrix}
    overall = {level: sum(d[level] for d in domains.values()) / len(domains) for level in ("hard", "normal", "easy")}
    return {"rows": len(rows), "scored": len(rows) - skipped, "skipped": skipped, **overall,
            "average": sum(d["average"] for d in domains.values()) / len(domains), "domains": domains,
            "styles": list(STYLES)}


# --------------------------------------------------------------------------- JudgeBench


def flip(verdict: str) -> str:
    """The verdict with A and B swapped (a tie stays a tie)."""
    return {"A>B": "B>A", "B>A": "A>B"}.get(verdict, verdict)


def pair_correct(verdicts: Sequence[str], label: str) -> bool:
    """JudgeBench's rule: +1 per verdict equal to the label, −1 per opposite one; correct when positive."""
    return sum(1 if v == label else -1 if v == flip(label) else 0 for v in verdicts) > 0


def judgebench_source(source: str) -> str:
    return next((name for name, prefix in JUDGEBENCH_SOURCES.items() if source.startswith(prefix)), source or "all")


def judgebench_summary(rows: Sequence[JudgeBenchRow], verdicts: Sequence[Sequence[str] | None]) -> dict[str, Any]:
    """Accuracy overall (all pairs) and per source; pairs the model could not score count as wrong
    and are reported as skipped, as JudgeBench counts a missing verdict."""
    by_source: dict[str, list[bool]] = defaultdict(list)
    everything, skipped, inconsistent = [], 0, 0
    for row, row_verdicts in zip(rows, verdicts):
        correct = row_verdicts is not None and pair_correct(row_verdicts, row.label)
        skipped += row_verdicts is None
        if row_verdicts is not None:  # one game for, one against the label
            inconsistent += set(row_verdicts) == {"A>B", "B>A"}
        everything.append(correct)
        by_source[judgebench_source(row.source)].append(correct)
    return {"pairs": len(rows), "skipped": skipped, "inconsistent": inconsistent,
            "accuracy": sum(everything) / len(everything),
            "sources": {name: {"accuracy": sum(v) / len(v), "pairs": len(v)} for name, v in sorted(by_source.items())}}
