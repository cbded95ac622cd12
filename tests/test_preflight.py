"""`run` checks its whole recipe before its first stage: one bad path, model directory, function or
batch size fails with one line that names the key, before anything is written; every problem found is
told at once. A training stage checks its inputs before it claims its output directory."""

from __future__ import annotations

import json

import pytest

from rlhf_workflow.cli import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _saved(path, architecture: str, *extra: str):
    """A directory that looks like a saved model of ``architecture`` (its config.json; `extra` files)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": [architecture], "model_type": "llama"}))
    for name in extra:
        (path / name).write_text("{}")
    return path


@pytest.fixture
def places(tmp_path):
    (tmp_path / "no-config").mkdir()
    (tmp_path / "no-config" / "model.safetensors").write_text("")
    return {
        "rm": _saved(tmp_path / "rm", "LlamaForSequenceClassification"),
        "pm": _saved(tmp_path / "pm", "LlamaForCausalLM", "preference_model.json"),
        "no_config": tmp_path / "no-config",
        "arith_prompts": tmp_path / "arith.jsonl",
    }


# (what is wrong, the overrides that make it so, what the one line must say)
BAD = [
    ("train prompts missing", ["prompts.train={tmp}/nope.jsonl"], "prompts.train: {tmp}/nope.jsonl does not exist"),
    ("eval prompts missing", ["prompts.eval={tmp}/nope.jsonl"], "prompts.eval: {tmp}/nope.jsonl does not exist"),
    ("policy missing", ["policy.name_or_path={tmp}/nowhere"], "(set by policy.name_or_path)"),
    ("policy without config.json", ["policy.name_or_path={no_config}"], "has no config.json"),
    ("policy is a reward model", ["policy.name_or_path={rm}"], "not a causal language model"),
    ("tokenizer missing", ["policy.tokenizer={tmp}/nowhere"], "(set by policy.tokenizer)"),
    ("judge path missing", ["judge.type=reward_model", "judge.path={tmp}/nowhere"], "judge.path {tmp}/nowhere is not a directory"),
    ("judge of the other type", ["judge.type=reward_model", "judge.path={pm}"], "holds a preference model; set judge.type"),
    ("judge function missing", ["judge.function={tmp}/nope.py:judge"], "judge.function '{tmp}/nope.py:judge'"),
    ("gold of another task", ["eval.gold_function=rlhf_workflow.tasks.arithmetic:judge"],
     "eval.gold_function 'rlhf_workflow.tasks.arithmetic:judge' cannot score the eval prompts"),
    ("a DPO batch no iteration fills", ["dpo.train.per_device_batch_size=9"],
     "= 9 pairs per step, more than the 8 pairs an iteration of 8 prompts gives at most (max_min); "
     "lower dpo.train.per_device_batch_size"),
]


@pytest.mark.parametrize(("what", "overrides", "says"), BAD, ids=[case[0] for case in BAD])
def test_one_bad_setting_fails_before_anything_is_written(what, overrides, says, recipe, places, tmp_path, capsys):
    fill = {"tmp": tmp_path, **places}
    run_dir = tmp_path / "run"
    assert main(["run", *recipe, f"output_dir={run_dir}", *(o.format(**fill) for o in overrides)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {run_dir}: the recipe cannot run, nothing was started")
    assert says.format(**fill) in err, err
    assert not run_dir.exists()  # no claim, no config.yaml: the next command into it starts clean


def test_every_problem_is_told_at_once(recipe, tmp_path, capsys):
    assert main(["run", *recipe, f"output_dir={tmp_path / 'run'}", f"prompts.eval={tmp_path}/nope.jsonl",
                 f"policy.name_or_path={tmp_path}/nowhere", f"judge.function={tmp_path}/nope.py:judge"]) == 2
    err = capsys.readouterr().err
    assert "prompts.eval:" in err and "policy.name_or_path" in err and "judge.function" in err


def test_feedback_settings_are_checked_too(tmp_path, capsys):
    """The simulated human against the task's prompts, a backbone that is not there, and the reward
    model's batch against the feedback prompts (group_by_prompt: prompts per step)."""
    assert main(["demo", f"output_dir={tmp_path / 'demo'}", "feedback.judge_function=rlhf_workflow.tasks.arithmetic:judge",
                 f"feedback.rm.model.name_or_path={tmp_path}/nowhere", "feedback.rm.train.per_device_batch_size=100",
                 "generation.dtype=float32", "judge.dtype=float32", "feedback.rm.train.precision=float32",
                 "dpo.train.precision=float32"]) == 2
    err = capsys.readouterr().err
    assert "feedback.judge_function 'rlhf_workflow.tasks.arithmetic:judge' cannot score the feedback prompts" in err
    assert "(set by feedback.rm.model.name_or_path)" in err
    assert "= 100 prompts per step, more than the 64 prompts the feedback's 64 prompts give the reward model" in err
    assert not (tmp_path / "demo").exists()


