"""eval-rm on RewardBench 2, RM-Bench and JudgeBench files: each benchmark's official rules on hand-built
scores whose results are worked out by hand, format detection, and the files end to end with a reward
model and a preference model."""

from __future__ import annotations

import json
import math

import pytest
from conftest import rule_pairs, write_jsonl

from rlhf_workflow.cli import main
from rlhf_workflow.eval import benchmarks as bm

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


# --------------------------------------------------------------------------- RewardBench 2


@pytest.mark.parametrize("scores, chosen, expected", [
    ([3, 1, 2, 0], 1, 1.0),
    ([3, 3, 1, 0], 1, 0.5),        # chosen tied with one rejected at the top: half the credit
    ([3, 3, 3, 0], 1, 1 / 3),
    ([1, 3, 2, 0], 1, 0.0),
    ([2, 5, 5, 1], 2, 0.5),        # two chosen; the tied top is one chosen, one rejected
])
def test_best_of_n_row(scores, chosen, expected):
    assert bm.best_of_n_result(scores, chosen) == pytest.approx(expected)


def ties_rows():
    """Three prompts, each with a ref row (one correct answer first) and a tied row (two correct)."""
    return [
        ("ref:1", [5, 1, 2], 1), ("tied:1", [4, 3, 1, 0], 2),     # margins 3 and 2, spread 1
        ("ref:2", [1, 2], 1), ("tied:2", [3, 3, 4], 2),           # margins -1 and -1, spread 0
        ("ref:3", [2, 2], 1), ("tied:3", [2, 2, 2], 2),           # margins 0 and 0, spread 0
    ]


def test_ties_score_by_hand():
    result = bm.ties_score(ties_rows())
    assert result["ref_accuracy"] == pytest.approx(1 / 3) and result["tied_accuracy"] == pytest.approx(1 / 3)
    # tied margin > spread: prompt 1 only (2 > 1; -1 > 0 no; 0 > 0 no); with min(ref, tied) margins the same
    assert result["correctness_preferred"] == pytest.approx(1 / 3)
    assert result["correctness_preferred_hard"] == pytest.approx(1 / 3)
    # tanh(min margin / spread - 1): tanh(2/1 - 1), tanh(-inf) = -1, 0/0 -> NaN -> 0
    margin = (math.tanh(1.0) - 1.0 + 0.0) / 3
    assert result["margin"] == pytest.approx(margin)
    assert result["score"] == pytest.approx(0.3 / 3 + 0.3 / 3 + 0.2 / 3 + 0.2 / 3 + 0.01 * margin)


def test_rewardbench2_subsets_and_overall():
    rows, scores = [], []
    plan = {"Factuality": [[3, 1, 2, 0], [0, 1, 2, 3]], "Focus": [[2, 2, 1, 0]], "Math": [[1, 0, 0, 0]]}
    for subset, groups in plan.items():
        for k, group in enumerate(groups):
            rows.append(bm.BestOfNRow(id=f"{subset}{k}", prompt="q", chosen=["c"], rejected=["a", "b", "d"], subset=subset))
            scores.append(group)
    for row_id, group, correct in ties_rows():
        rows.append(bm.BestOfNRow(id=row_id, prompt="q", chosen=["c"] * correct,
                                  rejected=["r"] * (len(group) - correct), subset="Ties"))
        scores.append(group)
    rows.append(bm.BestOfNRow(id="long", prompt="q", chosen=["c"], rejected=["r"], subset="Math"))
    scores.append(None)  # a response too long for the model
    result = bm.rewardbench2_summary(rows, scores)
    subsets = result["subsets"]
    assert subsets["Factuality"]["score"] == 0.5 and subsets["Focus"]["score"] == 0.5 and subsets["Math"]["score"] == 1
    assert subsets["Ties"]["score"] == pytest.approx(bm.ties_score(ties_rows())["score"])
    assert result["score"] == pytest.approx((0.5 + 0.5 + 1 + subsets["Ties"]["score"]) / 4)
    assert result["skipped"] == 1 and result["scored"] == len(rows) - 1


def test_a_ties_id_of_another_form_is_refused():
    with pytest.raises(ValueError, match="is not 'ref:<k>' or 'tied:<k>'"):
        bm.ties_score([("7", [1, 0], 1)])


