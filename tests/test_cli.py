"""The command line: help texts, --print-config, and errors as one line with exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import write_jsonl
from rlhf_workflow.cli import main


def test_top_level_help_lists_the_stages(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "sft" in out and "online iterative DPO" in out


def test_stage_help_explains_itself(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    out = capsys.readouterr().out
    for words in ("--config", "--resume", "key=value", "assistant tokens", "accelerate launch"):
        assert words in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: rlhf-workflow" in capsys.readouterr().out


def test_print_config_shows_every_default(capsys):
    assert main(["sft", "--print-config", "data.train=x.jsonl", "train.lr=2e-6"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["lr"] == 2e-6
    assert cfg["model"]["name_or_path"] == "smollm2-135m-instruct"
    assert cfg["model"]["trust_remote_code"] is False


@pytest.mark.parametrize("command", ["sft", "train-rm", "train-pm", "dpo", "eval-rm", "generate", "annotate", "pairs",
                                     "prompts", "run"])
def test_print_config_prints_for_every_command_with_no_arguments(command, capsys):
    """--print-config needs nothing given: every key is printed, and the inputs the command still needs
    are marked in the YAML and listed, all at once, on stderr."""
    from rlhf_workflow.config import COMMAND_CONFIGS, load_config

    assert main([command, "--print-config"]) == 0
    printed = capsys.readouterr()
    assert yaml.safe_load(printed.out)  # loadable YAML
    missing = load_config(COMMAND_CONFIGS[command], unfinished=True).missing()
    assert missing  # every one of these commands needs an input file or two
    for key, why in missing:
        assert f"# REQUIRED: {why}"[:60] in printed.out
        assert f"{key}=..." in printed.err


@pytest.mark.parametrize(("command", "keys"), [
    ("run", ["prompts.train", "prompts.eval", "judge.path"]),
    ("generate", ["prompts is required", "output is required"]),
    ("annotate", ["input is required", "output is required", "judge.path is required"]),
    ("eval-rm", ["model is required", "data is required"]),
])
def test_a_command_names_every_missing_input_at_once(command, keys, capsys):
    assert main([command]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    for key in keys:
        assert key in err, (key, err)


def test_console_script_errors_are_one_line_without_traceback(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_workflow", "sft", f"data.train={data}", "model.name_or_path=./no-such-model",
         f"output_dir={tmp_path / 'o'}"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: model './no-such-model' is not an existing path")


def test_unknown_key_from_the_command_line(capsys):
    assert main(["sft", "data.train=x.jsonl", "train.learning_rate=1e-5"]) == 2
    assert "unknown key 'train.learning_rate'" in capsys.readouterr().err


def test_the_load_report_of_a_new_reward_head_is_not_shown_but_others_are():
    """transformers reports a reward model's new scalar head as missing weights at every start; that
    report is expected and filtered (shown with -v), a report of any other missing key is kept."""
    import logging

    from rlhf_workflow.cli import _expected_new_head

    def record(rows: str) -> logging.LogRecord:
        message = ("LlamaForSequenceClassification LOAD REPORT from: /models/x\nKey          | Status  | \n"
                   f"-------------+---------+-\n{rows}\nNotes:\n- MISSING:\tthose params were newly initialized")
        return logging.LogRecord("transformers.modeling_utils", logging.WARNING, __file__, 1, message, None, None)

    assert not _expected_new_head(record("score.weight | MISSING | "))
    assert _expected_new_head(record("score.weight | MISSING | \nmodel.layers.0.mlp.up_proj.weight | MISSING | "))
    assert _expected_new_head(record("model.embed_tokens.weight | UNEXPECTED | "))
    other = logging.LogRecord("transformers.modeling_utils", logging.WARNING, __file__, 1, "something else", None, None)
    assert _expected_new_head(other)