def test_a_training_stage_checks_its_inputs_before_it_claims_its_directory(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sft"
    assert main(["sft", f"data.train={tmp_path}/nope.jsonl", f"data.eval={tmp_path}/nope2.jsonl",
                 f"model.name_or_path={tiny_model_dir}", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert f"data.train: {tmp_path}/nope.jsonl does not exist; data.eval: {tmp_path}/nope2.jsonl does not exist" in err
    assert not out.exists()


def test_a_directory_a_failed_stage_left_only_its_config_in_is_taken_by_the_next(tiny_model_dir, tmp_path, sft_data):
    """A command that failed after writing its config (an earlier version, or a failure past the checks)
    leaves nothing another command would lose: it is taken, not refused."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".rlhf-workflow.json").write_text('{"stage": "train-rm"}\n')
    (out / "config.yaml").write_text("output_dir: out\n")
    assert main(["sft", f"data.train={sft_data}", f"model.name_or_path={tiny_model_dir}", f"output_dir={out}",
                 "train.max_steps=1"]) == 0


def test_a_run_that_has_not_finished_a_stage_takes_a_new_recipe(tmp_path):
    from rlhf_workflow.config import RunConfig, load_config
    from rlhf_workflow.online.loop import check_config

    run = tmp_path / "run"
    run.mkdir()
    base = ["prompts.task=instructions", "prompts.per_iteration=4", "judge.path=rm"]
    check_config(run, load_config(RunConfig, None, base), force=False)
    changed = load_config(RunConfig, None, [*base, "iterations=3"])
    check_config(run, changed, force=False)  # nothing finished: no refusal
    assert "iterations: 3" in (run / "config.yaml").read_text()


def test_run_falls_back_to_fp32_on_a_cpu_where_bf16_is_slower(tmp_path, monkeypatch, capsys):
    from rlhf_workflow import processes, workflow

    recipe = tmp_path / "r.yaml"
    recipe.write_text("prompts: {task: instructions, per_iteration: 4}\njudge: {path: rm, dtype: bfloat16}\n"
                      "dpo: {train: {precision: bfloat16}}\n")
    monkeypatch.setattr(processes, "no_accelerator", lambda: True)
    monkeypatch.setattr(workflow, "cpu_bf16_speedup", lambda: 0.5)
    config = workflow.run_config(recipe, [f"output_dir={tmp_path / 'run'}"])
    assert (config.judge.dtype, config.dpo.train.precision, config.generation.dtype) == ("float32", "float32", None)
    assert "the run runs in fp32 (judge.dtype=float32 dpo.train.precision=float32)" in capsys.readouterr().out
    kept = workflow.run_config(recipe, [f"output_dir={tmp_path / 'run'}", "dpo.train.precision=bfloat16"])
    assert kept.dpo.train.precision == "bfloat16"  # the command line's own setting wins
    monkeypatch.setattr(workflow, "cpu_bf16_speedup", lambda: 2.5)
    assert workflow.run_config(recipe, [f"output_dir={tmp_path / 'run2'}"]).judge.dtype == "bfloat16"


def test_a_continued_run_is_checked_against_the_prompts_it_wrote(recipe, tmp_path):
    """Once a run has written its prompts, moving the recipe's prompts files away does not stop it."""
    from rlhf_workflow.config import RunConfig, config_to_yaml, load_config
    from rlhf_workflow.data.io import write_jsonl
    from rlhf_workflow.data.run_layout import RunLayout
    from rlhf_workflow.online.preflight import check_run

    run = tmp_path / "run"
    config = load_config(RunConfig, None, [*recipe, f"output_dir={run}", "iterations=1",
                                            f"prompts.train={tmp_path}/moved.jsonl"])
    with pytest.raises(Exception, match="prompts.train: .*moved.jsonl does not exist"):
        check_run(config)
    layout = RunLayout(run)
    write_jsonl(layout.eval_prompts, [{"id": "e0", "prompt": "Tell me about the moon."}])
    write_jsonl(layout.iteration(1).prompts, [{"id": f"t{i}", "prompt": f"Write about {i}."} for i in range(8)])
    layout.state.write_text('{"completed": ["prompts"]}')
    layout.config.write_text(config_to_yaml(config))
    check_run(config)  # its own copies are read
    # a recipe whose prompts changed redoes the prompts (with --force): its files are checked again
    other = config.model_copy(update={"prompts": config.prompts.model_copy(update={"train": f"{tmp_path}/other.jsonl"})})
    with pytest.raises(Exception, match="prompts.train: .*other.jsonl does not exist"):
        check_run(other)
    other = config.model_copy(update={"dpo": config.dpo.model_copy(update={"logprob_chunk": 7})})
    check_run(other)  # a change that feeds later stages only: the run keeps its prompts
