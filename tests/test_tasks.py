"""Built-in tasks: every constraint checker on hand-written responses, the arithmetic judge, and
deterministic prompt generation with disjoint splits."""

from __future__ import annotations

import json

import pytest

from rlhf_workflow.cli import main
from rlhf_workflow.tasks import arithmetic, get_task, instructions
from rlhf_workflow.tasks.instructions import check, count_sentences


@pytest.mark.parametrize("constraint, response, expected", [
    ({"kind": "include_word", "word": "blue"}, "The sky is Blue today.", True),  # any case
    ({"kind": "include_word", "word": "blue"}, "A bluebird sang.", False),  # whole words only
    ({"kind": "include_word", "word": "blue"}, "It was blue!", True),  # punctuation after the word
    ({"kind": "include_word", "word": "blue"}, "Nothing here.", False),
    ({"kind": "avoid_word", "word": "the"}, "A cat sat there.", True),  # 'there' is not 'the'
    ({"kind": "avoid_word", "word": "the"}, "The cat sat.", False),
    ({"kind": "avoid_word", "word": "the"}, "", False),  # an empty answer satisfies nothing
    ({"kind": "no_commas", }, "One two three.", True),
    ({"kind": "no_commas"}, "One, two.", False),
    ({"kind": "lowercase"}, "all quiet here, 42.", True),
    ({"kind": "lowercase"}, "All quiet.", False),
    ({"kind": "lowercase"}, "123 !", False),  # no letters at all
    ({"kind": "max_words", "n": 3}, "one two three", True),
    ({"kind": "max_words", "n": 3}, "one two three four", False),
    ({"kind": "max_words", "n": 3}, "   ", False),
    ({"kind": "end_with", "char": "!"}, "What a day!  \n", True),  # trailing spaces do not count
    ({"kind": "end_with", "char": "!"}, "What a day.", False),
    ({"kind": "start_with", "word": "Yes"}, "yes, of course.", True),  # case does not matter
    ({"kind": "start_with", "word": "Yes"}, "\"Yes\" she said.", True),  # a quote before it is fine
    ({"kind": "start_with", "word": "Yes"}, "Yesterday it rained.", False),
    ({"kind": "start_with", "word": "Yes"}, "Well, yes.", False),
    ({"kind": "sentences", "n": 2}, "It rains. It pours!", True),
    ({"kind": "sentences", "n": 2}, "It rains... It pours? Yes.", False),  # three
    ({"kind": "sentences", "n": 1}, "Pi is 3.14 roughly", True),  # a decimal point, no final period
    ({"kind": "sentences", "n": 1}, "One. Two.", False),
])
def test_constraint_checkers(constraint, response, expected):
    assert check(constraint, response) is expected


def test_sentence_count_edge_cases():
    assert count_sentences("") == 0
    assert count_sentences("...") == 0
    assert count_sentences("Hello world") == 1
    assert count_sentences("Wait... what?! Really.") == 3


def test_instructions_judge_is_the_fraction_satisfied():
    row = {"id": "x", "constraints": [{"kind": "include_word", "word": "blue"}, {"kind": "no_commas"},
                                      {"kind": "end_with", "char": "!"}]}
    assert instructions.judge(row, "Blue skies!") == 1.0
    assert instructions.judge(row, "Blue, skies!") == pytest.approx(2 / 3)
    assert instructions.judge(row, "grey, skies") == 0.0
    with pytest.raises(ValueError, match="no 'constraints'"):
        instructions.judge({"id": "y"}, "text")
    # the noisy judge keeps most scores and is deterministic
    rows = [{"id": str(i), "constraints": row["constraints"]} for i in range(200)]
    noisy = [instructions.noisy_judge(r, "Blue skies!") for r in rows]
    assert noisy == [instructions.noisy_judge(r, "Blue skies!") for r in rows]
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


@pytest.mark.parametrize("task", ["instructions", "arithmetic"])
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


def test_instruction_prompts_carry_one_to_three_compatible_constraints():
    rows = instructions.prompts("train", 300, seed=0)
    counts = {len(r["constraints"]) for r in rows}
    assert counts == {1, 2, 3}
    for row in rows:
        kinds = [c["kind"] for c in row["constraints"]]
        assert len(kinds) == len(set(kinds))
        words = {c.get("word") for c in row["constraints"] if c["kind"] in ("include_word", "avoid_word")}
        assert len(words) == sum(k in ("include_word", "avoid_word") for k in kinds)
        for constraint in row["constraints"]:
            assert instructions.describe(constraint) in row["prompt"]
    single = instructions.prompts("train", 50, seed=0, max_constraints=1)
    assert all(len(r["constraints"]) == 1 for r in single)


def test_prompts_command(tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    assert main(["prompts", "task=arithmetic", "split=eval", "count=7", "options.digits=2", f"output={out}"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 7 and all(r["task"] == "arithmetic" and isinstance(r["answer"], int) for r in rows)
    assert main(["prompts", "task=arithmetic", "count=3", "options.colour=red", f"output={out}"]) == 2
    assert "task arithmetic" in capsys.readouterr().err
