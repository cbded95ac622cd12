"""Annotation (reward model, preference model and function judges, length penalty, failures,
resume) and pair selection (every strategy on hand-built rewards, ties, margins)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from conftest import build_model, build_tokenizer, write_jsonl
from rlhf_workflow.cli import main
from rlhf_workflow.online.pairs import choose_all, choose_pair, format_stats, make_pairs


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---------------------------------------------------------------- pair selection


def test_each_strategy_on_hand_built_rewards():
    rng = random.Random(0)
    rewards = [0.1, 0.9, 0.5, None, 0.3]
    assert choose_pair(rewards, "max_min", rng) == (1, 0)
    assert choose_pair(rewards, "max_max", rng) == (1, 2)
    for _ in range(20):
        chosen, rejected = choose_pair(rewards, "max_random", rng)
        assert chosen == 1 and rejected in (0, 2, 4)  # never the unscored response
        a, b = choose_pair(rewards, "random", rng)
        assert rewards[a] > rewards[b] and 3 not in (a, b)
    seen = {choose_pair(rewards, "max_random", random.Random(s))[1] for s in range(30)}
    assert seen == {0, 2, 4}


def test_ties_margins_and_too_few_rewards():
    rng = random.Random(0)
    assert choose_pair([0.5, 0.5, 0.5], "max_min", rng) == "tie"
    assert choose_pair([0.9, 0.9, 0.1], "max_max", rng) == "tie"  # best and second best tie
    assert choose_pair([0.9, 0.9, 0.1], "max_min", rng) == (0, 2)  # the earlier of equal bests is chosen
    assert choose_pair([0.5, 0.55], "max_min", rng, min_margin=0.1) == "margin"
    assert choose_pair([0.5, 0.7], "max_min", rng, min_margin=0.1) == (1, 0)
    assert choose_pair([None, 1.0, None], "max_min", rng) == "unscored"


def test_make_pairs_counts_drops_and_ignores_row_order():
    rng = random.Random(0)
    rows = [{"id": f"r{i}", "prompt": f"p{i}", "responses": [f"a{i}", f"b{i}", f"c{i}", f"d{i}"],
             "rewards": [rng.random() for _ in range(4)], "task": "x"} for i in range(20)]
    rows.append({"id": "tie", "prompt": "p", "responses": ["x", "y"], "rewards": [1.0, 1.0]})
    rows.append({"id": "same", "prompt": "p", "responses": ["x", "x"], "rewards": [1.0, 0.0]})
    rows.append({"id": "none", "prompt": "p", "responses": ["x", "y"], "rewards": [None, 0.0]})
    pairs, stats = make_pairs(rows, "random", seed=3)
    again, _ = make_pairs(list(reversed(rows)), "random", seed=3)
    assert {p["id"]: (p["chosen"], p["rejected"]) for p in pairs} == {p["id"]: (p["chosen"], p["rejected"]) for p in again}
    assert stats["pairs"] == 20 and stats["dropped"] == {"unscored": 1, "tie": 1, "margin": 0, "identical": 1}
    assert all(p["chosen_reward"] > p["rejected_reward"] and p["task"] == "x" for p in pairs)
    assert stats["mean_chosen_reward"] > stats["mean_rejected_reward"]



def test_all_strategy_takes_every_pair_with_different_rewards():
    assert choose_all([0.2, 0.9, 0.2, 0.5]) == [(1, 3), (1, 0), (1, 2), (3, 0), (3, 2)]  # the two 0.2s tie
    assert choose_all([0.5, 0.5]) == "tie" and choose_all([None, 0.5]) == "unscored"
    assert choose_all([0.5, 0.55, 0.9], min_margin=0.1) == [(2, 1), (2, 0)]
    assert choose_all([0.5, 0.55], min_margin=0.1) == "margin"
    rows = [{"id": "a", "prompt": "p", "responses": ["w", "x", "y", "z"], "rewards": [0.0, 1.0, 0.5, 0.5]},
            {"id": "b", "prompt": "q", "responses": ["s", "t"], "rewards": [1.0, 1.0]}]
    pairs, stats = make_pairs(rows, "all")
    assert [(p["id"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("a/1-2", "x", "y"), ("a/1-3", "x", "z"), ("a/1-0", "x", "w"), ("a/2-0", "y", "w"), ("a/3-0", "z", "w")]
    assert stats["pairs"] == 5 and stats["rows_used"] == 1 and stats["dropped"]["tie"] == 1



def test_a_pair_budget_keeps_a_seeded_sample_and_its_statistics_describe_it():
    rng = random.Random(1)
    rows = [{"id": f"r{i}", "prompt": f"p{i}", "responses": ["a" * (i + 1), "b", "cc"], "response_tokens": [i + 1, 1, 2],
             "rewards": [rng.random() for _ in range(3)]} for i in range(30)]
    everything, all_stats = make_pairs(rows, "max_min", seed=5)
    kept, stats = make_pairs(rows, "max_min", seed=5, max_pairs=10)
    assert len(kept) == stats["pairs"] == 10 and stats["sampled_from"] == all_stats["pairs"] == 30
    assert kept == [p for p in everything if p in kept]  # file order kept
    assert kept == make_pairs(rows, "max_min", seed=5, max_pairs=10)[0]  # the same sample every time
    assert stats["rows_used"] == 10
    assert stats["mean_chosen_reward"] == pytest.approx(sum(p["chosen_reward"] for p in kept) / 10)
    assert stats["mean_chosen_chars"] == pytest.approx(sum(len(p["chosen"]) for p in kept) / 10)
    by_id = {r["id"]: r for r in rows}
    chosen_tokens = [by_id[p["id"]]["response_tokens"][p["chosen_index"]] for p in kept]
    assert stats["mean_chosen_tokens"] == pytest.approx(sum(chosen_tokens) / 10)
    assert "a seeded sample of 10 of the 30 pairs made" in format_stats(stats)


def test_empty_answers_are_never_paired():
    rows = [{"id": "a", "prompt": "p", "responses": ["good", "", "bad", "  "], "rewards": [1.0, -5.0, 0.0, -3.0]},
            {"id": "b", "prompt": "q", "responses": ["", "only one"], "rewards": [0.0, 1.0]}]
    pairs, stats = make_pairs(rows, "max_min")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("good", "bad")]
    assert stats["empty_responses"] == 3 and stats["dropped"]["unscored"] == 1


# ---------------------------------------------------------------- annotate with a function judge


JUDGE = '''
import math

def judge(row, response):
    """Reward = number of times the row's keyword appears."""
    if response == "boom":
        raise ValueError("cannot judge this")
    if response == "nan":
        return math.nan
    if response == "text":
        return "high"
    return float(response.count(row["keyword"]))