# --------------------------------------------------------------------------- RM-Bench


def test_rmbench_matrix_and_levels_by_hand():
    T, F = True, False
    chat = [
        [[T, T, T], [T, T, T], [T, T, T]],   # prefers chosen whatever the styles
        [[T, F, F], [T, T, F], [T, T, T]],   # prefers the more styled answer: easy and normal right, hard wrong
    ]
    safety = [[[F, F, F], [F, F, F], [F, F, F]]]
    rows = [bm.StyleRow(prompt="q", chosen=["a", "b", "c"], rejected=["d", "e", "f"], domain=d)
            for d in ("chat", "chat", "safety-refuse")]
    result = bm.rmbench_summary(rows + rows[:1], chat + safety + [None])
    c = result["domains"]["chat"]
    assert c["matrix"][0] == [1.0, 0.5, 0.5] and c["matrix"][2] == [1.0, 1.0, 1.0]
    assert (c["hard"], c["normal"], c["easy"]) == (0.5, 1.0, 1.0)
    assert result["domains"]["safety"]["rows"] == 1 and result["domains"]["safety"]["average"] == 0.0
    assert result["hard"] == pytest.approx(0.25) and result["easy"] == pytest.approx(0.5)
    assert result["average"] == pytest.approx((2.5 / 3 + 0) / 2) and result["skipped"] == 1


# --------------------------------------------------------------------------- JudgeBench


@pytest.mark.parametrize("verdicts, label, correct", [
    (["A>B", "A>B"], "A>B", True),
    (["A>B", "B>A"], "A>B", False),    # inconsistent across the two orders: wrong
    (["A>B", "A=B"], "A>B", True),     # right once, a tie once
    (["A=B", "A=B"], "A>B", False),
    (["B>A", "B>A"], "A>B", False),
    (["B>A"], "B>A", True),            # a reward model's single game
])
def test_judgebench_pair_rule(verdicts, label, correct):
    assert bm.pair_correct(verdicts, label) is correct


def test_judgebench_sources():
    rows = [bm.JudgeBenchRow(question="q", response_A="a", response_B="b", label=label, source=source)
            for label, source in [("A>B", "mmlu-pro-law"), ("B>A", "mmlu-pro-math"), ("A>B", "livecodebench"),
                                  ("A>B", "livebench-math")]]
    result = bm.judgebench_summary(rows, [["A>B", "A>B"], ["A>B", "B>A"], None, ["A>B", "A=B"]])
    assert result["accuracy"] == 0.5 and result["skipped"] == 1 and result["inconsistent"] == 1
    assert result["sources"]["knowledge"] == {"accuracy": 0.5, "pairs": 2}
    assert result["sources"]["coding"]["accuracy"] == 0.0 and result["sources"]["math"]["accuracy"] == 1.0


def test_format_detection():
    assert bm.detect_format({"prompt": "q", "chosen": "a", "rejected": "b"}) == "pairs"
    assert bm.detect_format({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}],
                             "rejected": [{"role": "assistant", "content": "b"}]}) == "pairs"
    assert bm.detect_format({"prompt": "q", "chosen": ["a"], "rejected": ["b", "c", "d"], "subset": "Math"}) == "rewardbench2"
    assert bm.detect_format({"prompt": "q", "chosen": ["a", "b", "c"], "rejected": ["d", "e", "f"],
                             "domain": "chat"}) == "rmbench"
    assert bm.detect_format({"question": "q", "response_A": "a", "response_B": "b", "label": "A>B"}) == "judgebench"


# --------------------------------------------------------------------------- end to end


