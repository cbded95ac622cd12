"""`rlhf-workflow compare`: paired differences between policies on the same eval prompts, pooled over
seeds; the run's seed; the length-controlled win rate."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from conftest import write_jsonl
from rlhf_workflow.cli import main
from rlhf_workflow.config import RunConfig, config_to_yaml, load_config
from rlhf_workflow.errors import UserError
from rlhf_workflow.eval.compare import compare, load
from rlhf_workflow.eval.stats import bootstrap_interval, length_controlled_win_rate, sign_flip_pvalue, t_interval

PROMPTS = [f"p{i}" for i in range(12)]


def make_run(root: Path, name: str, seed: int, policies: dict[str, dict[str, tuple[list, list, list]]],
             judge: str = "task.py:judge", prompt_text: str = "Say {}.") -> Path:
    """A run directory as `run` leaves it: config.yaml, and per policy eval/scored.jsonl (rewards,
    response_tokens) and eval/gold.jsonl, from {policy: {prompt id: (gold, rewards, tokens)}}."""
    run = root / name
    run.mkdir(parents=True)
    iterations = max([int(p[5:]) for p in policies if p.startswith("iter_")] + [1])
    config = load_config(RunConfig, None, ["prompts.train=t.jsonl", "prompts.eval=e.jsonl", "judge.type=function",
                                           f"judge.function={judge}", f"seed={seed}", f"output_dir={run}",
                                           f"iterations={iterations}", f"offline.after_online={'offline' in policies}"])
    (run / "config.yaml").write_text(config_to_yaml(config))
    for policy, rows in policies.items():
        (run / policy / "eval").mkdir(parents=True)
        write_jsonl(run / policy / "eval" / "scored.jsonl", [
            {"id": i, "prompt": prompt_text.format(i), "responses": ["x"] * len(rewards), "rewards": rewards,
             "response_tokens": tokens} for i, (_, rewards, tokens) in rows.items()])
        write_jsonl(run / policy / "eval" / "gold.jsonl", [{"id": i, "gold": gold} for i, (gold, _, _) in rows.items()])
    return run


def random_policy(rng: random.Random, shift: float) -> dict[str, tuple[list, list, list]]:
    return {i: ([float(rng.random() < 0.4 + shift), float(rng.random() < 0.4 + shift)],
                [rng.gauss(shift, 1), rng.gauss(shift, 1)], [rng.randrange(5, 40), rng.randrange(5, 40)])
            for i in PROMPTS}


def per_prompt(rows: dict[str, tuple[list, list, list]], index: int) -> dict[str, float]:
    return {i: sum(values[index]) / len(values[index]) for i, values in rows.items()}


def test_one_run_matches_a_direct_computation(tmp_path):
    rng = random.Random(0)
    base, policy = random_policy(rng, 0.0), random_policy(rng, 0.3)
    run = make_run(tmp_path, "demo", 0, {"iter_0": base, "iter_1": policy})
    [result] = compare(load([str(run)]), [("demo/iter_1", "demo/iter_0")], resamples=500)
    for metric, index in (("gold", 0), ("proxy", 1), ("length", 2)):
        a, b = per_prompt(policy, index), per_prompt(base, index)
        groups = [[a[i] - b[i]] for i in sorted(PROMPTS)]  # prompts in the order of their ids
        got = result.metrics[metric]
        assert got.mean == pytest.approx(sum(g[0] for g in groups) / len(groups))
        assert got.ci95 == pytest.approx(bootstrap_interval(groups, 500))
        assert got.p_value == pytest.approx(sign_flip_pvalue(groups))
        assert got.prompts == len(PROMPTS)
        assert got.policy_mean == pytest.approx(sum(a.values()) / len(a))
    assert result.seeds == [0]


def test_seeds_of_one_recipe_pool_with_the_prompt_as_the_unit(tmp_path):
    """Three runs that differ only in seed are one recipe: online − offline is paired within each
    seed, and the bootstrap and the sign flips take a prompt with its three differences together."""
    rng = random.Random(1)
    runs, expected = [], {}
    for seed in (0, 1, 2):
        online, offline = random_policy(rng, 0.2), random_policy(rng, 0.0)
        runs.append(make_run(tmp_path, f"online-s{seed}", seed, {"iter_0": random_policy(rng, 0), "iter_2": online,
                                                                 "offline": offline}))
        a, b = per_prompt(online, 0), per_prompt(offline, 0)
        expected[seed] = {i: a[i] - b[i] for i in PROMPTS}
    policies = load([str(r) for r in reversed(runs)])
    assert {p.recipe for p in policies} == {"online"}
    [result] = compare(policies, [("online/iter_2", "online/offline")], resamples=300)
    assert sorted(result.seeds) == [0, 1, 2]
    groups = [[expected[s][i] for s in sorted(result.seeds, reverse=True)] for i in sorted(PROMPTS)]
    gold = result.metrics["gold"]
    assert gold.mean == pytest.approx(sum(map(sum, groups)) / 36)
    assert gold.ci95 == pytest.approx(bootstrap_interval(groups, 300))
    assert gold.p_value == pytest.approx(sign_flip_pvalue(groups))
    assert {r["seed"]: r["mean"] for r in gold.per_seed} == pytest.approx(
        {s: sum(expected[s].values()) / 12 for s in (0, 1, 2)})
    # the spread from seed to seed, which the interval over prompts leaves out
    assert gold.seed_ci95 == pytest.approx(t_interval([r["mean"] for r in gold.per_seed]))


def test_a_recipe_against_another_pairs_equal_seeds(tmp_path):
    rng = random.Random(2)
    rows = {(name, seed): random_policy(rng, 0.1 * seed) for name in ("pm", "rm") for seed in (0, 1)}
    inputs = []
    for (name, seed), policy in rows.items():
        run = make_run(tmp_path, f"{name}-{seed}", seed, {"iter_0": random_policy(rng, 0), "iter_2": policy},
                       judge=f"{name}.py:judge")
        inputs.append(f"{name}={run}")
    policies = load(inputs)
    [result] = compare(policies, [("pm/iter_2", "rm/iter_2")], resamples=100)
    per_seed = {r["seed"]: r["mean"] for r in result.metrics["length"].per_seed}
    for seed in (0, 1):
        a, b = per_prompt(rows[("pm", seed)], 2), per_prompt(rows[("rm", seed)], 2)
        assert per_seed[seed] == pytest.approx(sum(a[i] - b[i] for i in PROMPTS) / 12)
    # two judges: their rewards are not on one scale
    assert result.metrics["proxy"].mean is None and "different judges" in result.metrics["proxy"].note


def test_runs_on_different_eval_prompts_are_refused_naming_the_first_difference(tmp_path, capsys):
    rng = random.Random(3)
    one = make_run(tmp_path, "one", 0, {"iter_0": random_policy(rng, 0)})
    two = make_run(tmp_path, "two", 1, {"iter_0": random_policy(rng, 0)}, prompt_text="Tell {}.")
    assert main(["compare", str(one), str(two), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "different prompts" in err and "'p0'" in err and "prompt='Say p0.'" in err and "'Tell p0.'" in err
    fewer = random_policy(rng, 0)
    del fewer["p7"]
    three = make_run(tmp_path, "three", 2, {"iter_0": fewer})
    assert main(["compare", str(one), str(three), "-o", str(tmp_path / "out")]) == 2
    assert "prompt 'p7' is only in" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_command_writes_tables_plot_and_json(tmp_path, capsys):
    rng = random.Random(4)
    runs = [make_run(tmp_path, f"demo-s{s}", s, {"iter_0": random_policy(rng, 0), "iter_1": random_policy(rng, 0.2),
                                                 "offline": random_policy(rng, 0.1)}) for s in (0, 1)]
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, runs), "--baseline", "offline", "-o", str(out), "--bootstrap", "100"]) == 0
    printed = capsys.readouterr().out
    assert "| iter_1 | offline | 2 | 12 |" in printed and "Each seed's paired difference" in printed
    data = json.loads((out / "compare.json").read_text())
    assert [(d["policy"], d["baseline"]) for d in data] == [("demo/iter_0", "demo/offline"), ("demo/iter_1", "demo/offline")]
    assert (out / "compare.png").stat().st_size > 0 and "<table" in (out / "compare.html").read_text()
    assert main(["compare", str(runs[0]), "--baseline", "iter_9", "-o", str(out)]) == 2
    assert "--baseline iter_9" in capsys.readouterr().err
    assert main(["compare", str(runs[0]), str(runs[0]) + "/iter_1", "-o", str(out)]) == 0  # a run and one of its policies
    assert main(["compare", str(tmp_path / "nothing"), "-o", str(out)]) == 2
    assert "no such run or policy directory" in capsys.readouterr().err


def test_two_runs_of_one_recipe_and_seed_are_refused(tmp_path, capsys):
    rng = random.Random(5)
    one = make_run(tmp_path, "a", 0, {"iter_0": random_policy(rng, 0)})
    two = make_run(tmp_path, "b", 0, {"iter_0": random_policy(rng, 0)})
    assert main(["compare", str(one), str(two), "-o", str(tmp_path / "o")]) == 2
    assert "same seed (0)" in capsys.readouterr().err


@pytest.mark.parametrize("true_lc, length_effect", [(0.5, -2.0), (0.65, -1.0), (0.35, 1.5)])
def test_length_controlled_win_rate_recovers_the_win_rate_at_equal_length(true_lc, length_effect):
    """Judgements drawn from P(win) = σ(a + b·tanh(Δ/s)) with Δ mostly negative (the policy is
    shorter) and a strong length effect: the raw win rate is far from σ(a), the LC one close."""
    rng = random.Random(7)
    diffs = [rng.gauss(-10, 10) for _ in range(10000)]
    centre = sum(diffs) / len(diffs)
    scale = math.sqrt(sum((d - centre) ** 2 for d in diffs) / len(diffs))
    a = math.log(true_lc / (1 - true_lc))
    groups = []
    for k in range(0, len(diffs), 2):
        group = []
        for d in diffs[k : k + 2]:
            p = 1 / (1 + math.exp(-(a + length_effect * math.tanh(d / scale))))
            tie = 0.2 * min(p, 1 - p)  # some ties, E[outcome] = p still
            u = rng.random()
            group.append((1.0 if u < p - tie / 2 else 0.5 if u < p + tie / 2 else 0.0, d))
        groups.append(group)
    lc, interval, raw, why_not = length_controlled_win_rate(groups, resamples=100)
    assert why_not == ""
    assert abs(raw - true_lc) > 0.1
    assert lc == pytest.approx(true_lc, abs=0.03)
    assert interval[0] < true_lc < interval[1] and interval[1] - interval[0] < 0.1


def test_length_controlled_win_rate_without_a_length_effect_is_the_win_rate():
    rng = random.Random(8)
    groups = [[(float(rng.random() < 0.7), rng.gauss(0, 10)) for _ in range(2)] for _ in range(1000)]
    lc, _, raw, _ = length_controlled_win_rate(groups, resamples=0)
    assert lc == pytest.approx(raw, abs=0.02)
    assert length_controlled_win_rate([], 10) is None
    # every length equal: nothing to control for
    same = [[(1.0, 0.0), (0.0, 0.0), (1.0, 0.0)]]
    assert length_controlled_win_rate(same, 0)[0] == pytest.approx(2 / 3, abs=1e-3)


@pytest.mark.parametrize("groups, reason", [
    # every comparison 30 tokens apart: nothing was ever compared at equal length
    ([[(1.0, 30.0), (0.0, 30.0)], [(1.0, 30.0)]], "every answer is longer than the one it was compared with (by 30 to 30"),
    # every answer longer, outcomes unrelated to length: the fit only extrapolates (it gave 1.5e-24)
    ([[(1, 139), (0.5, 143)], [(1, 102), (0.5, 77)], [(0.5, 67), (1, 101)], [(0.5, 69), (0, 57)]],
     "every answer is longer than the one it was compared with (by 57 to 143 tokens)"),
    ([[(0.5, -30), (0, -20)], [(0.5, -20)]], "every answer is shorter"),
    # the wins are the longer answers, the losses the shorter (a tie at the boundary): no finite slope
    ([[(1, 40), (1, 25)], [(0, -5), (1, 12)], [(0, 3), (0, -20)], [(1, 8), (0.5, 5)]], "separate the wins"),
    ([[(0, 10), (1, -3)], [(0, 4), (1, -8)]], "separate the wins"),  # the other way round
])
def test_no_length_controlled_win_rate_where_the_data_cannot_give_one(groups, reason):
    """With the ridge alone deciding the slope, the first of these gave 7e-5 for a raw win rate of
    0.56; now there is no value and the reason says why."""
    lc, interval, raw, why_not = length_controlled_win_rate(groups, resamples=50)
    outcomes = [o for g in groups for o, _ in g]
    assert lc is None and interval is None and reason in why_not
    assert raw == pytest.approx(sum(outcomes) / len(outcomes))


def test_overlapping_lengths_and_one_sided_outcomes_still_give_a_rate():
    # a win and a loss at lengths that overlap: estimable
    lc, _, _, why_not = length_controlled_win_rate([[(1, 5), (0, 8)], [(1, -2), (0, -6)]], resamples=0)
    assert lc is not None and why_not == ""
    # all wins: the win rate at equal length is all wins too
    lc, _, raw, _ = length_controlled_win_rate([[(1, 5), (1, -3)], [(1, 0)]], resamples=0)
    assert raw == 1 and lc > 0.99


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_statistics_refuse_non_finite_values(bad):
    """A NaN made the sign-flip p-value 0 and swapped the interval's ends, silently."""
    groups = [[0.0], [0.1], [-0.1], [bad], [0.05]]
    for call in (lambda: sign_flip_pvalue(groups), lambda: bootstrap_interval(groups, 100),
                 lambda: t_interval([0.1, bad, 0.2]),
                 lambda: length_controlled_win_rate([[(1.0, bad), (0.0, 3.0)]], 10)):
        with pytest.raises(ValueError, match="finite"):
            call()


