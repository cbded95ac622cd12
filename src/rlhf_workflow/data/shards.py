"""Rows keyed by id, written by several processes at once and merged into one file.

A stage that runs under ``accelerate launch`` / ``torchrun`` gives each process its own shard file
``<output>.rank<r>.jsonl`` to append to; when all are done the main process appends the shards'
rows to the output (ids already there are skipped) and deletes them. Shards left by a killed
run, with any number of processes, are merged the same way before the next run reads what is done.

`run_sharded` is the skeleton of such a stage (generate, annotate): skip the rows already done,
give each process its share of the rest, append as rows finish, merge once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from rlhf_workflow.data.io import JsonlAppender, iter_jsonl
from rlhf_workflow.data.outputs import OutputLock, check_fingerprint, shard_path, shard_paths

log = logging.getLogger(__name__)


def merge_shards(output: Path) -> int:
    """Append every shard's rows to ``output`` (ids already there are skipped), delete the shards;
    returns the number of rows moved."""
    shards = shard_paths(output)
    if not shards:
        return 0
    moved = 0
    with JsonlAppender(output) as sink:
        for shard in shards:
            JsonlAppender(shard).close()  # cut a line torn by a crash before reading
            moved += sink.append(row for _, row in iter_jsonl(shard, allow_empty=True))
    for shard in shards:
        shard.unlink()
    return moved


def done_ids(path: Path) -> set[str]:
    """Ids of the rows in ``path`` (empty when it does not exist)."""
    if not path.exists():
        return set()
    return {row["id"] for _, row in iter_jsonl(path, allow_empty=True) if isinstance(row.get("id"), str)}


def open_shard(state: Any, output: Path) -> tuple[JsonlAppender, set[str]]:
    """Start a stage that every process appends to: merge an earlier run's shards, open this
    process's sink (the output itself with one process), and return it with the ids already done."""
    if state.is_main_process:
        merge_shards(output)  # rows of an earlier run's processes, before anyone reads what is done
    state.wait_for_everyone()
    sink = JsonlAppender(output if state.num_processes == 1 else shard_path(output, state.process_index))
    state.wait_for_everyone()
    return sink, done_ids(output)


def close_shards(state: Any, output: Path, stats: Any) -> list[Any] | None:
    """End such a stage: gather each process's ``stats``, merge the shards into ``output``, and return
    every process's stats on the main process (None on the others), once the merged output is complete."""
    from accelerate.utils import gather_object

    everything = gather_object([stats]) if state.num_processes > 1 else [stats]
    state.wait_for_everyone()
    if state.is_main_process:
        merge_shards(output)
    state.wait_for_everyone()
    return everything if state.is_main_process else None


RowT = TypeVar("RowT")
StatsT = TypeVar("StatsT")


class Discard:
    """The sink of a process whose rows another process of its engine group writes."""

    def append(self, rows: Any) -> int:
        return sum(1 for _ in rows)

    def close(self) -> None:
        pass


def run_sharded(name: str, state: Any, output: Path, rows: Sequence[RowT],
                work: Callable[[list[RowT], Any], StatsT], *, settings: dict[str, Any], force: bool = False,
                group_size: int = 1) -> tuple[list[RowT], list[StatsT]] | None:
    """Run a resumable, sharded stage over ``rows`` (objects with an ``id``) into ``output``.

    The output is locked for the stage's life, and ``settings`` (what determines the rows) must be
    those its rows were made with (`data.outputs.check_fingerprint`; ``force`` starts afresh).
    ``work(mine, sink)`` handles this process's share of the rows not yet in ``output``, appends its
    output rows to ``sink`` as they finish, and returns its statistics (it is called with an empty
    share too). With W processes the share is every W-th row; with ``group_size`` k > 1 (an engine
    over k GPUs, one process each: `processes.engine_group`) the W / k groups take every (W / k)-th
    row, every member of a group gets the group's share, and only member 0's rows and statistics
    are kept. Returns, on the main process once the merged output is complete, the rows that were
    still to do and the statistics of every process that wrote; None on the others.
    """
    from rlhf_workflow.processes import on_main

    with OutputLock(output, directory=False).acquire(state):
        on_main(state, lambda: check_fingerprint(output, settings, force=force, what=f"the rows of `{name}`"))
        return _run_shards(name, state, output, rows, work, group_size)


def _run_shards(name: str, state: Any, output: Path, rows: Sequence[RowT], work: Callable[[list[RowT], Any], StatsT],
                group_size: int) -> tuple[list[RowT], list[StatsT]] | None:
    from rlhf_workflow.processes import engine_group, local_world_size

    sink, done = open_shard(state, output)
    todo = [row for row in rows if row.id not in done]  # type: ignore[attr-defined]
    if state.num_processes == 1:
        index, count, writes = 0, 1, True
    else:
        group = engine_group(state.process_index, state.num_processes, state.local_process_index,
                             local_world_size(state), group_size)
        index, count, writes = group.index, group.count, group.writes
    if state.is_main_process:
        log.info("%s: %d rows, %d already in %s, %d to do (%d process%s%s)", name, len(rows), len(rows) - len(todo),
                 output, len(todo), state.num_processes, "es" if state.num_processes > 1 else "",
                 f", {count} groups of {group_size}" if state.num_processes > 1 and group_size > 1 else "")
    mine = todo[index::count]
    try:
        stats = work(mine, sink if writes else Discard())
    finally:
        sink.close()
    everything = close_shards(state, output, (writes, stats))
    return None if everything is None else (todo, [s for kept, s in everything if kept])