def benchmark_files(folder):
    """The rule pairs (chosen mentions 'blue', rejected 'dog') laid out as each benchmark's rows."""
    pairs = [p for p in rule_pairs(60, 5) if isinstance(p["prompt"], str)]
    assert len(pairs) >= 32
    rb2 = [{"id": str(k), "prompt": p["prompt"], "chosen": [p["chosen"]], "rejected": [p["rejected"]] * 3,
            "subset": ["Factuality", "Focus"][k % 2], "num_correct": 1} for k, p in enumerate(pairs[:12])]
    rb2 += [{"id": f"{kind}:{k}", "prompt": p["prompt"], "chosen": [p["chosen"]] * (1 if kind == "ref" else 2),
             "rejected": [p["rejected"]] * 2, "subset": "Ties"} for k, p in enumerate(pairs[12:16]) for kind in ("ref", "tied")]
    rmbench = [{"id": k, "prompt": p["prompt"], "chosen": [p["chosen"], p["chosen"] + " indeed", "**" + p["chosen"] + "**"],
                "rejected": [p["rejected"], p["rejected"] + " indeed", "**" + p["rejected"] + "**"],
                "domain": ["chat", "safety-refuse"][k % 2]} for k, p in enumerate(pairs[16:24])]
    judgebench = [{"pair_id": str(k), "question": p["prompt"], "source": ["mmlu-pro-law", "livecodebench"][k % 2],
                   "response_A": p["chosen"] if k % 2 else p["rejected"], "response_B": p["rejected"] if k % 2 else p["chosen"],
                   "label": "A>B" if k % 2 else "B>A"} for k, p in enumerate(pairs[24:32])]
    return {name: write_jsonl(folder / f"{name}.jsonl", rows)
            for name, rows in (("rewardbench2", rb2), ("rmbench", rmbench), ("judgebench", judgebench))}


@pytest.fixture(scope="module")
def judges(tiny_model_dir, rule_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("judges")
    common = [f"model.name_or_path={tiny_model_dir}", f"data.train={rule_data[0]}", "train.epochs=1",
              "train.per_device_batch_size=16", "data.max_length=64"]
    assert main(["train-rm", *common, f"output_dir={folder / 'rm'}"]) == 0
    assert main(["train-pm", *common, f"output_dir={folder / 'pm'}"]) == 0
    return {"rm": folder / "rm" / "model", "pm": folder / "pm" / "model"}


@pytest.mark.parametrize("kind", ["rm", "pm"])
def test_eval_rm_scores_every_benchmark_format(judges, kind, tmp_path, capsys):
    files = benchmark_files(tmp_path)
    results = {}
    for fmt, path in files.items():
        out = tmp_path / f"{fmt}-{kind}.json"
        assert main(["eval-rm", f"model={judges[kind]}", f"data={path}", f"output={out}", "max_length=64"]) == 0
        results[fmt] = json.loads(out.read_text())
        assert results[fmt]["format"] == fmt and results[fmt]["kind"] == kind
        assert ("preference model" if kind == "pm" else "reward model") in results[fmt]["method"]
    rb2 = results["rewardbench2"]
    assert set(rb2["subsets"]) == {"Factuality", "Focus", "Ties"} and rb2["subsets"]["Ties"]["rows"] == 8
    assert 0 <= rb2["score"] <= 1.01
    rm = results["rmbench"]
    assert set(rm["domains"]) == {"chat", "safety"} and all(0 <= rm[k] <= 1 for k in ("hard", "normal", "easy"))
    jb = results["judgebench"]
    assert set(jb["sources"]) == {"knowledge", "coding"} and jb["pairs"] == 8
    printed = capsys.readouterr().out
    assert "RewardBench 2 score" in printed and "RM-Bench hard" in printed and "JudgeBench accuracy" in printed


def test_format_can_be_forced_and_a_bad_row_names_its_place(judges, tmp_path, capsys):
    files = benchmark_files(tmp_path)
    assert main(["eval-rm", f"model={judges['rm']}", f"data={files['rmbench']}", "format=rewardbench2",
                 f"output={tmp_path / 'forced.json'}", "max_length=64"]) == 0
    assert json.loads((tmp_path / "forced.json").read_text())["format"] == "rewardbench2"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "response_A": "a", "response_B": "b", "label": "A>B"},
                                               {"question": "q", "response_A": "a", "response_B": "b", "label": "AB"}])
    assert main(["eval-rm", f"model={judges['rm']}", f"data={bad}", "max_length=64"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "label" in err
    ties = write_jsonl(tmp_path / "ties.jsonl", [{"id": "9", "prompt": "q", "chosen": ["a"], "rejected": ["b"],
                                                 "subset": "Ties"}])
    assert main(["eval-rm", f"model={judges['rm']}", f"data={ties}", "max_length=64"]) == 2
    assert "is not 'ref:<k>' or 'tied:<k>'" in capsys.readouterr().err