@pytest.mark.parametrize("field, value, message", [
    ("rewards", float("nan"), "rewards[1] is nan"),
    ("rewards", float("inf"), "rewards[1] is inf"),
    ("rewards", "0.3", "rewards[1] is '0.3'"),
    ("response_tokens", True, "response_tokens[1] is True"),
    ("gold", float("nan"), "gold[1] is nan"),
])
def test_a_bad_score_in_an_eval_file_is_refused_with_its_line(tmp_path, capsys, field, value, message):
    rng = random.Random(10)
    run = make_run(tmp_path, "demo", 0, {"iter_0": random_policy(rng, 0), "iter_1": random_policy(rng, 0.2)})
    name = "gold.jsonl" if field == "gold" else "scored.jsonl"
    path = run / "iter_1" / "eval" / name
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[4][field][1] = value
    write_jsonl(path, rows)  # json.dumps writes NaN and Infinity, and json.loads reads them back
    assert main(["compare", str(run), "-o", str(tmp_path / "out")]) == 2
    assert f"{path}, line 5: {message}" in capsys.readouterr().err


def test_an_eval_row_without_an_id_or_with_a_repeated_one_is_refused(tmp_path, capsys):
    rng = random.Random(11)
    run = make_run(tmp_path, "demo", 0, {"iter_0": random_policy(rng, 0), "iter_1": random_policy(rng, 0.2)})
    path = run / "iter_1" / "eval" / "gold.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    write_jsonl(path, rows + [rows[2]])  # p2 twice: the second would replace the first
    assert main(["compare", str(run), "-o", str(tmp_path / "out")]) == 2
    assert f"{path}, line 13: id 'p2' again (first on line 3)" in capsys.readouterr().err
    del rows[0]["id"]
    write_jsonl(path, rows)
    assert main(["compare", str(run), "-o", str(tmp_path / "out")]) == 2
    assert f"{path}, line 1: no id" in capsys.readouterr().err


