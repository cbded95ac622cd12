"""The declared stages of a run (`rlhf_workflow.stages`): complete, consistent, and what the loop,
--force and the experiments go by."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_workflow.config import RunConfig, load_config
from rlhf_workflow.stages import NO_OUTPUT, SHAPE, changed_keys, companions, leaf_values, plan, still_valid
from rlhf_workflow.workflow import DEMO_FULL_RECIPE, DEMO_RECIPE

SHAPES = {  # recipes that between them have every kind of stage
    "demo": [],
    "pm judge, three iterations, earlier policies": ["feedback.judge=pm", "iterations=3",
                                                     "generation.earlier_policies=1", "reference=previous"],
    "offline only": ["mode=offline", "offline.after_online=false"],
    "no feedback": ["feedback.enabled=false", "judge.type=function", "judge.function=rlhf_workflow.tasks.instructions:judge"],
}


def recipe(tmp_path: Path, *overrides: str, source: Path = DEMO_RECIPE) -> RunConfig:
    return load_config(RunConfig, source, [*overrides, f"output_dir={tmp_path / 'run'}"])


def test_the_demo_runs_the_papers_stages_in_order(tmp_path):
    names = [stage.name for stage in plan(recipe(tmp_path))]
    assert names == ["prompts", "feedback/generate", "feedback/annotate", "feedback/pairs", "feedback/rm",
                     "feedback/eval-rm", "iter_0/eval",
                     *(f"iter_{t}/{step}" for t in (1, 2) for step in ("generate", "annotate", "pairs", "dpo", "eval")),
                     "offline/generate", "offline/annotate", "offline/pairs", "offline/dpo", "offline/eval"]


@pytest.mark.parametrize("shape", SHAPES)
def test_every_stage_reads_only_what_an_earlier_stage_wrote(shape, tmp_path):
    """The run's own files a stage reads are written by a stage before it (the loop checks them
    before each stage, and --force relies on the order)."""
    config = recipe(tmp_path, *SHAPES[shape])
    written: set[Path] = set()
    names = []
    for stage in plan(config):
        for path in stage.reads:
            assert any(path == w or w in path.parents for w in written), (stage.name, path)
        written.update(stage.writes)
        names.append(stage.name)
    assert len(names) == len(set(names))
    assert sum(stage.evaluates is not None for stage in plan(config)) == sum(n.endswith("/eval") for n in names)


def test_every_key_of_the_recipe_feeds_a_stage_or_shapes_the_plan(tmp_path):
    """So a changed key always redoes what it changes: no key is left out of the declaration."""
    config = recipe(tmp_path, "feedback.train_pm=true", "offline.after_online=true", "iterations=2",
                    "feedback.rm.model.name_or_path=x", "feedback.pm.model.name_or_path=x", source=DEMO_FULL_RECIPE)
    stages = plan(config)
    orphans = [key for key in leaf_values(config)
               if not any(stage.fed_by(key) for stage in stages)
               and not any(key == k or key.startswith(k + ".") for k in SHAPE + NO_OUTPUT)]
    assert orphans == []


def test_a_changed_key_keeps_the_stages_before_the_first_it_feeds(tmp_path):
    old = recipe(tmp_path)
    completed = [stage.name for stage in plan(old)]

    def kept(*overrides: str) -> tuple[str | None, str]:
        stages, why = still_valid(completed, old, recipe(tmp_path, *overrides))
        return (stages[-1] if stages else None), why

    assert kept() == ("offline/eval", "every stage is kept")
    assert kept("output_dir=elsewhere") == ("offline/eval", "every stage is kept")
    assert kept("dpo.loss.beta=0.3") == ("iter_1/pairs", "iter_1/dpo is fed by dpo.loss.beta")
    assert kept("reference=previous") == ("iter_2/pairs", "iter_2/dpo is fed by reference")
    assert kept("length_penalty.coef=0.1") == ("iter_1/generate", "iter_1/annotate is fed by length_penalty.coef")
    assert kept("offline.after_online=false") == ("iter_2/eval", "offline/generate is not a stage of the new recipe")
    assert kept("feedback.sampling.n=3")[0] == "prompts"
    assert kept("iterations=3") == (None, "prompts is fed by iterations")
    assert changed_keys(old, recipe(tmp_path, "dpo.loss.beta=0.3", "seed=2")) == ["dpo.loss.beta", "seed"]


def test_a_files_companions_are_the_files_written_beside_it(tmp_path):
    for name in ("generations.jsonl", "generations.settings.json", "generations.source0.jsonl", "generations.rank1.jsonl",
                 "all_pairs.jsonl", "pairs.jsonl", "pairs.stats.json", ".generations.jsonl.lock"):
        (tmp_path / name).write_text("")
    assert [p.name for p in companions(tmp_path / "generations.jsonl")] == [
        "generations.jsonl", "generations.rank1.jsonl", "generations.settings.json", "generations.source0.jsonl"]
    assert [p.name for p in companions(tmp_path / "pairs.jsonl")] == ["pairs.jsonl", "pairs.stats.json"]
    assert companions(tmp_path / "absent" / "x.jsonl") == []
