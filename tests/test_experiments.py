"""experiments/claims.py: a variant run that starts from the stages it shares with its seed's demo
run ends exactly where the same variant run whole ends; the stages' declared outputs are every file
a real run writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from rlhf_workflow.cli import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

ROOT = Path(__file__).resolve().parents[1]


def load_claims():
    spec = importlib.util.spec_from_file_location("claims", ROOT / "experiments" / "claims.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


claims = load_claims()


def miniature(tiny_model_dir, run_dir: Path, *extra: str) -> list[str]:
    """`demo` arguments of a two-iteration miniature of the demo on the tiny model."""
    return [
        f"output_dir={run_dir}", f"policy.name_or_path={tiny_model_dir}", "iterations=2", "prompts.per_iteration=6",
        "prompts.eval_count=6", "feedback.prompts=10", "feedback.sampling.n=4", "feedback.sampling.max_new_tokens=8",
        "feedback.judge_function=rlhf_workflow.tasks.instructions:noisy_judge", "feedback.rm.train.epochs=1",
        "feedback.rm.data.max_length=96", "feedback.pm.data.max_length=96", "feedback.rm.train.per_device_batch_size=2", "dpo.train.per_device_batch_size=2",
        "generation.sampling.max_new_tokens=8", "generation.hf.batch_size=4", "judge.max_length=96",
        "dpo.data.max_length=96", "dpo.train.epochs=1", "dpo.train.lr=1e-3", "eval.sampling.max_new_tokens=8",
        "eval.bootstrap=100", "generation.dtype=float32", "judge.dtype=float32", "feedback.rm.train.precision=float32",
        "dpo.train.precision=float32", *extra,
    ]


def files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


def eval_rows(run_dir: Path, policy: str) -> list[dict]:
    rows = []
    for name in ("scored.jsonl", "gold.jsonl"):
        rows += [json.loads(line) for line in (run_dir / policy / "eval" / name).read_text().splitlines()]
    return rows


def test_a_variant_from_the_demos_shared_stages_ends_as_the_whole_variant_run(tiny_model_dir, tmp_path):
    demo, whole, reused = tmp_path / "demo-s0", tmp_path / "whole", tmp_path / "max-random-s0"
    assert main(["demo", *miniature(tiny_model_dir, demo)]) == 0
    variant = ["pairs.strategy=max_random", "offline.after_online=false"]
    assert main(["demo", *miniature(tiny_model_dir, whole, *variant)]) == 0

    config_yaml = (whole / "config.yaml").read_text().replace(str(whole), str(reused))
    stages, why = claims.shared_stages(demo, config_yaml)
    assert stages[-1] == "iter_1/annotate" and "iter_1/pairs is fed by" in why
    assert stages == json.loads((demo / "state.json").read_text())["completed"][: len(stages)]
    claims.copy_shared(demo, reused, stages)
    assert not list(reused.rglob("*.lock")) and not (reused / "offline").exists()
    assert [json.loads(line)["id"] for line in (reused / "metrics.jsonl").read_text().splitlines()] == ["iter_0"]
    assert main(["demo", *miniature(tiny_model_dir, reused, *variant)]) == 0

    # every stage after the copied ones made what the whole run made
    for policy in ("iter_1", "iter_2"):
        assert eval_rows(reused, policy) == eval_rows(whole, policy)
    assert (reused / "iter_2/pairs.jsonl").read_text() == (whole / "iter_2/pairs.jsonl").read_text()
    metrics = [[{k: v for k, v in json.loads(line).items() if k != "policy"}  # the policy's path
                for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (whole, reused)]
    assert metrics[0] == metrics[1]
    state = json.loads((reused / "state.json").read_text())
    seconds = state["seconds"]
    assert all(seconds[s] == 0.0 for s in stages) and seconds["iter_2/eval"] > 0
    made_by = json.loads((demo / "state.json").read_text())["made_by"]  # the copies keep what made them
    assert all(state["made_by"][s] == made_by[s] for s in stages) and state["made_by"]["iter_2/eval"] == made_by["prompts"]
    assert json.loads((reused / "reused.json").read_text()) == {"from": str(demo), "stages": stages}

    # the declared outputs of the stages are every file the run wrote: a variant that shares every
    # stage but the baseline's copies the whole run but for offline/, the report and the run's own files
    everything = config_yaml.replace("max_random", "max_min")
    all_stages, _ = claims.shared_stages(demo, everything.replace(str(reused), str(tmp_path / "all")))
    assert all_stages[-1] == "iter_2/eval"
    claims.copy_shared(demo, tmp_path / "all", all_stages)
    own = {"config.yaml", "state.json", "metrics.jsonl", "reused.json"}
    expected = {f for f in files(demo) if not f.startswith(("offline/", "report/")) and not f.endswith(".lock")
                and f.split("/")[-1] != ".lock"} | own
    assert files(tmp_path / "all") | {"config.yaml"} == expected


def test_shared_stages_stop_at_the_first_stage_a_differing_key_feeds(tmp_path):
    from rlhf_workflow.config import RunConfig, config_to_yaml, load_config
    from rlhf_workflow.workflow import DEMO_FULL_RECIPE as DEMO_RECIPE

    source = tmp_path / "demo-s0"
    source.mkdir()
    (source / "config.yaml").write_text(config_to_yaml(load_config(RunConfig, DEMO_RECIPE, [f"output_dir={source}"])))
    order = ["prompts", "feedback/generate", "feedback/annotate", "feedback/pairs", "feedback/rm", "feedback/eval-rm",
             "iter_0/eval", "iter_1/generate", "iter_1/annotate", "iter_1/pairs", "iter_1/dpo", "iter_1/eval",
             "iter_2/generate", "iter_2/annotate", "iter_2/pairs", "iter_2/dpo", "iter_2/eval", "offline/generate"]
    (source / "state.json").write_text(json.dumps({"completed": order}))

    def shared(*overrides: str) -> tuple[list[str], str]:
        variant = load_config(RunConfig, DEMO_RECIPE, [*overrides, f"output_dir={tmp_path / 'variant'}"])
        return claims.shared_stages(source, config_to_yaml(variant))

    def last(*overrides: str) -> str | None:
        stages, _ = shared(*overrides)
        return stages[-1] if stages else None

    assert last() == "offline/generate"  # the same recipe in another directory: everything
    assert last("pairs.strategy=random") == "iter_1/annotate"
    assert last("reference=previous") == "iter_2/pairs"
    assert last("length_penalty.coef=0.01") == "iter_1/generate"
    assert last("feedback.judge=pm", "judge.ranking=knockout", "feedback.pm.train.lr=1e-4") == "feedback/eval-rm"
    assert last("feedback.pm.train.lr=1e-4") == "offline/generate"  # the preference model judges nothing here
    assert last("pairs.strategy=random", "reference=previous") == "iter_1/annotate"  # the earliest cut wins
    stages, why = shared("dpo.train.lr=1e-5", "pairs.strategy=random")
    assert stages[-1] == "iter_1/annotate" and why == "iter_1/pairs is fed by pairs.strategy"
    assert last("dpo.train.lr=1e-5") == "iter_1/pairs"
    assert last("eval.bootstrap=10") == "feedback/eval-rm"  # every evaluation, and so every stage after π0's
    assert last("judge.dtype=float32") == "feedback/rm"  # the reward model's accuracy is measured in it
    stages, why = shared("seed=1")
    assert stages == [] and why == "prompts is fed by seed"

    # a config.yaml written before a key existed: the key's default is what its run used
    held = yaml.safe_load((source / "config.yaml").read_text())
    del held["generation"]["openai"]["base_urls"]
    (source / "config.yaml").write_text(yaml.safe_dump(held, sort_keys=False))
    assert last("pairs.strategy=random") == "iter_1/annotate"


def test_a_variant_starts_from_the_run_of_its_seed_that_shares_the_most(tmp_path):
    """Round robin starts from the preference model a knockout run of its seed trained; a preference
    model trained otherwise is not taken from it; the demo wins a tie; other seeds never count."""
    from rlhf_workflow.config import RunConfig, config_to_yaml, load_config
    from rlhf_workflow.workflow import DEMO_FULL_RECIPE as DEMO_RECIPE

    head = ["prompts", "feedback/generate", "feedback/annotate", "feedback/pairs", "feedback/rm", "feedback/eval-rm"]
    loop = ["iter_0/eval", "iter_1/generate", "iter_1/annotate", "iter_1/pairs", "iter_1/dpo", "iter_1/eval",
            "iter_2/generate", "iter_2/annotate", "iter_2/pairs", "iter_2/dpo", "iter_2/eval"]

    def made(name: str, completed: list[str], *overrides: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        config = load_config(RunConfig, DEMO_RECIPE, [*overrides, "offline.after_online=false", f"output_dir={path}"])
        (path / "config.yaml").write_text(config_to_yaml(config))
        (path / "state.json").write_text(json.dumps({"completed": completed}))
        return path

    def variant(name: str, *overrides: str) -> tuple[Path | None, list[str], str]:
        target = tmp_path / name
        config = load_config(RunConfig, DEMO_RECIPE, [*overrides, "offline.after_online=false", f"output_dir={target}"])
        return claims.best_source(tmp_path, 0, target, config_to_yaml(config))

    demo = made("demo-s0", head + loop)
    knockout = made("pm-knockout-s0", head + ["feedback/pm", "feedback/eval-pm"] + loop,
                    "feedback.judge=pm", "judge.ranking=knockout")
    made("pm-knockout-s1", head + ["feedback/pm", "feedback/eval-pm"] + loop, "feedback.judge=pm", "seed=1")

    source, stages, why = variant("pm-copeland-s0", "feedback.judge=pm", "judge.ranking=copeland")
    assert source == knockout and stages == head + ["feedback/pm", "feedback/eval-pm"]
    assert "iter_0/eval is fed by judge.ranking" in why
    source, stages, _ = variant("pm-lr-s0", "feedback.judge=pm", "judge.ranking=knockout", "feedback.pm.train.lr=1e-4")
    assert source == demo and stages == head  # the knockout run's preference model trained at another lr
    source, stages, _ = variant("random-s0", "pairs.strategy=random")
    assert source == demo and stages[-1] == "iter_1/annotate"
    # a reward-model run never takes the preference model's stages of a run that trained one
    random = load_config(RunConfig, DEMO_RECIPE, ["pairs.strategy=random", "offline.after_online=false",
                                                  f"output_dir={tmp_path / 'random-s0'}"])
    stages, why = claims.shared_stages(knockout, config_to_yaml(random))
    assert stages == head and why == "feedback/pm is not a stage of the new recipe"
    (knockout / "config.yaml").write_text("policy: [unreadable\n")  # a sibling's broken config: not used
    source, stages, _ = variant("pm-copeland-s0", "feedback.judge=pm", "judge.ranking=copeland")
    assert source == demo and stages == head
    assert claims.best_source(tmp_path, 2, tmp_path / "x-s2", (demo / "config.yaml").read_text())[0] is None


def test_the_tables_of_a_question_list_its_runs_and_pool_the_rates_per_instruction(tmp_path):
    def finished_run(variant: str, seed: int, iter2: dict, judge: str = "rm", made_by: str = "here") -> None:
        from rlhf_workflow.config import RunConfig, config_to_yaml, load_config
        from rlhf_workflow.stages import plan
        from rlhf_workflow.workflow import DEMO_FULL_RECIPE

        path = tmp_path / f"{variant}-s{seed}"
        (path / "feedback").mkdir(parents=True)
        config = load_config(RunConfig, DEMO_FULL_RECIPE, [f"feedback.judge={judge}", f"seed={seed}", f"output_dir={path}",
                                                           *claims.VARIANTS[variant],
                                                           *([] if variant == "demo" else claims.ONLY_DEMO_TRAINS_OFFLINE)])
        (path / "config.yaml").write_text(config_to_yaml(config))
        completed = [stage.name for stage in plan(config)]
        # a variant's first stage copied from a demo run made before runs recorded their set-up
        recorded = {stage: made_by for stage in (completed if variant == "demo" else completed[1:])}
        (path / "state.json").write_text(json.dumps({"completed": completed,
                                                     "seconds": {"iter_2/eval": 30.4, "offline/eval": 20.2},
                                                     "made_by": recorded}))
        (path / "feedback" / f"{judge}_eval.json").write_text(json.dumps({"accuracy": 0.6, "pairs": 50}))
        base = {"gold": 0.3, "length_tokens": 40.0, "ifeval_types": {"a": {"n": 10, "strict": 0.2}}}
        rows = [{"id": "iter_0", **base}, {"id": "iter_1", "gold": 0.35, "pairs": 64, "length_tokens": 30.0},
                {"id": "iter_2", "pairs": 63, "win_rate_vs_initial": 0.8, "lc_win_rate_vs_initial": 0.5,
                 "kl_vs_initial": 2.0, **iter2}]
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    finished_run("demo", 0, {"gold": 0.4, "length_tokens": 12.0, "ifeval_types": {"a": {"n": 10, "strict": 0.5}}})
    finished_run("demo", 1, {"gold": 0.5, "length_tokens": 14.0, "ifeval_types": {"a": {"n": 10, "strict": 0.7}}})
    finished_run("length-penalty-0.01", 0, {"gold": 0.45, "length_tokens": 20.0,
                                            "ifeval_types": {"a": {"n": 10, "strict": 0.4}}}, made_by="there")
    lines = claims.run_lines(tmp_path, ["demo", "length-penalty-0.01"], [0, 1])
    assert "| demo | 0 | RM 0.600 (50 pairs) | 64 + 63 | 0.300 → 0.350 → 0.400 | 0.80 / 0.50 | 2.00 | 12.0 | 51 |" in lines
    assert "- made by here: demo-s0, demo-s1" in lines and "- made by there: length-penalty-0.01-s0" in lines
    assert "- stages not recorded (made, or copied from a run made, before runs recorded their set-up): " \
           "length-penalty-0.01-s0" in lines
    assert sum(line.startswith("| length-penalty-0.01 |") for line in lines) == 1  # seed 1 is not done
    rates = claims.type_rate_lines(tmp_path, ["demo", "length-penalty-0.01"], [0, 1])
    # pooled over the seeds every variant has (seed 0 only): π0 2/10, demo 5/10, the penalty 4/10
    assert rates[0].endswith("seeds 0 pooled") and "| `a` | 10 | 0.20 | 0.50 | 0.40 |" in rates


def test_variants_narrow_the_runs_to_make_and_keep_the_demo_they_pair_with(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(claims, "run", lambda root, variant, seed, split, log, recipe: made.append((variant, seed)) or 0.0)
    monkeypatch.setattr(claims, "write_tables", lambda root, questions, seeds, recipe: root / "claims.md")
    assert claims.main(["--root", str(tmp_path), "--seeds", "0", "1", "--only", "judge", "length",
                        "--variants", "pm-knockout", "length-bonus-0.01"]) == 0
    assert made == [("demo", 0), ("pm-knockout", 0), ("length-bonus-0.01", 0),
                    ("demo", 1), ("pm-knockout", 1), ("length-bonus-0.01", 1)]
    made.clear()
    assert claims.main(["--root", str(tmp_path), "--seeds", "2", "--only", "pairs"]) == 0
    assert made == [("demo", 2), ("max-random", 2), ("random", 2)]
    made.clear()
    with pytest.raises(SystemExit):  # a variant of none of the questions asked: said, nothing run
        claims.main(["--root", str(tmp_path), "--only", "pairs", "--variants", "pm-knockout"])
    assert made == []


def test_a_root_holds_the_runs_of_one_recipe_and_quick_runs_the_demo_without_full(tmp_path, monkeypatch, capsys):
    """--recipe quick runs `rlhf-workflow demo` (no --full) and says so in its tables' header; a root
    holding a run of the other recipe is refused before anything runs, as that run would otherwise
    be skipped as done and pooled with the others."""
    import subprocess

    from rlhf_workflow.config import RunConfig, config_to_yaml, load_config
    from rlhf_workflow.workflow import DEMO_FULL_RECIPE, DEMO_RECIPE

    commands = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: commands.append(command))
    claims.run(tmp_path, "demo", 0, "eval", tmp_path / "log", "quick")
    assert commands[-1][3] == "demo" and "--full" not in commands[-1]
    claims.run(tmp_path, "demo", 0, "eval", tmp_path / "log")
    assert commands[-1][3:5] == ["demo", "--full"]

    full = tmp_path / "demo-s0"
    full.mkdir()
    (full / "config.yaml").write_text(config_to_yaml(load_config(RunConfig, DEMO_FULL_RECIPE, [f"output_dir={full}"])))
    assert claims.recipe_of(full) == "full" and claims.recipe_of(tmp_path / "none") is None
    made = []
    monkeypatch.setattr(claims, "run", lambda *args: made.append(args) or 0.0)
    with pytest.raises(SystemExit):
        claims.main(["--root", str(tmp_path), "--recipe", "quick", "--seeds", "0", "--only", "main"])
    assert "is a run of --recipe full, not quick" in capsys.readouterr().err and made == []
    with pytest.raises(SystemExit):
        claims.main(["--root", str(tmp_path), "--recipe", "quick", "--report-only"])

    quick = tmp_path / "quick"
    (quick / "demo-s0").mkdir(parents=True)
    (quick / "demo-s0" / "config.yaml").write_text(
        config_to_yaml(load_config(RunConfig, DEMO_RECIPE, [f"output_dir={quick / 'demo-s0'}"])))
    assert claims.main(["--root", str(quick), "--recipe", "quick", "--seeds", "0", "--only", "main", "--report-only"]) == 0
    assert "--recipe quick` made these tables" in (quick / "claims.md").read_text()


def test_no_variant_sets_a_precision_of_its_own():
    """A precision on a variant's command line would win over the demo's fp32 choice (on a CPU
    without bf16 instructions a bf16 one runs about 100x slower): variants take their demo's."""
    for name, overrides in claims.VARIANTS.items():
        keys = {override.partition("=")[0] for override in overrides}
        assert not any(key.endswith((".precision", ".dtype")) for key in keys), name


