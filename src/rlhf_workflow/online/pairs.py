"""The `pairs` command: preference pairs from annotated generations (the paper's "enhancer").

    rlhf-workflow pairs input=scored.jsonl output=pairs.jsonl strategy=max_min

Strategies, over the responses of one prompt that have a reward (`choose_pair`):

* ``max_min`` (default): best of n as chosen, worst of n as rejected — rejection sampling;
* ``max_random``: the best against one of the others drawn at random;
* ``random``: two drawn at random, the better one chosen;
* ``max_max``: the best against the second best;
* ``all``: every two responses whose rewards differ, the better one chosen (up to n(n-1)/2 pairs
  per prompt, ids ``<row id>/<chosen>-<rejected>``): the most a reward model can learn from n
  labelled responses.

A pair is dropped when its two rewards are equal (a tie says nothing about which is better),
when their difference is not above ``min_margin`` (if set), when the two texts are identical, or
when fewer than two responses have a reward. Empty answers are never paired (counted in
``empty_responses``). Random draws come from a generator seeded by the
seed and the row id, so the pairs do not depend on the order of the rows. The output is written
at once (atomically); statistics go to the console and to ``<output>.stats.json``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Sequence

from rlhf_workflow.config import PairsConfig
from rlhf_workflow.data.schemas import GENERATED_FIELDS
from rlhf_workflow.errors import UserError, config_key

DROP_REASONS = ("unscored", "tie", "margin", "identical")


def choose_all(rewards: Sequence[float | None], min_margin: float = 0.0) -> list[tuple[int, int]] | str:
    """Every ``(chosen, rejected)`` pair of scored responses whose rewards differ by more than
    ``min_margin`` (or by anything), or the reason there is none ("unscored", "tie", "margin")."""
    scored = [i for i, r in enumerate(rewards) if r is not None]
    if len(scored) < 2:
        return "unscored"
    ranked = sorted(scored, key=lambda i: (-rewards[i], i))  # type: ignore[operator]
    found = [(a, b) for k, a in enumerate(ranked) for b in ranked[k + 1:] if rewards[a] != rewards[b]]
    if not found:
        return "tie"
    kept = [(a, b) for a, b in found if min_margin <= 0 or rewards[a] - rewards[b] > min_margin]  # type: ignore[operator]
    return kept or "margin"


def choose_pair(rewards: Sequence[float | None], strategy: str, rng: random.Random,
                min_margin: float = 0.0) -> tuple[int, int] | str:
    """``(chosen, rejected)`` indices into the responses, or the reason no pair is taken
    ("unscored", "tie", "margin"). Among equal rewards the earlier response ranks first."""
    scored = [i for i, r in enumerate(rewards) if r is not None]
    if len(scored) < 2:
        return "unscored"
    ranked = sorted(scored, key=lambda i: (-rewards[i], i))  # type: ignore[operator]
    if strategy == "max_min":
        chosen, rejected = ranked[0], ranked[-1]
    elif strategy == "max_max":
        chosen, rejected = ranked[0], ranked[1]
    elif strategy == "max_random":
        chosen, rejected = ranked[0], rng.choice(ranked[1:])
    elif strategy == "random":
        a, b = rng.sample(scored, 2)
        chosen, rejected = (a, b) if (-rewards[a], a) <= (-rewards[b], b) else (b, a)  # type: ignore[operator]
    else:
        raise ValueError(f"unknown pair strategy {strategy!r}")
    gap = rewards[chosen] - rewards[rejected]  # type: ignore[operator]
    if gap == 0:
        return "tie"
    if min_margin > 0 and gap <= min_margin:
        return "margin"
    return chosen, rejected


def make_pairs(rows: Sequence[dict[str, Any]], strategy: str, *, seed: int = 0, min_margin: float = 0.0,
               max_pairs: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Pairs rows (the pairs format of docs/formats.md, plus the prompt row's metadata) and statistics of the pairs
    returned; with ``max_pairs``, a sample of at most that many (seeded by ``seed``, in file order)."""
    pairs: list[dict[str, Any]] = []
    sources: list[tuple[str, int | None, int | None]] = []  # per pair: its row, and its responses' token counts
    dropped = dict.fromkeys(DROP_REASONS, 0)
    empty_responses = 0
    for row in rows:
        rewards = row.get("rewards")
        if rewards is None:
            raise UserError(f"row {row['id']!r} has no rewards: run annotate on the generations first")
        # an empty answer (the model ended its turn at once) is left out: a pair needs text on both sides
        empty = [i for i, text in enumerate(row["responses"]) if not str(text).strip()]
        if empty:
            empty_responses += len(empty)
            rewards = [None if i in empty else r for i, r in enumerate(rewards)]
        if strategy == "all":
            picked: list[tuple[int, int]] | str = choose_all(rewards, min_margin)
        else:
            one = choose_pair(rewards, strategy, random.Random(f"{seed}\x00{row['id']}"), min_margin)
            picked = one if isinstance(one, str) else [one]
        if isinstance(picked, str):
            dropped[picked] += 1
            continue
        distinct = [(c, r) for c, r in picked if row["responses"][c] != row["responses"][r]]
        if not distinct:
            dropped["identical"] += 1
            continue
        metadata = {k: v for k, v in row.items() if k not in GENERATED_FIELDS and k not in ("id", "prompt")}
        tokens = row.get("response_tokens")

        def token_count(index: int) -> int | None:
            ok = isinstance(tokens, list) and index < len(tokens) and isinstance(tokens[index], int)
            return tokens[index] if ok else None  # type: ignore[index]

        for chosen, rejected in distinct:
            pair_id = f"{row['id']}/{chosen}-{rejected}" if strategy == "all" else row["id"]
            pairs.append({"id": pair_id, "prompt": row["prompt"], "chosen": row["responses"][chosen],
                          "rejected": row["responses"][rejected], "chosen_reward": rewards[chosen],
                          "rejected_reward": rewards[rejected], "chosen_index": chosen, "rejected_index": rejected,
                          **metadata})
            sources.append((row["id"], token_count(chosen), token_count(rejected)))

    made = len(pairs)
    if max_pairs and made > max_pairs:  # a seeded sample, in file order: the budget of a run
        keep = set(random.Random(seed).sample(range(made), max_pairs))
        pairs = [p for i, p in enumerate(pairs) if i in keep]
        sources = [s for i, s in enumerate(sources) if i in keep]

    def mean(values: Sequence[float]) -> float | None:
        return sum(values) / len(values) if values else None

    stats: dict[str, Any] = {
        "strategy": strategy, "rows": len(rows), "rows_used": len({row_id for row_id, _, _ in sources}),
        "pairs": len(pairs), "dropped": dropped, "empty_responses": empty_responses,
        "mean_chosen_reward": mean([p["chosen_reward"] for p in pairs]),
        "mean_rejected_reward": mean([p["rejected_reward"] for p in pairs]),
        "mean_chosen_chars": mean([len(p["chosen"]) for p in pairs]),
        "mean_rejected_chars": mean([len(p["rejected"]) for p in pairs]),
    }
    if made > len(pairs):
        stats["sampled_from"] = made
    if pairs and all(c is not None and r is not None for _, c, r in sources):
        stats["mean_chosen_tokens"] = mean([c for _, c, _ in sources])  # type: ignore[misc]
        stats["mean_rejected_tokens"] = mean([r for _, _, r in sources])  # type: ignore[misc]
    return pairs, stats