def test_t_interval_over_seeds_against_a_direct_computation():
    values = [-0.024, 0.084, -0.042]
    centre = sum(values) / 3
    s = math.sqrt(sum((v - centre) ** 2 for v in values) / 2)
    low, high = t_interval(values)
    assert (low + high) / 2 == pytest.approx(centre)
    assert (high - low) / 2 == pytest.approx(4.303 * s / math.sqrt(3))
    assert t_interval([0.1, 0.2]) is None
    many = [0.01 * k for k in range(41)]  # 40 degrees of freedom: t = 2.021
    centre = sum(many) / len(many)
    s = math.sqrt(sum((v - centre) ** 2 for v in many) / 40)
    assert (t_interval(many)[1] - centre) == pytest.approx(2.0211 * s / math.sqrt(41), rel=1e-4)


def test_the_run_seed_changes_training_prompts_not_the_eval_set(tmp_path):
    from rlhf_workflow.online.loop import split_prompts

    train = write_jsonl(tmp_path / "t.jsonl", [{"id": f"t{i}", "prompt": f"p {i}"} for i in range(20)])
    base = ["prompts.train=" + str(train), "prompts.eval=e.jsonl", "judge.type=function", "judge.function=x.py:f",
            "iterations=2"]
    chunks = {s: split_prompts(load_config(RunConfig, None, base + [f"seed={s}"])) for s in (0, 1)}
    assert [[r.id for r in c] for c in chunks[0]] != [[r.id for r in c] for c in chunks[1]]
    config = load_config(RunConfig, None, base + ["seed=0"])
    assert config.seeded(12345) == 12345  # seed 0 leaves every stream as its settings say
    assert load_config(RunConfig, None, base + ["seed=2"]).seeded(12345) != 12345
    huge = load_config(RunConfig, None, base + ["seed=1000000000"]).seeded(12345)
    assert 0 <= huge < 2**32  # numpy's seeding (transformers' set_seed) takes nothing larger


