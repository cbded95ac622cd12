"""One name per setting: a run recipe nests the stages' own settings under the stages' own names
(`dpo.train.lr` is the `dpo` stage's `train.lr`), a message from inside a stage names the key as the
command that was run takes it, did-you-mean hints search nested keys, every --help example is made
of the command's own keys, and the names of earlier versions still load with one warning each."""

from __future__ import annotations

import logging
import shlex

import pytest

from rlhf_workflow.cli import EXAMPLES, command_parsers, main
from rlhf_workflow.config import (COMMAND_CONFIGS, RunConfig, config_reference, config_to_yaml, load_config,
                                  upgrade_keys)
from rlhf_workflow.errors import config_key, keys_named

# The stages a run runs, the stage config each one is, and the keys of that config the run sets
# itself (paths, models it trained, seeds it derives), which a recipe therefore does not name.
RUN_STAGES = {
    "generate": ("generate", {"prompts", "output", "token_ids"}),
    "eval/generate": ("generate", {"prompts", "output", "token_ids"}),
    "feedback/generate": ("generate", {"prompts", "output", "token_ids"}),
    "annotate": ("annotate", {"input", "output", "rows_per_write", "keep_prompt_states"}),
    "pairs": ("pairs", {"input", "output", "seed", "max_pairs"}),
    "dpo": ("dpo", {"output_dir", "data.train", "data.eval", "reference.precompute", "reference.name_or_path"}),
    "feedback/rm": ("train-rm", {"output_dir", "data.train", "data.eval"}),
    "feedback/pm": ("train-pm", {"output_dir", "data.train", "data.eval"}),
}


def _settings(command: str, run_sets: set[str]) -> dict[str, str]:
    """The settings of a stage's config a recipe may give: {key: its type}, sections left out."""
    keys = {}
    for key in config_reference(COMMAND_CONFIGS[command]):
        if key.type.startswith("section") or any(key.key == k or key.key.startswith(k + ".") for k in run_sets):
            continue
        keys[key.key] = key.type
    return keys


@pytest.mark.parametrize("stage", sorted(RUN_STAGES))
def test_a_run_names_every_setting_of_a_stage_it_runs_as_that_stage_does(stage):
    """Each setting of the stage is a key of the run recipe, named as `RunConfig.stage_keys` says, of the
    same type, and messages inside the stage name it so: one name per setting, in both places."""
    command, run_sets = RUN_STAGES[stage]
    run_keys = {key.key: key.type for key in config_reference(RunConfig)}
    # a feedback model's backbone is `feedback.rm.model` (a section that defaults to the policy's)
    optional = {key.removesuffix(" | None") for key in run_keys.values()}
    missing, typed_otherwise = [], []
    with keys_named(RunConfig.stage_keys[stage]):
        for key, kind in _settings(command, run_sets).items():
            named = config_key(key)
            if named not in run_keys:
                missing.append(f"{key} -> {named}")
            elif run_keys[named] != kind and kind not in optional:
                typed_otherwise.append(f"{key} ({kind}) -> {named} ({run_keys[named]})")
    assert not missing, f"{command}'s settings a run names nowhere: {missing}"
    assert not typed_otherwise, typed_otherwise


def test_every_run_section_that_is_a_stages_names_its_keys_as_the_stage():
    """The other way round: every key under a run's dpo / feedback.rm / feedback.pm section is the stage's
    own key with the section's prefix (no setting of a stage's under a name of the run's own)."""
    stage_keys = {prefix: {key.key for key in config_reference(COMMAND_CONFIGS[command])}
                  for prefix, command in (("dpo.", "dpo"), ("feedback.rm.", "train-rm"), ("feedback.pm.", "train-pm"))}
    for key in config_reference(RunConfig):
        for prefix, keys in stage_keys.items():
            if key.key.startswith(prefix):
                assert key.key.removeprefix(prefix) in keys, key.key


def test_messages_from_inside_a_stage_name_the_key_the_user_types():
    assert config_key("train.per_device_batch_size") == "train.per_device_batch_size"  # the stage's own command
    with keys_named(RunConfig.stage_keys["dpo"]):
        assert config_key("train.per_device_batch_size") == "dpo.train.per_device_batch_size"
        assert config_key("model.name_or_path") == "policy.name_or_path"
        assert config_key("data.apply_chat_template") == "apply_chat_template"
    with keys_named(RunConfig.stage_keys["eval/generate"]):
        assert config_key("sampling.max_new_tokens") == "eval.sampling.max_new_tokens"
        assert config_key("hf.batch_size") == "generation.hf.batch_size"
    assert config_key("train.lr") == "train.lr"  # left as it was


