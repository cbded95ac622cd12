"""The `annotate` command: a reward for every response of a generations file.

    rlhf-workflow annotate input=gen.jsonl output=scored.jsonl judge.type=reward_model judge.path=runs/rm/model

Each output row is the input row plus ``rewards`` (one per response; null where the judge could
not score it, with the reason in ``reward_errors``: response index -> message). With a length
penalty the raw judge scores are kept in ``raw_rewards`` and ``rewards`` holds r − λ·len.
Rows are appended as they are scored and a rerun skips rows already in the output (when the
judge, length penalty and template are those recorded in ``<output>.settings.json``); under
several processes each scores every W-th row and the shards are merged (`data.shards`).
A judge that fails on every one of the first responses stops annotate with its first error
instead of writing a file of nulls.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rlhf_workflow.config import AnnotateConfig
from rlhf_workflow.errors import UserError, config_key

logger = logging.getLogger(__name__)

FAIL_FAST = 16  # responses: when the judge has failed on all of the first ones, stop


def length_penalised(rewards: list[float | None], lengths: list[float], coef: float) -> list[float | None]:
    """r_i − λ·len_i for each scored response (None stays None): the paper's length-bias control."""
    return [None if r is None else r - coef * length for r, length in zip(rewards, lengths)]


def response_lengths(row: dict[str, Any], unit: str, where: str) -> list[float]:
    """Lengths of a row's responses in tokens (generate's ``response_tokens``) or characters."""
    if unit == "characters":
        return [float(len(r)) for r in row["responses"]]
    tokens = row.get("response_tokens")
    if not isinstance(tokens, list) or len(tokens) != len(row["responses"]) or \
            not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise UserError(f"{where}: row {row['id']!r}: field 'response_tokens': a length penalty in tokens needs one "
                        f"token count per response (written by generate); use {config_key('length_penalty.unit')}=characters")
    return [float(t) for t in tokens]


@dataclass
class AnnotateStats:
    """What one process's share of `annotate` scored (gathered from every process to the main one)."""

    scored: int = 0  # responses with a reward
    unscored: int = 0  # responses the judge could not score (null, with a reason in reward_errors)
    total: float = 0.0  # the sum of the rewards, for their mean
    comparisons: int = 0  # pairwise comparisons a preference model made
    first_error: tuple[str, int, str] | None = None  # (row id, response index, why) of the first unscored


def run_annotate(config: AnnotateConfig, *, force: bool = False, progress: bool = True) -> Path:
    """The `annotate` command (see the module docstring); returns the output path. ``force``: start an
    output whose rows were made with other settings afresh (the old file kept as a backup)."""
    from rlhf_workflow.data.io import read_rows, row_to_dict
    from rlhf_workflow.data.schemas import GenerationRow
    from rlhf_workflow.data.shards import run_sharded
    from rlhf_workflow.models.prompt_states import model_identity, shared
    from rlhf_workflow.online.judges import RewardModelJudge, make_judge
    from rlhf_workflow.processes import process_state

    state = process_state()
    output = Path(config.output)
    rows = read_rows(config.input, GenerationRow)
    penalty = config.length_penalty
    start = time.perf_counter()

    def work(mine: list[GenerationRow], sink: Any) -> AnnotateStats:
        lengths = {r.id: response_lengths(row_to_dict(r), penalty.unit, config.input) for r in mine} if penalty.coef else {}
        stats = AnnotateStats()
        if not mine:
            return stats
        judge = make_judge(config.judge, device=state.device, chat_template=config.apply_chat_template)
        if config.keep_prompt_states and isinstance(judge, RewardModelJudge):
            judge.scorer.prompt_states = shared(model_identity(config.judge.path,
                                                               [config.judge.dtype, str(state.device)]))
        bar = tqdm(total=len(mine), desc="annotate", unit="row", disable=not (progress and state.is_main_process))
        try:
            for begin in range(0, len(mine), config.rows_per_write):
                chunk = [row_to_dict(r) for r in mine[begin : begin + config.rows_per_write]]
                scores = judge.score(chunk)
                out = []
                for row, rewards, errors in zip(chunk, scores.rewards, scores.errors):
                    row = {k: v for k, v in row.items() if k not in ("rewards", "raw_rewards", "reward_errors")}
                    for index, message in errors.items():
                        if stats.first_error is None:
                            stats.first_error = (row["id"], index, message)
                        logger.warning("row %s, response %d: no reward: %s", row["id"], index, message)
                    stats.scored += sum(r is not None for r in rewards)
                    stats.unscored += sum(r is None for r in rewards)
                    stats.total += sum(r for r in rewards if r is not None)
                    first = stats.first_error
                    if stats.scored == 0 and stats.unscored >= FAIL_FAST and first is not None:
                        raise UserError(f"the judge ({judge.name}) failed on all of the first {stats.unscored} responses; "
                                        f"first, row {first[0]!r} response {first[1]}: {first[2]}")
                    if penalty.coef:
                        row["raw_rewards"] = rewards
                        rewards = length_penalised(rewards, lengths[row["id"]], penalty.coef)
                    row["rewards"] = rewards
                    if errors:
                        row["reward_errors"] = {str(i): m for i, m in sorted(errors.items())}
                    out.append(row)
                sink.append(out)
                bar.update(len(chunk))
        finally:
            bar.close()
        stats.comparisons = judge.comparisons
        return stats

    result = run_sharded("annotate", state, output, rows, work, settings=config.row_settings(), force=force)
    if result is None:  # not the main process
        return output
    todo, everything = result
    seconds = time.perf_counter() - start
    scored = sum(s.scored for s in everything)
    unscored = sum(s.unscored for s in everything)
    total = sum(s.total for s in everything)
    comparisons = sum(s.comparisons for s in everything)
    first_error = next((s.first_error for s in everything if s.first_error is not None), None)
    if not todo:
        print(f"annotate: all {len(rows)} rows are already in {output}")
        return output
    mean = total / scored if scored else math.nan
    line = (f"annotate: {scored} responses of {len(todo)} rows scored by {config.judge.type} in {seconds:.1f} s, "
            f"mean raw reward {mean:.4f}")
    if comparisons:
        line += f"; {comparisons} pairwise comparisons ({comparisons / len(todo):.1f} per prompt, each in both orders)"
    print(line + f" -> {output}")
    if unscored:
        assert first_error is not None
        print(f"annotate: {unscored} responses got no reward (null in the output, reason in reward_errors); first, "
              f"row {first_error[0]!r} response {first_error[1]}: {first_error[2]}")
    return output