def test_runs_with_different_seeds_share_the_eval_set_and_compare(recipe, tmp_path):
    """Two runs of a recipe that differ only in seed: the same eval prompts, different training
    prompts, samples and DPO data order, and `compare` pools them as one recipe."""
    task_recipe = [a for a in recipe if not a.startswith(("prompts.train=", "prompts.eval="))]
    task_recipe += ["prompts.task=arithmetic", "prompts.per_iteration=6", "prompts.eval_count=4", "iterations=1"]
    runs = {}
    for seed in (0, 1):
        runs[seed] = tmp_path / f"run-s{seed}"
        assert main(["run", *task_recipe, f"seed={seed}", f"output_dir={runs[seed]}"]) == 0
    a, b = runs[0], runs[1]
    assert (a / "eval_prompts.jsonl").read_text() == (b / "eval_prompts.jsonl").read_text()
    assert (a / "iter_1" / "prompts.jsonl").read_text() != (b / "iter_1" / "prompts.jsonl").read_text()
    assert (a / "iter_0" / "eval" / "generations.jsonl").read_text() != (b / "iter_0" / "eval" / "generations.jsonl").read_text()
    seeds = [json.loads(json.dumps(__import__("yaml").safe_load((r / "iter_1" / "dpo" / "config.yaml").read_text())))["train"]["seed"]
             for r in (a, b)]
    assert seeds[0] != seeds[1]
    [result] = compare(load([str(a), str(b)]), [("run/iter_1", "run/iter_0")], resamples=50)
    assert sorted(result.seeds) == [0, 1] and result.metrics["gold"].prompts == 4
    assert (a / "iter_1" / "eval" / "gold.jsonl").exists()
    report = (a / "report" / "report.md").read_text()
    assert "Paired differences" in report and "length-controlled win rate" in report
    # the KL estimate scores π0 on exactly the tokens the policy sampled: π0 against itself is 0
    import shutil

    import torch

    from rlhf_workflow.eval.policy import evaluate_policy

    shutil.copytree(a / "iter_0", a / "copy_of_iter_0")
    config = load_config(RunConfig, str(a / "config.yaml"), ["eval.kl=true"])
    rows = [json.loads(line) for line in (a / "iter_0" / "eval" / "scored.jsonl").read_text().splitlines()]
    assert all(len(r["response_token_ids"]) == len(r["responses"]) for r in rows)
    metrics = evaluate_policy(config, a, "copy_of_iter_0", config.policy, baseline="iter_0", gold=None, compare=None,
                              device=torch.device("cpu"))
    assert metrics["kl_vs_initial"] == pytest.approx(0.0, abs=1e-4)


