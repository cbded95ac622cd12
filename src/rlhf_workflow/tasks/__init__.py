"""Built-in tasks: prompts whose responses a program can grade (the demo's simulated human).

A task is a module with two functions:

    prompts(split, count, seed=0, **options) -> list[dict]   # rows {"id", "prompt", ...metadata}
    judge(row, response) -> float                            # the grade of one response

``split`` is "train", "dev" or "eval"; no two share a prompt. "eval" is the held-out split every
policy is scored on; "dev" is for tuning a recipe (``prompts.eval_split: dev``) without looking at
"eval" (tuning on the held-out prompts would make its scores optimistic). The metadata a judge needs (the
constraints, the answer) travels in the prompt row, through generation and annotation, to the
judge. Use a task's judge wherever a function judge is taken (``judge.function``,
``eval.gold_function``): ``rlhf_workflow.tasks.instructions:judge``. Your own task is any module
(or ``file.py``) with such a ``judge``, and a prompts file you write yourself.

* `ifeval`       — prompts in IFEval's schema with any of its 25 instruction types; judge: IFEval's
  own checkers, the fraction of instructions followed (strict; `loose_judge`). Also the judge of a
  prompts file you bring in that schema (IFEval's 541 prompts, RLVR training prompts).
* `instructions` — the demo's task: `ifeval` restricted to the types SmolLM2-135M follows
  sometimes; the same judge (`noisy_judge`: with 20 % random scores)
* `arithmetic`   — "What is 7 + 5?"; judge: the last number in the response is the answer
"""

from __future__ import annotations

import hashlib
import importlib
from types import ModuleType
from typing import Any, Callable

from rlhf_workflow.errors import UserError

TASKS = {"ifeval": "rlhf_workflow.tasks.ifeval", "instructions": "rlhf_workflow.tasks.instructions",
         "arithmetic": "rlhf_workflow.tasks.arithmetic"}


SPLITS = ("train", "dev", "eval")


def split_of(key: str, eval_share: float = 0.2, dev_share: float = 0.1) -> str:
    """'eval', 'dev' or 'train' by a hash of ``key`` (the prompt, or what makes it): the splits
    never share one."""
    bucket = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:4], "big") / 2**32
    if bucket < eval_share:
        return "eval"
    return "dev" if bucket < eval_share + dev_share else "train"


def draw_split(task: str, split: str, count: int, draw: Callable[[], tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """``count`` rows of ``split`` with distinct prompts, from ``draw() -> (split key, row)`` called
    until enough rows fall in the split; ids ``<task>-<split>-<k>``, rows get ``"task"``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    prefix = {"instructions": "instr", "arithmetic": "arith"}.get(task, task)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _ in range(200 * count + 1000):
        if len(rows) == count:
            return rows
        key, row = draw()
        if row["prompt"] in seen or split_of(key) != split:
            continue
        seen.add(row["prompt"])
        rows.append({"id": f"{prefix}-{split}-{len(rows)}", "prompt": row["prompt"], "task": task,
                     **{k: v for k, v in row.items() if k != "prompt"}})
    if len(rows) == count:
        return rows
    raise ValueError(f"cannot make {count} distinct {split} prompts of task {task} with these options")


def get_task(name: str) -> ModuleType:
    """The module of a built-in task."""
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name])


def run_make_prompts(config: object) -> None:
    """The `prompts` command: write a task's prompts of one split to a JSON Lines file."""
    from rlhf_workflow.data.io import write_jsonl
    from rlhf_workflow.data.outputs import OutputLock

    task = get_task(config.task)  # type: ignore[attr-defined]
    try:
        rows = task.prompts(config.split, config.count, config.seed, **config.options)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise UserError(f"task {config.task}: {exc}") from None  # type: ignore[attr-defined]
    with OutputLock(config.output, directory=False).acquire():  # type: ignore[attr-defined]
        count = write_jsonl(config.output, rows)  # type: ignore[attr-defined]
    print(f"prompts: {count} {config.split} prompts of task {config.task} -> {config.output}")  # type: ignore[attr-defined]
