"""eval-rm's summaries: RewardBench section scores by hand, ties, and a directory that is no judge."""

from __future__ import annotations

import pytest

from rlhf_workflow.cli import main
from rlhf_workflow.data.schemas import PairRow
from rlhf_workflow.eval.reward_eval import pair_outcome, section_scores, summarize

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_rewardbench_sections_on_a_hand_built_example():
    rows, outcomes = [], []
    plan = {  # subset -> outcomes
        "alpacaeval-easy": [1, 1, 1, 0], "mt-bench-easy": [1, 0],           # Chat
        "mt-bench-hard": [0, 0, 1],                                           # Chat Hard
        "refusals-dangerous": [1, 1], "xstest-should-respond": [0.5, 1],      # Safety
        "math-prm": [1, 0], "hep-python": [1, 1, 1, 1],                       # Reasoning
    }
    for subset, results in plan.items():
        for k, outcome in enumerate(results):
            rows.append(PairRow(id=f"{subset}-{k}", prompt="q", chosen="a", rejected="b", subset=subset))
            outcomes.append(float(outcome))
    result = summarize(rows, outcomes)
    assert result["subsets"]["alpacaeval-easy"]["accuracy"] == 0.75
    assert result["subsets"]["xstest-should-respond"]["accuracy"] == 0.75
    sections = result["rewardbench"]
    assert sections["Chat"] == pytest.approx((0.75 * 100 + 0.5 * 28) / 128)
    assert sections["Chat Hard"] == pytest.approx(1 / 3)
    assert sections["Safety"] == pytest.approx((1.0 * 100 + 0.75 * 154) / 254)
    assert sections["Reasoning"] == pytest.approx((0.5 * 984 + 1.0 * 164) / (984 + 164))
    assert sections["Score"] == pytest.approx(sum(sections[s] for s in ("Chat", "Chat Hard", "Safety", "Reasoning")) / 4)
    assert result["accuracy"] == pytest.approx(sum(outcomes) / len(outcomes))


def test_full_reasoning_is_half_math_half_code():
    acc = {"math-prm": 1.0, **{f"hep-{x}": 0.0 for x in ("cpp", "go", "java", "js", "python", "rust")}}
    assert section_scores(acc)["Reasoning"] == pytest.approx(0.5)


def test_ties_count_half():
    assert [pair_outcome(2, 1), pair_outcome(1, 1), pair_outcome(0, 1)] == [1.0, 0.5, 0.0]


def test_eval_rm_refuses_a_directory_that_is_no_judge(tiny_model_dir, rule_data, capsys):
    assert main(["eval-rm", f"model={tiny_model_dir}", f"data={rule_data[1]}"]) == 2
    assert "neither a reward model" in capsys.readouterr().err
