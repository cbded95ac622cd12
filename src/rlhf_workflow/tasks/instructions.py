"""`instructions`: the demo's task — IFEval prompts of the instruction types a small model follows sometimes.

    Describe the moon. In your entire response, refrain from the use of any commas.

A prompt is a request about a topic and one to three IFEval instructions, worded by IFEval's own
checkers and stored in IFEval's schema (``instruction_id_list``, ``kwargs``): it is the `ifeval`
task (`rlhf_workflow.tasks.ifeval`) restricted to `TYPES`. The judge is IFEval's checkers: the
fraction of the prompt's instructions a response follows, strictly. So the demo's gold metric
comes from code this project did not write.

`TYPES` are the IFEval types SmolLM2-135M-Instruct follows in at least 10 % and at most 70 % of its
answers at temperature 1 with 48 new tokens (measured by ``experiments/ifeval_rates.py``; the
figures are in docs/guide/tasks.md): a type it never follows, or always does, gives the reward model no
pair to learn from.

`noisy_judge` replaces 20 % of the judge's scores by a uniform random number (deterministic for a
given prompt and response), to simulate noisy human feedback.
"""

from __future__ import annotations

import hashlib
from typing import Any

from rlhf_workflow.tasks import ifeval

TYPES = [  # strict rate of SmolLM2-135M-Instruct, 64 answers each (experiments/ifeval_rates.py)
    "length_constraints:number_sentences",  # 0.69
    "length_constraints:number_words",  # 0.67
    "keywords:frequency",  # 0.53
    "keywords:letter_frequency",  # 0.42
    "keywords:forbidden_words",  # 0.39
    "change_case:capital_word_frequency",  # 0.36
    "detectable_content:number_placeholders",  # 0.30
    "punctuation:no_comma",  # 0.28
    "detectable_format:number_bullet_lists",  # 0.16
    "keywords:existence",  # 0.12
    "detectable_content:postscript",  # 0.12
    "detectable_format:number_highlighted_sections",  # 0.11
]


def prompts(split: str, count: int, seed: int = 0, *, min_instructions: int = 1, max_instructions: int = 3,
            types: list[str] | None = None) -> list[dict[str, Any]]:
    """``count`` distinct prompt rows of ``split`` ("train", "dev" or "eval"), deterministic for a
    seed, in IFEval's schema: ``{"id", "key", "prompt", "instruction_id_list", "kwargs", "task"}``."""
    return ifeval.prompts(split, count, seed, min_instructions=min_instructions, max_instructions=max_instructions,
                          types=types or TYPES, task="instructions")


def judge(row: dict[str, Any], response: str) -> float:
    """The fraction of the row's instructions ``response`` follows, by IFEval's checkers (strict)."""
    return ifeval.judge(row, response)


NOISE = 0.2


def noisy_judge(row: dict[str, Any], response: str) -> float:
    """`judge`, except that for 20 % of (prompt, response) pairs the score is a uniform random number
    (chosen by a hash, so the same response always gets the same score): noisy human feedback."""
    digest = hashlib.sha1(f"{row.get('id')}\x00{response}".encode("utf-8")).digest()
    if int.from_bytes(digest[:4], "big") / 2**32 < NOISE:
        return int.from_bytes(digest[4:8], "big") / 2**32
    return judge(row, response)
