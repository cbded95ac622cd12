"""`arithmetic`: questions with a numeric answer; the judge checks the final number.

    What is 7 + 5? Answer with the number.

Rows carry ``answer`` (an int). `judge` gives 1.0 when the last number in the response equals the
answer (so "7 + 5 = 12" and "The answer is 12." are right, "12 or 13" is not) and 0.0 otherwise,
including when the response holds no number. Thousands separators ("1,200") are read as one number.
"""

from __future__ import annotations

import random
import re
from typing import Any

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
TEMPLATES = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?", "Calculate {a} {op} {b}."]
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?![\d])|-?\d+(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (digits; '1,200' is 1200; a trailing '.' ends a sentence), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    return float(found[-1].replace(",", ""))


def prompts(split: str, count: int, seed: int = 0, *, digits: int = 1, operations: str = "+") -> list[dict[str, Any]]:
    """``count`` distinct question rows of ``split``: ``{"id", "prompt", "task": "arithmetic", "answer"}``.
    Operands have ``digits`` digits; ``operations`` is a string of '+', '-', '*'. The split follows
    the expression, so one sum never appears in both splits under two phrasings."""
    from rlhf_workflow.tasks import draw_split

    rng = random.Random(f"arithmetic:{seed}")
    low, high = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1

    def draw() -> tuple[str, dict[str, Any]]:
        a, b, op = rng.randint(low, high), rng.randint(low, high), rng.choice(operations)
        text = rng.choice(TEMPLATES).format(a=a, op=op, b=b) + " Answer with the number."
        return f"{a}{op}{b}", {"prompt": text, "answer": OPERATIONS[op](a, b)}

    return draw_split("arithmetic", split, count, draw)


def judge(row: dict[str, Any], response: str) -> float:
    """1.0 if the response's last number is the row's ``answer``, else 0.0."""
    if "answer" not in row:
        raise ValueError(f"row {row.get('id')!r} has no 'answer' (not an arithmetic question)")
    value = last_number(response)
    return 1.0 if value is not None and value == float(row["answer"]) else 0.0