def test_the_report_of_a_run_whose_config_no_longer_loads_skips_the_paired_table(tmp_path, caplog):
    from rlhf_workflow.eval.report import write_report

    rng = random.Random(9)
    run = make_run(tmp_path, "old", 0, {"iter_0": random_policy(rng, 0), "iter_1": random_policy(rng, 0.2)})
    write_jsonl(run / "metrics.jsonl", [{"id": "iter_0", "iteration": 0, "gold": 0.3},
                                        {"id": "iter_1", "iteration": 1, "gold": 0.4}])
    assert "Paired differences" in write_report(run).read_text()
    (run / "config.yaml").write_text((run / "config.yaml").read_text() + "a_key_of_an_older_version: 1\n")
    report = write_report(run).read_text()
    assert "Paired differences" not in report and "| iter_1 |" in report
    assert "no paired comparisons" in caplog.text and "a_key_of_an_older_version" in caplog.text


def test_reward_model_judges_are_known_by_their_weights(tmp_path):
    """Two runs whose trained reward models have the same weights share a judge (their proxy rewards
    compare); other weights, or a preference model, do not."""
    from rlhf_workflow.eval.compare import _judge_identity

    feedback_judge = "feedback.judge_function=rlhf_workflow.tasks.instructions:judge"

    def run_with_rm(name: str, weights: bytes, *extra: str) -> tuple[Path, RunConfig]:
        run = tmp_path / name
        (run / "feedback" / "rm" / "model").mkdir(parents=True)
        (run / "feedback" / "rm" / "model" / "model.safetensors").write_bytes(weights)
        config = load_config(RunConfig, None, ["prompts.task=instructions", "prompts.per_iteration=4",
                                               "feedback.enabled=true", feedback_judge, *extra, f"output_dir={run}"])
        return run, config

    same = [_judge_identity(*run_with_rm(name, b"weights of one model")) for name in ("a", "b")]
    other = _judge_identity(*run_with_rm("c", b"weights of another"))
    assert same[0] == same[1] and same[0].startswith("reward_model:sha256:") and other != same[0]
    assert _judge_identity(*run_with_rm("d", b"weights of one model", "feedback.judge=pm")) is None
    untrained = tmp_path / "e"
    config = load_config(RunConfig, None, ["prompts.task=instructions", "prompts.per_iteration=4",
                                           "feedback.enabled=true", feedback_judge, f"output_dir={untrained}"])
    assert _judge_identity(untrained, config) == f"reward_model:trained in {untrained.resolve()}"


