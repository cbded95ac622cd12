"""`rlhf-workflow eval-rm`: how often a reward or preference model prefers the chosen response.

The file's format is detected from its fields (``format=`` sets it): preference pairs (below), or
RewardBench 2, RM-Bench and JudgeBench files, scored by their own rules (`eval.benchmarks`). A
reward model scores every response; a preference model compares them, each comparison in both
orders: best-of-n (RewardBench 2) by a round robin (``ranking=borda``, the default, or
``copeland``) or a knockout (``ranking=knockout``), the ranking's scores standing in for rewards;
RM-Bench's nine style pairs by P(chosen ≻ rejected) > ½; JudgeBench by two games as the benchmark
plays them. The method is stated in the results.

For pairs:
- accuracy: 1 when the model prefers chosen, 0 when it prefers rejected, ½ on a tie (RewardBench
  counts a classifier's tie as 0; with continuous scores ties are rare, and ½ is the unbiased
  choice);
- per-subset accuracy when rows carry a ``subset`` field, and for RewardBench files the section
  scores computed as RewardBench does: each section is the mean of its subsets' accuracies
  weighted by RewardBench's example counts (subsets absent from the file are left out and the
  weights renormalised; math-prm's count is set to equal the six code subsets together, so
  Reasoning is ½ math + ½ code); the overall score is the mean of the sections present;
- for a reward model also the mean scores and the Pearson correlation of score with response
  length in tokens: a reward model that mostly rewards length is a known failure.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from rlhf_workflow.config import EvalRMConfig
from rlhf_workflow.data.io import atomic_write_text, raw_rows, validate_row, validate_rows
from rlhf_workflow.data.outputs import OutputLock
from rlhf_workflow.data.schemas import PairRow, prompt_messages, response_text
from rlhf_workflow.errors import UserError
from rlhf_workflow.eval import benchmarks
from rlhf_workflow.eval.stats import pair_outcome, pearson
from rlhf_workflow.models.preference import detect_kind

# RewardBench (allenai/reward-bench, rewardbench/constants.py): subset -> section, and the example
# counts used as weights inside each section.
REWARDBENCH_SECTIONS: dict[str, list[str]] = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": ["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"],
    "Safety": ["refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond", "donotanswer"],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}
REWARDBENCH_COUNTS: dict[str, int] = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28, "mt-bench-med": 40,
    "mt-bench-hard": 37, "llmbar-natural": 100, "llmbar-adver-neighbor": 134, "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46, "refusals-dangerous": 100, "refusals-offensive": 100,
    "xstest-should-refuse": 250, "xstest-should-respond": 154, "donotanswer": 136,
    "math-prm": 984,  # upweighted by RewardBench to equal the six hep-* subsets (6 × 164)
    "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164, "hep-python": 164, "hep-rust": 164,
}


def section_scores(subset_accuracy: dict[str, float]) -> dict[str, float]:
    """RewardBench section scores from per-subset accuracies (see module docstring)."""
    sections = {}
    for section, subsets in REWARDBENCH_SECTIONS.items():
        present = [s for s in subsets if s in subset_accuracy]
        if not present:
            continue
        total = sum(REWARDBENCH_COUNTS[s] for s in present)
        sections[section] = sum(subset_accuracy[s] * REWARDBENCH_COUNTS[s] for s in present) / total
    if sections:
        sections["Score"] = sum(sections.values()) / len(sections)
    return sections


def summarize(rows: list[PairRow], outcomes: list[float | None]) -> dict[str, Any]:
    """Overall and per-subset accuracy (pairs the model could not score are counted apart)."""
    by_subset: dict[str, list[float]] = defaultdict(list)
    scored = []
    for row, outcome in zip(rows, outcomes):
        if outcome is None:
            continue
        scored.append(outcome)
        subset = (row.model_extra or {}).get("subset")
        if subset is not None:
            by_subset[str(subset)].append(outcome)
    if not scored:
        raise UserError("no pair could be scored (every response is longer than max_length)")
    result: dict[str, Any] = {
        "pairs": len(rows),
        "scored": len(scored),
        "skipped": len(rows) - len(scored),
        "accuracy": sum(scored) / len(scored),
    }
    if by_subset:
        subsets = {name: sum(v) / len(v) for name, v in sorted(by_subset.items())}
        result["subsets"] = {name: {"accuracy": acc, "pairs": len(by_subset[name])} for name, acc in subsets.items()}
        sections = section_scores(subsets)
        if sections:
            result["rewardbench"] = sections
    return result


def evaluate_reward_model(config: EvalRMConfig, rows: list[PairRow]) -> dict[str, Any]:
    from rlhf_workflow.models.reward import load_reward_scorer

    scorer = load_reward_scorer(config.model, dtype=config.dtype, max_length=config.max_length,
                                chat_template=config.apply_chat_template, batch_size=config.batch_size)
    prompts = [r.prompt for r in rows] * 2
    responses = [r.chosen for r in rows] + [r.rejected for r in rows]
    scores = scorer.score(prompts, responses, progress=True)
    n = len(rows)
    outcomes: list[float | None] = []
    for c, r in zip(scores[:n], scores[n:]):
        outcomes.append(None if math.isnan(c) or math.isnan(r) else pair_outcome(c, r))
    result = summarize(rows, outcomes)

    lengths = [len(scorer.tokenizer.encode(response_text(r), add_special_tokens=False)) for r in responses]
    valid = [(s, length) for s, length in zip(scores, lengths) if not math.isnan(s)]
    chosen_scores = [s for s in scores[:n] if not math.isnan(s)]
    rejected_scores = [s for s in scores[n:] if not math.isnan(s)]
    result["scores"] = {
        "mean": sum(s for s, _ in valid) / len(valid),
        "mean_chosen": sum(chosen_scores) / max(len(chosen_scores), 1),
        "mean_rejected": sum(rejected_scores) / max(len(rejected_scores), 1),
        "length_correlation": pearson([float(length) for _, length in valid], [s for s, _ in valid]),
    }
    return result


def evaluate_preference_model(config: EvalRMConfig, rows: list[PairRow]) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from rlhf_workflow.models.preference import load_preference_judge

    judge = load_preference_judge(config.model, dtype=config.dtype, batch_size=config.batch_size, max_length=config.max_length)
    probabilities: list[float] = []
    chunk = 64  # pairs per call: length-sorted batches within it, a progress bar across
    for start in tqdm(range(0, len(rows), chunk), desc="compare", disable=len(rows) <= chunk):
        probabilities += judge.compare_many(
            [(r.prompt_messages(), response_text(r.chosen), response_text(r.rejected)) for r in rows[start : start + chunk]]
        )
    outcomes: list[float | None] = [pair_outcome(p, 0.5) for p in probabilities]
    result = summarize(rows, outcomes)
    result["preference"] = {
        "mean_p_chosen": sum(probabilities) / len(probabilities),
        "forward_passes": judge.calls,
    }
    return result


# --------------------------------------------------------------------------- benchmark files


def _usable(values: Sequence[float | None]) -> list[float] | None:
    """A row's scores, or None when the model could not score one of its responses."""
    if any(v is None or math.isnan(v) for v in values):
        return None
    return [float(v) for v in values]  # type: ignore[arg-type]


