"""Built-in tasks: the instructions judge (IFEval's checkers, tested in test_ifeval.py), the arithmetic
judge, and deterministic prompt generation with disjoint splits."""

from __future__ import annotations

import json

import pytest

from rlhf_workflow.cli import main
from rlhf_workflow.tasks import arithmetic, get_task, instructions


def test_instructions_judge_is_ifevals_strict_fraction_followed():
    row = {"id": "x", "instruction_id_list": ["keywords:existence", "punctuation:no_comma", "startend:end_checker"],
           "kwargs": [{"keywords": ["blue"]}, {}, {"end_phrase": "That is all."}]}
    assert instructions.judge(row, "Blue skies. That is all.") == 1.0
    assert instructions.judge(row, "Blue, skies. That is all.") == pytest.approx(2 / 3)
    assert instructions.judge(row, "grey, skies") == 0.0
    with pytest.raises(ValueError, match="no 'instruction_id_list'"):
        instructions.judge({"id": "y"}, "text")
    # the noisy judge keeps most scores and is deterministic
    rows = [{**row, "id": str(i)} for i in range(200)]
    noisy = [instructions.noisy_judge(r, "Blue skies. That is all.") for r in rows]
    assert noisy == [instructions.noisy_judge(r, "Blue skies. That is all.") for r in rows]
    assert 0.7 < sum(v == 1.0 for v in noisy) / len(noisy) < 0.9


@pytest.mark.parametrize("response, expected", [
    ("12", 1.0), ("The answer is 12.", 1.0), ("7 + 5 = 12", 1.0), ("It is 12 or maybe 13", 0.0),
    ("13", 0.0), ("twelve", 0.0), ("", 0.0), ("12.0", 1.0), ("-12", 0.0),
])
def test_arithmetic_judge(response, expected):
    assert arithmetic.judge({"id": "q", "answer": 12}, response) == expected


def test_arithmetic_reads_thousands_and_negatives():
    assert arithmetic.last_number("The total is 1,200.") == 1200
    assert arithmetic.judge({"answer": -3}, "2 - 5 = -3") == 1.0
    with pytest.raises(ValueError, match="no 'answer'"):
        arithmetic.judge({"id": "q"}, "3")


@pytest.mark.parametrize("task", ["ifeval", "instructions", "arithmetic"])
def test_prompts_are_deterministic_and_splits_disjoint(task):
    module = get_task(task)
    train, again = module.prompts("train", 120, seed=3), module.prompts("train", 120, seed=3)
    assert train == again and len({r["prompt"] for r in train}) == 120
    assert module.prompts("train", 120, seed=4) != train
    heldout, dev = module.prompts("eval", 60, seed=3), module.prompts("dev", 30, seed=3)
    for a, b in ((train, heldout), (train, dev), (dev, heldout)):
        assert not {r["prompt"] for r in a} & {r["prompt"] for r in b}
        assert not {r["id"] for r in a} & {r["id"] for r in b}
    with pytest.raises(ValueError, match="split must be one of"):
        module.prompts("test", 3)
    for row in train[:20]:  # every row can be judged
        assert 0.0 <= module.judge(row, "A quiet blue answer: 12.") <= 1.0


def test_instruction_prompts_carry_one_to_three_of_the_demo_types():
    rows = instructions.prompts("train", 300, seed=0)
    assert {len(r["instruction_id_list"]) for r in rows} == {1, 2, 3}
    assert {t for r in rows for t in r["instruction_id_list"]} == set(instructions.TYPES)
    assert all(r["task"] == "instructions" and r["id"].startswith("instr-train-") for r in rows)
    single = instructions.prompts("train", 50, seed=0, max_instructions=1, types=["punctuation:no_comma"])
    assert all(r["instruction_id_list"] == ["punctuation:no_comma"] for r in single)
    with pytest.raises(ValueError, match="unknown instruction type 'no_commas'"):
        instructions.prompts("train", 5, types=["no_commas"])


def test_prompts_command(tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    assert main(["prompts", "task=arithmetic", "split=eval", "count=7", "options.digits=2", f"output={out}"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 7 and all(r["task"] == "arithmetic" and isinstance(r["answer"], int) for r in rows)
    assert main(["prompts", "task=arithmetic", "count=3", "options.colour=red", f"output={out}"]) == 2
    assert "task arithmetic" in capsys.readouterr().err