def test_seeds_that_disagree_are_shown_with_an_interval_over_seeds(tmp_path):
    """Seed effects +0.3, −0.25, +0.2 on every prompt: the interval over prompts (given these seeds)
    is narrow and away from 0; the seeds' own t-interval is wide and covers it; the notes say both."""
    from rlhf_workflow.eval.compare import notes, tables

    runs = []
    for seed, effect in ((0, 0.3), (1, -0.25), (2, 0.2)):
        base = {i: ([0.4, 0.4], [0.0, 0.0], [10, 10]) for i in PROMPTS}
        online = {i: ([0.4 + effect] * 2, [0.0, 0.0], [10, 10]) for i in PROMPTS}
        runs.append(make_run(tmp_path, f"demo-s{seed}", seed, {"iter_2": online, "offline": base}))
    [result] = compare(load([str(r) for r in runs]), [("demo/iter_2", "demo/offline")], resamples=200)
    gold = result.metrics["gold"]
    assert gold.mean == pytest.approx(0.25 / 3) and gold.ci95 == pytest.approx((0.25 / 3, 0.25 / 3))
    low, high = gold.seed_ci95
    assert low < 0 < high and (low, high) == pytest.approx(t_interval([0.3, -0.25, 0.2]))
    per_seed_table = tables([result])[1]
    assert per_seed_table[2][-1][2] == "over seeds (t)" and per_seed_table[2][-1][3] == \
        f"{0.25 / 3:+.3f} [{low:+.3f}, {high:+.3f}]"
    said = notes([result])
    assert any("given these seeds" in n for n in said)
    assert "iter_2 − offline, gold: the seeds disagree in sign (+0.300, -0.250, +0.200)" in said


def test_wins_and_losses_that_meet_at_equal_length_fix_the_rate_there():
    """Longer answers always win, but at Δ = 0 there are a win and two losses: the rate at equal
    length is what those say (1/3), however steep the slope."""
    lc, _, _, why_not = length_controlled_win_rate([[(1, 0), (0, 0), (0, 0)], [(1, 12), (1, 20)]], resamples=0)
    assert why_not == "" and lc == pytest.approx(1 / 3, abs=0.02)


def test_the_report_says_why_a_policy_has_no_length_controlled_win_rate(tmp_path):
    from rlhf_workflow.eval.report import write_report

    rng = random.Random(12)
    run = make_run(tmp_path, "small", 0, {"iter_0": random_policy(rng, 0), "iter_1": random_policy(rng, 0.2)})
    why = "the length differences separate the wins from the losses: nothing is known at equal length"
    write_jsonl(run / "metrics.jsonl", [{"id": "iter_0", "iteration": 0, "gold": 0.3},
                                        {"id": "iter_1", "iteration": 1, "gold": 0.4, "win_rate_vs_initial": 0.6,
                                         "lc_win_rate_vs_initial_note": why}])
    report = write_report(run).read_text()
    assert f"iter_1, length-controlled win rate vs π0: {why}." in report
    assert f"iter_1, length-controlled win rate vs π0: {why}." in (run / "report" / "report.html").read_text()


def test_a_seed_without_a_baseline_run_is_left_out_and_said(tmp_path):
    from rlhf_workflow.eval.compare import notes, to_json

    rng = random.Random(13)
    inputs = [f"pm={make_run(tmp_path, f'pm-{s}', s, {'iter_2': random_policy(rng, 0.1)}, judge='pm.py:j')}"
              for s in (0, 1, 2)]
    inputs += [f"rm={make_run(tmp_path, f'rm-{s}', s, {'iter_2': random_policy(rng, 0)}, judge='rm.py:j')}"
               for s in (0, 1)]
    [result] = compare(load(inputs), [("pm/iter_2", "rm/iter_2")], resamples=50)
    assert sorted(result.seeds) == [0, 1] and result.left_out == [2]
    assert "pm/iter_2 − rm/iter_2: seed(s) 2 of pm/iter_2 have no run of rm/iter_2 with that seed and are left out" \
        in notes([result])
    assert to_json([result])[0]["seeds_left_out"] == [2]