def _reward_scores(config: EvalRMConfig, prompts: list[Any], responses: list[list[str]]) -> list[list[float] | None]:
    from rlhf_workflow.models.reward import load_reward_scorer

    scorer = load_reward_scorer(config.model, dtype=config.dtype, max_length=config.max_length,
                                chat_template=config.apply_chat_template, batch_size=config.batch_size)
    return [_usable(group) for group in scorer.score_groups(prompts, responses, progress=True)]


def verdict(p_first: float) -> str:
    """A preference model's verdict on (A, B) from P(A ≻ B) as read in that order."""
    return "A>B" if p_first > 0.5 else "B>A" if p_first < 0.5 else "A=B"


def evaluate_benchmark(config: EvalRMConfig, kind: str, fmt: str, rows: list[Any]) -> dict[str, Any]:
    """Score a RewardBench 2, RM-Bench or JudgeBench file (see the module docstring)."""
    from tqdm.auto import tqdm

    judge = None
    if kind == "pm":
        from rlhf_workflow.models.preference import load_preference_judge

        judge = load_preference_judge(config.model, dtype=config.dtype, batch_size=config.batch_size,
                                      max_length=config.max_length)
    if fmt == "rewardbench2":
        responses = [list(r.chosen) + list(r.rejected) for r in rows]
        if judge is None:
            scores = _reward_scores(config, [r.prompt for r in rows], responses)
            method = "reward model scores"
        else:
            scores = [judge.rank(prompt_messages(r.prompt), texts, method=config.ranking).scores
                      for r, texts in tqdm(list(zip(rows, responses)), desc="rank")]
            method = {"knockout": "preference model, knockout (best 1, worst 0, others ½)",
                      "copeland": "preference model, round robin, Copeland scores",
                      "borda": "preference model, round robin, Borda scores (mean P(win))"}[config.ranking]
        return {"method": method, **benchmarks.rewardbench2_summary(rows, scores)}
    if fmt == "rmbench":
        cells = [(i, j) for i in range(3) for j in range(3)]
        if judge is None:
            scores = _reward_scores(config, [r.prompt for r in rows], [list(r.chosen) + list(r.rejected) for r in rows])
            wins = [None if s is None else [[s[i] > s[3 + j] for j in range(3)] for i in range(3)] for s in scores]
            method = "reward model scores, chosen > rejected"
        else:
            probabilities = judge.compare_many([(prompt_messages(r.prompt), r.chosen[i], r.rejected[j])
                                                for r in rows for i, j in cells])
            wins = [[[probabilities[9 * k + 3 * i + j] > 0.5 for j in range(3)] for i in range(3)]
                    for k in range(len(rows))]
            method = "preference model, P(chosen ≻ rejected) > ½, both orders"
        return {"method": method, **benchmarks.rmbench_summary(rows, wins)}
    # judgebench
    if judge is None:
        scores = _reward_scores(config, [r.question for r in rows], [[r.response_A, r.response_B] for r in rows])
        verdicts = [None if s is None else ["A>B" if s[0] > s[1] else "B>A"] for s in scores]
        method = "reward model, one game: A>B when score A > score B, else B>A"
    else:
        items = [(prompt_messages(r.question), r.response_A, r.response_B) for r in rows]
        probabilities = judge.prefer_many(items + [(m, b, a) for m, a, b in items])
        n = len(rows)
        verdicts = [[verdict(probabilities[k]), benchmarks.flip(verdict(probabilities[n + k]))] for k in range(n)]
        method = "preference model, two games (A, B and B, A), JudgeBench's consistency rule"
    return {"method": method, **benchmarks.judgebench_summary(rows, verdicts)}