def test_a_run_whose_dpo_batch_no_iteration_fills_names_the_runs_key(recipe, tmp_path, capsys, fresh_accelerate_state):
    args = [*recipe, f"output_dir={tmp_path / 'run'}", "iterations=1", "dpo.train.per_device_batch_size=64"]
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert "lower dpo.train.per_device_batch_size" in err and " train.per_device_batch_size" not in err, err


@pytest.mark.parametrize(("command", "typed", "meant"), [
    ("run", "model.lora.r=16", "'policy.lora.r'"),  # a stage's name for the run's section
    ("run", "train.lr=1e-6", "'dpo.train.lr'"),
    ("run", "max_new_tokens=10", "'generation.sampling.max_new_tokens' or 'eval.sampling.max_new_tokens'"),
    ("run", "dpo.train.lrr=1", "'dpo.train.lr'"),  # a close sibling
    ("run", "iteration=3", "'iterations'"),
    ("sft", "train.max_step=3", "'train.max_steps'"),
    ("dpo", "beta=0.2", "'loss.beta'"),  # a key deeper down, by its name
])
def test_did_you_mean_searches_nested_keys(command, typed, meant, capsys):
    assert main([command, typed, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert f"unknown key '{typed.partition('=')[0]}' (did you mean {meant}" in err, err


@pytest.mark.parametrize("command", sorted(EXAMPLES))
def test_every_help_example_is_made_of_the_commands_own_keys(command, capsys):
    words = shlex.split(EXAMPLES[command])
    model = RunConfig if command in ("run", "demo") else COMMAND_CONFIGS[command]
    load_config(model, None, words, unfinished=True)  # raises on a key the command does not take
    assert EXAMPLES[command] in command_parsers()[command].format_help()


def test_every_command_that_takes_overrides_has_its_own_example():
    assert set(EXAMPLES) == set(COMMAND_CONFIGS) | {"demo"}


OLD_RECIPE = """
prompts: {task: instructions, per_iteration: 4}
judge: {type: reward_model}
feedback:
  enabled: true
  judge_function: rlhf_workflow.tasks.instructions:judge
  rm_model: {name_or_path: other-model}
  rm_train: {epochs: 3, precision: bf16}
  rm_max_length: 256
  pm_train: {lr: 2.0e-5}
  rm_group_by_prompt: false
dpo:
  max_length: 300
  reference_batch_size: 4
  train: {precision: fp32}
"""


def test_keys_and_values_of_earlier_versions_load_with_one_warning_each(tmp_path, caplog):
    path = tmp_path / "old.yaml"
    path.write_text(OLD_RECIPE)
    with caplog.at_level(logging.WARNING):
        config = load_config(RunConfig, path)
    f = config.feedback
    assert (f.rm.model.name_or_path, f.pm.model.name_or_path) == ("other-model", "other-model")
    assert (f.rm.train.epochs, f.rm.train.precision, f.pm.train.lr) == (3, "bfloat16", 2e-5)
    assert (f.rm.data.max_length, f.pm.data.max_length, f.rm.group_by_prompt) == (256, 256, False)
    assert (config.dpo.data.max_length, config.dpo.reference.batch_size, config.dpo.train.precision) == (300, 4, "float32")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 9 and all(str(path) in w and "still loads" in w for w in warnings), warnings
    assert f"{path}: 'dpo.max_length' is now 'dpo.data.max_length' (the old name still loads)" in warnings
    # what is written back uses the new names only, and loads back to the same config
    again = tmp_path / "new.yaml"
    again.write_text(config_to_yaml(config))
    assert "rm_train" not in again.read_text() and "bf16" not in again.read_text()
    assert load_config(RunConfig, again) == config


def test_a_new_key_given_beside_its_old_name_wins():
    data = upgrade_keys(RunConfig, {"dpo": {"max_length": 100, "data": {"max_length": 200}}}, "test")
    assert data == {"dpo": {"data": {"max_length": 200}}}


def test_a_run_made_with_the_old_names_continues_without_force(tmp_path, monkeypatch):
    """A run directory whose config.yaml an earlier version wrote is the same recipe under new names."""
    from rlhf_workflow.online.loop import check_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(OLD_RECIPE)
    (run / "state.json").write_text('{"completed": ["prompts"]}')  # it has started: a changed recipe is refused
    config = load_config(RunConfig, run / "config.yaml")
    check_config(run, config, force=False)  # not refused
    assert "rm_train" not in (run / "config.yaml").read_text()  # rewritten with the new names
    changed = config.model_copy(update={"iterations": 5})
    with pytest.raises(Exception, match="iterations"):
        check_config(run, changed, force=False)