def test_a_prompt_scored_on_one_side_only_is_left_out_and_said(tmp_path):
    from rlhf_workflow.eval.compare import notes

    rng = random.Random(14)
    base, policy = random_policy(rng, 0), random_policy(rng, 0.2)
    policy["p3"] = ([None, None], policy["p3"][1], policy["p3"][2])  # the gold judge could not score p3
    run = make_run(tmp_path, "demo", 0, {"iter_0": base, "iter_1": policy})
    [result] = compare(load([str(run)]), [("demo/iter_1", "demo/iter_0")], resamples=50)
    gold = result.metrics["gold"]
    assert gold.prompts == 11 and result.metrics["length"].prompts == 12
    assert "gold: 1 prompt(s) scored on one side only (over all seeds) are left out" in notes([result])


def test_no_lc_interval_when_resamples_fall_where_the_model_only_extrapolates():
    """One win and one loss across equal length, the rest on one side: a fifth of the resamples hold
    only one-sided or separated comparisons, whose values were the ridge's (an interval of
    (0.0002, 0.99999999)); now the estimate stands without an interval, and the note says why."""
    groups = [[(1, 5), (0, -2)], [(1, 3)], [(0, -4)], [(0, 6)]]
    lc, interval, _, note = length_controlled_win_rate(groups, resamples=200)
    assert lc is not None and interval is None and note.startswith("no interval: in ")
    # 200 prompts of mixed lengths: no resample is degenerate, the interval is there
    rng = random.Random(15)
    many = [[(float(rng.random() < 0.6), rng.gauss(-5, 10))] for _ in range(200)]
    lc, interval, _, note = length_controlled_win_rate(many, resamples=200)
    assert interval is not None and note == "" and interval[0] < lc < interval[1]


def test_seeds_whose_two_sides_were_made_differently_are_named(tmp_path):
    """A variant run by other code or on another processor than its seed's baseline differs from it in
    arithmetic too: compare says which seeds; runs made by one set-up, or made before set-ups were
    recorded, get no such note."""
    from rlhf_workflow.eval.compare import notes, to_json

    rng = random.Random(15)

    def run(name, seed, shift, made_by, policies=("iter_2",)):
        path = make_run(tmp_path, name, seed, {p: random_policy(rng, shift) for p in policies}, judge=f"{name[:2]}.py:j")
        if made_by is not None:
            stages = ["prompts", "iter_2/eval"]
            (path / "state.json").write_text(json.dumps({"completed": stages, "seconds": {}, "made_by": {
                stage: setup for stage, setup in zip(stages, made_by) if setup is not None}}))
        return f"{name[:2]}={path}"

    here, there = "rlhf-workflow 0.1.0 (git aaaaaaa), AMD EPYC (x86_64, family 25)", "rlhf-workflow 0.1.0 (git bbbbbbb)"
    inputs = [run("pm-0", 0, 0.1, (here, here)), run("rm-0", 0, 0, (here, here)),  # one set-up
              run("pm-1", 1, 0.1, (here, there)), run("rm-1", 1, 0, (here, here)),  # continued on another
              run("pm-2", 2, 0.1, (there, there)), run("rm-2", 2, 0, (here, here)),  # made elsewhere
              run("pm-3", 3, 0.1, None), run("rm-3", 3, 0, (here, here)),  # not recorded
              run("pm-4", 4, 0.1, (None, there)), run("rm-4", 4, 0, (here, here))]  # recorded after a resume only
    [result] = compare(load(inputs), [("pm/iter_2", "rm/iter_2")], resamples=50)
    assert result.made_differently == [1, 2]
    assert ("pm/iter_2 − rm/iter_2: in seed(s) 1, 2 the two sides were made by different code or processors "
            "(each run's report, 'Made by'), so their difference also holds that of another draw of the arithmetic"
            in notes([result]))
    assert to_json([result])[0]["seeds_made_differently"] == [1, 2]
    # one run's policies are one draw of the recipe, however many set-ups made its stages
    single = run("xx-0", 0, 0, (here, there), policies=("iter_0", "iter_2")).partition("=")[2]
    [within] = compare(load([single]), [("xx-0/iter_2", "xx-0/iter_0")], resamples=50)
    assert within.made_differently == [] and not any("made by" in note for note in notes([within]))