def run_pairs(config: PairsConfig) -> Path:
    """The `pairs` command (see the module docstring); returns the output path."""
    from rlhf_workflow.data.io import atomic_write_text, read_rows, row_to_dict, write_jsonl
    from rlhf_workflow.data.outputs import OutputLock, stats_path
    from rlhf_workflow.data.schemas import ScoredRow

    rows = [row_to_dict(r) for r in read_rows(config.input, ScoredRow)]  # a row without rewards: file:line error
    pairs, stats = make_pairs(rows, config.strategy, seed=config.seed, min_margin=config.min_margin,
                              max_pairs=config.max_pairs)
    output = Path(config.output)
    with OutputLock(output, directory=False).acquire():
        write_jsonl(output, pairs)
        atomic_write_text(stats_path(output), json.dumps(stats, indent=2) + "\n")
    print(format_stats(stats) + f" -> {output}")
    if not pairs:
        raise UserError(f"no pairs from {config.input}: every row was dropped ({_drops(stats)}); with a "
                        f"programmatic judge try more samples per prompt ({config_key('sampling.n')}) or another "
                        f"{config_key('strategy')}")
    return output


def _drops(stats: dict[str, Any]) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in stats["dropped"].items() if count) or "none"


def format_stats(stats: dict[str, Any]) -> str:
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    used = stats.get("rows_used", stats["pairs"])
    line = (f"pairs ({stats['strategy']}): {stats['pairs']} pairs from {used} of {stats['rows']} rows; rows dropped: "
            f"{_drops(stats)}; "
            f"mean reward chosen {fmt(stats['mean_chosen_reward'])} vs rejected {fmt(stats['mean_rejected_reward'])}; "
            f"mean length chosen {fmt(stats['mean_chosen_chars'])} vs rejected {fmt(stats['mean_rejected_chars'])} chars")
    if stats.get("sampled_from"):
        line += f"; a seeded sample of {stats['pairs']} of the {stats['sampled_from']} pairs made (max_pairs)"
    if stats.get("empty_responses"):
        line += f"; {stats['empty_responses']} empty answers left out"
    if "mean_chosen_tokens" in stats:
        line += f" ({fmt(stats['mean_chosen_tokens'])} vs {fmt(stats['mean_rejected_tokens'])} tokens)"
    return line