def always_fails(row, response):
    raise RuntimeError("the judge is broken")
'''


@pytest.fixture
def generations(tmp_path):
    (tmp_path / "myjudge.py").write_text(JUDGE)
    rows = [
        {"id": "a", "prompt": "say blue", "keyword": "blue",
         "responses": ["blue", "blue blue sky is very blue indeed", "red", "blue blue"], "response_tokens": [1, 7, 1, 2]},
        {"id": "b", "prompt": [{"role": "user", "content": "say cat"}], "keyword": "cat",
         "responses": ["cat", "boom", "nan", "text"], "response_tokens": [1, 1, 1, 1]},
        {"id": "c", "prompt": "say dog", "keyword": "dog", "responses": ["dog dog", "no"], "response_tokens": [2, 1]},
    ]
    return write_jsonl(tmp_path / "gen.jsonl", rows)


def _annotate(inp, out, *extra):
    return main(["annotate", f"input={inp}", f"output={out}", *extra])


def test_function_judge_rewards_errors_and_pairs(generations, tmp_path, capsys):
    out = tmp_path / "scored.jsonl"
    assert _annotate(generations, out, "judge.type=function", f"judge.function={tmp_path}/myjudge.py:judge") == 0
    rows = {r["id"]: r for r in _rows(out)}
    assert rows["a"]["rewards"] == [1.0, 3.0, 0.0, 2.0] and rows["a"]["keyword"] == "blue"
    assert rows["b"]["rewards"] == [1.0, None, None, None]  # the row is kept; the failures are written down
    errors = rows["b"]["reward_errors"]
    assert "ValueError: cannot judge this" in errors["1"] and "returned nan" in errors["2"]
    assert "returned str 'high', expected a number" in errors["3"]
    printed = capsys.readouterr().out
    assert "3 responses got no reward" in printed and "7 responses of 3 rows scored" in printed

    pairs_file = tmp_path / "pairs.jsonl"
    assert main(["pairs", f"input={out}", f"output={pairs_file}"]) == 0
    pairs = {p["id"]: p for p in _rows(pairs_file)}
    assert (pairs["a"]["chosen"], pairs["a"]["rejected"]) == ("blue blue sky is very blue indeed", "red")
    assert "b" not in pairs and pairs["c"]["chosen"] == "dog dog"  # b has one scored response
    stats = json.loads((tmp_path / "pairs.stats.json").read_text())
    assert stats["pairs"] == 2 and stats["dropped"]["unscored"] == 1 and stats["mean_chosen_tokens"] == 4.5
    from rlhf_workflow.data.io import read_rows
    from rlhf_workflow.data.schemas import PairRow

    assert len(read_rows(pairs_file, PairRow)) == 2  # the pairs file is what dpo reads


def test_length_penalty_changes_the_chosen_response(generations, tmp_path):
    out = tmp_path / "scored.jsonl"
    assert _annotate(generations, out, "judge.type=function", f"judge.function={tmp_path}/myjudge.py:judge",
                     "length_penalty.coef=0.5", "length_penalty.unit=tokens") == 0
    row = {r["id"]: r for r in _rows(out)}["a"]
    assert row["raw_rewards"] == [1.0, 3.0, 0.0, 2.0]
    assert row["rewards"] == pytest.approx([0.5, -0.5, -0.5, 1.0])  # r - 0.5 * tokens
    pairs_file = tmp_path / "pairs.jsonl"
    assert main(["pairs", f"input={out}", f"output={pairs_file}", "strategy=max_max"]) == 0
    assert {p["id"]: p for p in _rows(pairs_file)}["a"]["chosen"] == "blue blue"  # no longer the long one
    chars = tmp_path / "chars.jsonl"
    assert _annotate(generations, chars, "judge.type=function", f"judge.function={tmp_path}/myjudge.py:judge",
                     "length_penalty.coef=0.1", "length_penalty.unit=characters") == 0
    assert {r["id"]: r for r in _rows(chars)}["c"]["rewards"] == pytest.approx([2 - 0.7, -0.2])
    # λ < 0: a bonus for length, against a judge that favours short answers
    bonus = tmp_path / "bonus.jsonl"
    assert _annotate(generations, bonus, "judge.type=function", f"judge.function={tmp_path}/myjudge.py:judge",
                     "length_penalty.coef=-0.5", "length_penalty.unit=tokens") == 0
    assert {r["id"]: r for r in _rows(bonus)}["a"]["rewards"] == pytest.approx([1.5, 6.5, 0.5, 3.0])  # r + 0.5 * tokens


def test_annotate_failures_and_resume(generations, tmp_path, capsys):
    # a judge that fails on everything stops early with its error, not with a file of nulls
    many = write_jsonl(tmp_path / "many.jsonl", [{"id": str(i), "prompt": "p", "responses": ["x"] * 4} for i in range(10)])
    assert _annotate(many, tmp_path / "x.jsonl", "judge.type=function",
                     f"judge.function={tmp_path}/myjudge.py:always_fails") == 2
    assert "failed on all of the first 16 responses" in capsys.readouterr().err
    for bad, message in (("nope.py:judge", "does not exist"), (f"{tmp_path}/myjudge.py:missing", "has no function"),
                         ("no_such_module_xyz:judge", "cannot import")):
        assert _annotate(generations, tmp_path / "y.jsonl", "judge.type=function", f"judge.function={bad}") == 2
        assert message in capsys.readouterr().err
    assert _annotate(generations, tmp_path / "y.jsonl", "judge.type=reward_model") == 2
    assert "judge.path is required" in capsys.readouterr().err
    no_tokens = write_jsonl(tmp_path / "nt.jsonl", [{"id": "a", "prompt": "p", "responses": ["x", "y"]}])
    assert _annotate(no_tokens, tmp_path / "z.jsonl", "judge.type=function", f"judge.function={tmp_path}/myjudge.py:judge",
                     "length_penalty.coef=0.1") == 2
    assert "field 'response_tokens'" in capsys.readouterr().err

    # resume: a torn last line is dropped and the missing rows scored, none twice
    out = tmp_path / "scored.jsonl"
    assert _annotate(generations, out, "judge.type=function", f"judge.function={tmp_path}/myjudge.py:judge") == 0
    full = out.read_text().splitlines(keepends=True)
    out.write_text(full[0] + full[1][:30])
    assert _annotate(generations, out, "judge.type=function", f"judge.function={tmp_path}/myjudge.py:judge",
                     "rows_per_write=1") == 0
    assert sorted(r["id"] for r in _rows(out)) == ["a", "b", "c"]
    assert {r["id"]: r["rewards"] for r in _rows(out)} == {json.loads(x)["id"]: json.loads(x)["rewards"] for x in full}


# ---------------------------------------------------------------- model judges


@pytest.fixture(scope="module")
def judge_dirs(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlhf_workflow.models.preference import FORMAT_FILE, PreferenceFormat
    from rlhf_workflow.models.reward import RewardModel, prepare_reward_tokenizer, save_reward_model

    root = tmp_path_factory.mktemp("judges")
    tok = build_tokenizer("chatml")
    torch.manual_seed(1)
    cfg = LlamaConfig(**{**build_model(tok).config.to_dict(), "num_labels": 1})
    rm_tok = prepare_reward_tokenizer(build_tokenizer("chatml"))
    save_reward_model(RewardModel(LlamaForSequenceClassification(cfg).eval()), rm_tok, root / "rm")
    pm = build_model(tok, seed=2)
    pm.save_pretrained(root / "pm")
    tok.save_pretrained(root / "pm")
    (root / "pm" / FORMAT_FILE).write_text(PreferenceFormat(template="[CONTEXT] {context} [RESPONSE A] {response_a} "
                                                            "[RESPONSE B] {response_b}", label_a="A", label_b="B").to_json())
    return root


@pytest.fixture
def plain_generations(tmp_path):
    rows = [{"id": f"g{i}", "prompt": p, "responses": [f"answer {k} to {p}" * (k + 1) for k in range(4)],
             "response_tokens": [1, 2, 3, 4]} for i, p in enumerate(["hello world", "how are you", "what is two"])]
    return write_jsonl(tmp_path / "gen.jsonl", rows)


def test_reward_model_judge_scores_like_the_scorer(judge_dirs, plain_generations, tmp_path, capsys):
    from rlhf_workflow.models.reward import load_reward_scorer

    out = tmp_path / "scored.jsonl"
    assert _annotate(plain_generations, out, "judge.type=reward_model", f"judge.path={judge_dirs / 'rm'}",
                     "judge.batch_size=5") == 0
    scorer = load_reward_scorer(str(judge_dirs / "rm"))
    for row in _rows(out):
        expected = scorer.score([row["prompt"]] * 4, row["responses"])
        assert row["rewards"] == pytest.approx(expected, abs=1e-5)
    # a response too long for judge.max_length gets null with the reason
    short = tmp_path / "short.jsonl"
    assert _annotate(plain_generations, short, "judge.type=reward_model", f"judge.path={judge_dirs / 'rm'}",
                     "judge.max_length=30") == 0
    row = _rows(short)[0]
    assert row["rewards"][3] is None and "do not fit in judge.max_length 30" in row["reward_errors"]["3"]
    assert all(isinstance(r, float) and math.isfinite(r) for r in row["rewards"][:1])
    # the wrong kind of model is named, not silently given a fresh head
    assert _annotate(plain_generations, tmp_path / "w.jsonl", "judge.type=reward_model",
                     f"judge.path={judge_dirs / 'pm'}") == 2
    assert "holds a preference model; set judge.type=preference_model" in capsys.readouterr().err


def test_a_reward_model_that_returns_nan_marks_rows_instead_of_poisoning_pairs(judge_dirs, plain_generations, tmp_path):
    """A reward model whose weights went NaN: every response is marked (null reward and the reason),
    and no pair is made from them."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan-rm"
    shutil.copytree(judge_dirs / "rm", broken)
    weights = load_file(broken / "model.safetensors")
    weights["score.weight"] = torch.full_like(weights["score.weight"], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "scored.jsonl"
    # 12 responses: fewer than the 16 all-failing ones after which annotate gives up
    assert _annotate(plain_generations, out, "judge.type=reward_model", f"judge.path={broken}") == 0
    rows = _rows(out)
    assert len(rows) == 3
    for row in rows:
        assert row["rewards"] == [None] * 4 and all("returned nan" in e for e in row["reward_errors"].values())
    pairs, stats = make_pairs(rows, "max_min")
    assert pairs == [] and stats["dropped"]["unscored"] == 3


def test_preference_model_judge_ranks_with_a_knockout(judge_dirs, plain_generations, tmp_path, capsys):
    out = tmp_path / "scored.jsonl"
    assert _annotate(plain_generations, out, "judge.type=preference_model", f"judge.path={judge_dirs / 'pm'}") == 0
    for row in _rows(out):
        assert sorted(row["rewards"]) == [0.0, 0.5, 0.5, 1.0]  # best 1, worst 0, the rest ½
    assert "12 pairwise comparisons (4.0 per prompt" in capsys.readouterr().out  # n − 1 + ⌈n/2⌉ − 1 for n = 4
    rr = tmp_path / "rr.jsonl"
    assert _annotate(plain_generations, rr, "judge.type=preference_model", f"judge.path={judge_dirs / 'pm'}",
                     "judge.ranking=borda") == 0
    assert "18 pairwise comparisons" in capsys.readouterr().out  # n(n − 1)/2 = 6 per prompt
    for row in _rows(rr):
        assert sum(row["rewards"]) == pytest.approx(2.0)  # Borda: the n(n−1)/2 points shared out, / (n − 1)


SCALAR_JUDGE = '''
import time