def test_a_run_records_what_made_each_stage_and_its_report_says_so(tmp_path):
    from rlhf_workflow.eval.report import write_report
    from rlhf_workflow.online.loop import RunState
    from rlhf_workflow.provenance import made_by

    import torch
    import transformers

    setup = made_by()
    assert f"torch {torch.__version__}" in setup and f"transformers {transformers.__version__}" in setup
    assert setup.startswith("rlhf-workflow ")
    rng = random.Random(16)
    run = make_run(tmp_path, "demo", 0, {"iter_0": random_policy(rng, 0), "iter_1": random_policy(rng, 0.1)})
    write_jsonl(run / "metrics.jsonl", [{"id": "iter_0", "iteration": 0, "gold": 0.3},
                                        {"id": "iter_1", "iteration": 1, "gold": 0.4}])
    state = RunState(run)
    state.mark("prompts", 1.0)
    state.mark("iter_0/eval", 2.0)
    assert RunState(run).made_by == {"prompts": setup, "iter_0/eval": setup}
    assert f"- every stage: {setup}" in write_report(run).read_text()
    saved = json.loads((run / "state.json").read_text())
    saved["made_by"]["prompts"] = "rlhf-workflow 0.0.9, elsewhere"  # a run continued after an upgrade
    (run / "state.json").write_text(json.dumps(saved))
    report = write_report(run).read_text()
    assert "- prompts: rlhf-workflow 0.0.9, elsewhere" in report and f"- iter_0/eval: {setup}" in report
    del saved["made_by"]["prompts"]  # a run begun before set-ups were recorded
    (run / "state.json").write_text(json.dumps(saved))
    report = write_report(run).read_text()
    assert "- prompts: not recorded" in report and f"- iter_0/eval: {setup}" in report
    assert "iter_0/eval: " + setup.replace("&", "&amp;") in (run / "report" / "report.html").read_text()


def test_the_git_commit_is_the_last_that_changed_the_code(tmp_path):
    import shutil
    import subprocess

    from rlhf_workflow.provenance import git_commit

    if shutil.which("git") is None:
        pytest.skip("no git on this machine")
    assert git_commit(tmp_path) is None  # not a checkout
    repo, code = tmp_path / "repo", tmp_path / "repo" / "pkg"
    code.mkdir(parents=True)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]

    def commit(path, text):
        path.write_text(text)
        subprocess.run(git + ["add", "-A"], check=True)
        subprocess.run(git + ["commit", "-qm", "c"], check=True)
        return subprocess.run(git + ["rev-parse", "--short=7", "HEAD"], capture_output=True, text=True).stdout.strip()

    subprocess.run(git + ["init", "-q"], check=True)
    made = commit(code / "a.py", "x = 1\n")
    assert git_commit(code) == made
    commit(repo / "README.md", "docs\n")  # a commit that changed no code
    assert git_commit(code) == made
    (code / "a.py").write_text("x = 2\n")
    assert git_commit(code) == made + "+changes"
    # code installed into an ignored folder of some checkout (a venv in a project) is not that checkout's
    (repo / ".gitignore").write_text(".venv/\n")
    (repo / ".venv" / "pkg").mkdir(parents=True)
    (repo / ".venv" / "pkg" / "b.py").write_text("y = 1\n")
    assert git_commit(repo / ".venv" / "pkg") is None


def test_describing_the_set_up_never_fails_a_run(monkeypatch):
    from rlhf_workflow import provenance

    def broken():
        raise RuntimeError("driver gone")

    monkeypatch.setattr(provenance, "_describe", broken)
    provenance.made_by.cache_clear()
    try:
        assert provenance.made_by() == "set-up unknown (RuntimeError)"
    finally:
        provenance.made_by.cache_clear()


def test_an_unfinished_run_is_named_with_its_next_stage_and_the_policies_it_lacks(tmp_path):
    from rlhf_workflow.eval.compare import recipe_of_run, unfinished

    rng = random.Random(3)
    run = make_run(tmp_path, "run", 0, {"iter_0": random_policy(rng, 0.0), "iter_1": random_policy(rng, 0.1),
                                       "iter_2": random_policy(rng, 0.2)})
    config = recipe_of_run(run)
    assert unfinished(run, config) == (f"{run} has not finished: its next stage is prompts, and iter_0, iter_1, iter_2 "
                                       "are not evaluated yet")
    done = ["prompts", "iter_0/eval", "iter_1/generate", "iter_1/annotate", "iter_1/pairs", "iter_1/dpo", "iter_1/eval"]
    (run / "state.json").write_text(json.dumps({"completed": done}))
    assert unfinished(run, config) == f"{run} has not finished: its next stage is iter_2/generate, and iter_2 is not evaluated yet"
    (run / "state.json").write_text(json.dumps({"completed": done + [f"iter_2/{s}" for s in
                                                                      ("generate", "annotate", "pairs", "dpo", "eval")]}))
    assert unfinished(run, config) is None
    (run / "state.json").write_text('{"completed": [')
    with pytest.raises(UserError, match="state.json"):
        unfinished(run, config)