@pytest.mark.parametrize("trained", ["float32", "bfloat16"])
def test_a_variant_starts_in_its_demos_precision_and_continues_in_its_own(tmp_path, monkeypatch, trained):
    """A new variant gets the precision of its seed's demo run, its preference model that of the demo's
    reward model (a demo run made before the recipe named the preference model's holds its default,
    fp32); a variant that has started gets none, as `demo` continues a run in its own."""
    import subprocess

    from rlhf_workflow.config import RunConfig, config_to_yaml, load_config
    from rlhf_workflow.workflow import DEMO_FULL_RECIPE as DEMO_RECIPE, PRECISION_KEYS

    demo = tmp_path / "demo-s0"
    demo.mkdir()
    precision = [f"{key}={value}" for key, value in PRECISION_KEYS.items()] if trained == "float32" else []
    held = load_config(RunConfig, DEMO_RECIPE, precision + [f"output_dir={demo}"])
    (demo / "config.yaml").write_text(config_to_yaml(held))
    (demo / "state.json").write_text(json.dumps({"completed": []}))
    commands = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: commands.append(command))
    claims.run(tmp_path, "pm-knockout", 0, "eval", tmp_path / "log")
    assert commands[-1][3:5] == ["demo", "--full"]  # the recipe the README's tables run
    keys = [arg.partition("=")[0] for arg in commands[-1][5:]]
    assert len(keys) == len(set(keys))  # each setting once
    settings = dict(arg.partition("=")[::2] for arg in commands[-1][5:])
    assert settings["feedback.pm.train.precision"] == trained == settings["feedback.rm.train.precision"]
    assert all(settings[key] == str(held.value_at(key)) for key in PRECISION_KEYS if key != "feedback.pm.train.precision")
    variant = tmp_path / "pm-knockout-s0"
    variant.mkdir(exist_ok=True)
    (variant / "config.yaml").write_text("started: true\n")
    claims.run(tmp_path, "pm-knockout", 0, "eval", tmp_path / "log")
    assert not [arg for arg in commands[-1] if arg.split("=")[0] in PRECISION_KEYS]
    assert "feedback.judge=pm" in commands[-1]