import numpy as np
import torch


def judge(row, response):
    kinds = {"np32": np.float32(0.5), "np64": np.int64(3), "tensor": torch.tensor(0.25), "array1": np.array([2.0]),
             "huge": 10 ** 400, "bool": True, "vector": torch.tensor([1.0, 2.0])}
    if response == "slow":
        while True:
            time.sleep(0.01)
    if response == "swallows":  # a judge whose own `except Exception` must not swallow the time limit
        try:
            while True:
                pass
        except Exception:
            return 1.0
    return kinds[response]
'''


def test_function_judges_may_return_any_real_scalar_and_may_be_limited_in_time(tmp_path):
    (tmp_path / "scalars.py").write_text(SCALAR_JUDGE)
    inp = write_jsonl(tmp_path / "gen.jsonl", [
        {"id": "a", "prompt": "x", "responses": ["np32", "np64", "tensor", "array1"]},
        {"id": "b", "prompt": "y", "responses": ["huge", "bool", "vector", "slow", "swallows"]},
    ])
    out = tmp_path / "scored.jsonl"
    assert _annotate(inp, out, "judge.type=function", f"judge.function={tmp_path}/scalars.py:judge",
                     "judge.timeout=0.3") == 0
    rows = {r["id"]: r for r in _rows(out)}
    assert rows["a"]["rewards"] == [0.5, 3.0, 0.25, 2.0]
    assert rows["b"]["rewards"] == [None] * 5
    errors = rows["b"]["reward_errors"]
    assert "returned a number too large for a float" in errors["0"]
    assert "returned a bool" in errors["1"] and "returned Tensor" in errors["2"]
    assert "took longer than judge.timeout (0.3 s)" in errors["3"] and "took longer" in errors["4"]