def read_benchmark(path: str, fmt: str) -> tuple[str, list[Any]]:
    """``(format, rows)`` of an eval-rm data file: the format given, or the one its first row has;
    pairs as `PairRow`, benchmark rows as their `eval.benchmarks` schema."""
    found = raw_rows(path)
    if fmt == "auto":
        fmt = benchmarks.detect_format(found[0][1])
    if fmt == "pairs":
        return fmt, validate_rows(found, PairRow)
    schema = benchmarks.SCHEMAS[fmt]
    return fmt, [validate_row(schema, data, where) for where, data in found]


def format_table(result: dict[str, Any]) -> str:
    fmt = result.get("format", "pairs")
    if fmt == "rewardbench2":
        lines = [f"{'rows':<28}{result['scored']} scored of {result['rows']}", f"{'RewardBench 2 score':<28}{result['score']:.4f}"]
        lines += [f"  {name:<26}{item['score']:.4f}  ({item['rows']} rows)" for name, item in result["subsets"].items()]
        return "\n".join(lines + [f"{'method':<28}{result['method']}"])
    if fmt == "rmbench":
        lines = [f"{'rows':<28}{result['scored']} scored of {result['rows']}"]
        lines += [f"{'RM-Bench ' + level:<28}{result[level]:.4f}" for level in ("hard", "normal", "easy", "average")]
        lines += [f"  {name:<26}hard {d['hard']:.4f}  normal {d['normal']:.4f}  easy {d['easy']:.4f}  ({d['rows']} rows)"
                  for name, d in result["domains"].items()]
        return "\n".join(lines + [f"{'method':<28}{result['method']}"])
    if fmt == "judgebench":
        lines = [f"{'pairs':<28}{result['pairs']}", f"{'JudgeBench accuracy':<28}{result['accuracy']:.4f}"]
        lines += [f"  {name:<26}{item['accuracy']:.4f}  ({item['pairs']} pairs)" for name, item in result["sources"].items()]
        return "\n".join(lines + [f"{'method':<28}{result['method']}"])
    lines = [f"{'pairs':<28}{result['scored']} scored of {result['pairs']}", f"{'accuracy':<28}{result['accuracy']:.4f}"]
    for name, item in result.get("subsets", {}).items():
        lines.append(f"  {name:<26}{item['accuracy']:.4f}  ({item['pairs']} pairs)")
    for name, value in result.get("rewardbench", {}).items():
        lines.append(f"{'RewardBench ' + name:<28}{value:.4f}")
    for name, value in result.get("scores", {}).items():
        lines.append(f"{'score ' + name:<28}{'n/a' if value is None else f'{value:.4f}'}")
    for name, value in result.get("preference", {}).items():
        lines.append(f"{name:<28}{value:.4f}" if isinstance(value, float) else f"{name:<28}{value}")
    return "\n".join(lines)


def run_eval_rm(config: EvalRMConfig) -> dict[str, Any]:
    """Evaluate, print a table, write the JSON results; returns them."""
    found = detect_kind(config.model)  # a plain causal LM is neither, whatever kind= says
    if config.kind != "auto" and config.kind != found:
        raise UserError(f"kind={config.kind}, but {config.model} holds a {'preference' if found == 'pm' else 'reward'} "
                        f"model (kind={found})")
    kind = found
    fmt, rows = read_benchmark(config.data, config.format)
    try:
        if fmt == "pairs":
            result = evaluate_reward_model(config, rows) if kind == "rm" else evaluate_preference_model(config, rows)
        else:
            result = evaluate_benchmark(config, kind, fmt, rows)
    except ValueError as exc:  # e.g. a Ties id of another form, or nothing scorable
        raise UserError(f"{config.data}: {exc}") from None
    result = {"model": config.model, "data": config.data, "kind": kind, "format": fmt, **result}
    output = Path(config.results_path)
    with OutputLock(output, directory=False).acquire():
        atomic_write_text(output, json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"results written to {output}")
    return result
