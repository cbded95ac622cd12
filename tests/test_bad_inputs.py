"""The bad-input corpus (issue 8, part 2): each bad input goes to the real CLI, in process, and must
end with exit status 2, no traceback anywhere in the output, and one short ``error:`` line that
names the file, the line (for files of rows) and the field or config key.

The small inputs are committed in ``tests/bad_inputs/``. Made at test time instead: the model
directories (the tiny model without its weights, with a tokenizer that has no chat template, a
reward model without weights), the valid companion files a stage needs before it reaches the bad
part, and the two 10 MB single-line files.

`CASES` is the table (case id, command, expected message fragments) the README lists; a few
cases also name advice that would mislead there (`unexpected`). In commands and fragments,
``{name}`` stands for a path filled in by the test: ``{corpus}`` is ``tests/bad_inputs``,
``{tmp}`` the test's own temporary directory (also its working directory), ``{model}`` the tiny
chat model; the other names are in `BUILDERS` and `broken_models`.
A case whose ``known_gap`` is set does not pass yet; it is an expected failure (strict, so it is
noticed when it gets fixed) and the gap says what is missing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
from conftest import build_model, build_tokenizer, write_jsonl

from rlhf_workflow.cli import main

CORPUS = Path(__file__).parent / "bad_inputs"
TEN_MB = 10 * 1024 * 1024
MAX_ERROR_CHARS = 1000  # the error line; a 10 MB input must not come back in it
MAX_OUTPUT_CHARS = 20_000  # everything the stage printed (progress bars included)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


class Case(NamedTuple):
    id: str
    command: str
    expected: tuple[str, ...]  # every fragment must be in the error line
    known_gap: str | None = None  # set while the CLI does not meet the case yet
    unexpected: tuple[str, ...] = ()  # advice that would mislead here (an option this stage does not have)


# Options that keep a stage that gets past the bad input small and inside {tmp}.
TINY = "model.name_or_path={model} output_dir={tmp}/out"
GEN = "output={tmp}/generations.jsonl model.name_or_path={model} sampling.n=1 sampling.max_new_tokens=4"
FUNCTION_JUDGE = "output={tmp}/scored.jsonl judge.type=function judge.function=rlhf_workflow.tasks.arithmetic:judge"

CASES: list[Case] = [
    # ---------------------------------------------------------------- malformed JSON
    Case("malformed-json-line", "train-rm data.train={corpus}/pairs_malformed_json.jsonl " + TINY,
         (("{corpus}/pairs_malformed_json.jsonl:2: invalid JSON (Expecting property name enclosed in double quotes "
           "at column 2)"),)),
    Case("truncated-json-line", "train-rm data.train={corpus}/pairs_truncated_line.jsonl " + TINY,
         ("{corpus}/pairs_truncated_line.jsonl:2: invalid JSON (Expecting ',' delimiter at column 64)",)),
    Case("malformed-json-array", "dpo data.train={corpus}/pairs_malformed_array.json " + TINY,
         ("{corpus}/pairs_malformed_array.json:4: invalid JSON (Expecting value at column 1)",)),
    Case("row-not-an-object", "dpo data.train={corpus}/pairs_not_an_object.jsonl " + TINY,
         ("{corpus}/pairs_not_an_object.jsonl:2: expected a JSON object, got an array",)),
    # ---------------------------------------------------------------- wrong types
    Case("pair-chosen-not-text", "train-rm data.train={corpus}/pairs_wrong_type.jsonl " + TINY,
         ("{corpus}/pairs_wrong_type.jsonl:2: field 'chosen': expected a string or a list of messages, got int 5",)),
    Case("message-unknown-role", "train-pm data.train={corpus}/pairs_bad_role.jsonl " + TINY,
         (("{corpus}/pairs_bad_role.jsonl:2: field 'prompt.0.role': expected one of 'system', 'user', 'assistant' "
           "or 'tool', got str 'bot'"),)),
    Case("sft-content-not-string", "sft data.train={corpus}/sft_wrong_type.jsonl " + TINY,
         ("{corpus}/sft_wrong_type.jsonl:2: field 'messages.1.content': expected a string, got int 42",)),
    Case("prompt-is-an-object", "generate prompts={corpus}/prompts_wrong_type.jsonl " + GEN,
         (("{corpus}/prompts_wrong_type.jsonl:2: field 'prompt': expected a string or a list of messages, "
           "got an object"),)),
    Case("responses-not-a-list", "annotate input={corpus}/generations_responses_not_list.jsonl " + FUNCTION_JUDGE,
         ("{corpus}/generations_responses_not_list.jsonl:2: field 'responses': expected a list, got str 'fine'",)),
    Case("reward-not-a-number", "pairs input={corpus}/scored_reward_not_number.jsonl output={tmp}/pairs.jsonl",
         ("{corpus}/scored_reward_not_number.jsonl:2: field 'rewards.0': expected a number, got str 'high'",)),
    Case("rewards-count-mismatch", "pairs input={corpus}/scored_reward_count.jsonl output={tmp}/pairs.jsonl",
         ("{corpus}/scored_reward_count.jsonl:2: field 'rewards': expected 2 rewards (one per response), got 1",)),
    # ---------------------------------------------------------------- missing fields
    Case("pair-missing-rejected", "dpo data.train={corpus}/pairs_missing_field.jsonl " + TINY,
         ("{corpus}/pairs_missing_field.jsonl:3: missing field 'rejected'",)),
    Case("sft-missing-completion", "sft data.train={corpus}/sft_missing_completion.jsonl " + TINY,
         ("{corpus}/sft_missing_completion.jsonl:3: missing field 'completion'",)),
    Case("prompt-missing", "generate prompts={corpus}/prompts_missing_prompt.jsonl " + GEN,
         ("{corpus}/prompts_missing_prompt.jsonl:2: missing field 'prompt'",)),
    Case("responses-missing", "annotate input={corpus}/generations_missing_responses.jsonl " + FUNCTION_JUDGE,
         ("{corpus}/generations_missing_responses.jsonl:2: missing field 'responses'",)),
    Case("rewards-missing", "pairs input={corpus}/scored_missing_rewards.jsonl output={tmp}/pairs.jsonl",
         ("{corpus}/scored_missing_rewards.jsonl:2:", "'rewards'")),
    # ---------------------------------------------------------------- empty files
    Case("empty-file", "sft data.train={corpus}/empty.jsonl " + TINY,
         ("{corpus}/empty.jsonl: no rows",)),
    Case("blank-lines-only", "generate prompts={corpus}/blank_lines.jsonl " + GEN,
         ("{corpus}/blank_lines.jsonl: no rows",)),
    Case("empty-responses", "annotate input={corpus}/generations_empty_responses.jsonl " + FUNCTION_JUDGE,
         (("{corpus}/generations_empty_responses.jsonl:2: field 'responses': expected at least 1 item, "
           "got an empty list"),)),
    Case("empty-config-file", "sft --config {corpus}/config_empty.yaml " + TINY,
         ("{corpus}/config_empty.yaml with overrides: data.train is required",)),
    # ---------------------------------------------------------------- bytes that are not UTF-8
    Case("not-utf8", "train-rm data.train={corpus}/pairs_not_utf8.jsonl " + TINY,
         ("{corpus}/pairs_not_utf8.jsonl:2: not valid UTF-8",)),
    # ---------------------------------------------------------------- a 10 MB single line
    Case("10mb-line-bad-field", "generate prompts={ten_mb_line} " + GEN,
         ("{ten_mb_line}:1: field 'prompt.0': expected a message object with 'role' and 'content', got str 'xxx",)),
    Case("10mb-line-unterminated", "generate prompts={ten_mb_unterminated_line} " + GEN,
         ("{ten_mb_unterminated_line}:1: invalid JSON (Unterminated string",)),
    # ---------------------------------------------------------------- over the context length
    Case("prompts-over-model-context", "generate prompts={corpus}/prompts_over_context.jsonl " + GEN,
         ("{corpus}/prompts_over_context.jsonl:1:", "'prompt'", "context")),
    Case("sft-prompt-over-max-length", "sft data.train={corpus}/sft_long_prompt.jsonl data.max_length=64 " + TINY,
         ("{corpus}/sft_long_prompt.jsonl:1:", "'prompt'", "data.max_length")),
    Case("sft-row-over-model-context",
         "sft data.train={corpus}/sft_long_prompt.jsonl train.per_device_batch_size=1 train.max_steps=1 " + TINY,
         ("{corpus}/sft_long_prompt.jsonl:1:", "'prompt'", "context")),
    Case("pair-response-over-max-length",
         "dpo data.train={corpus}/pairs_long_response.jsonl data.max_length=64 " + TINY,
         ("{corpus}/pairs_long_response.jsonl:1:", "'rejected'", "data.max_length")),
    # ---------------------------------------------------------------- chosen == rejected
    Case("chosen-equals-rejected", "dpo data.train={corpus}/pairs_chosen_equals_rejected.jsonl " + TINY,
         ("{corpus}/pairs_chosen_equals_rejected.jsonl:2: field 'rejected': chosen and rejected are identical",)),
    # ---------------------------------------------------------------- NaN
    Case("nan-reward-in-scored-rows", "pairs input={corpus}/scored_nan_reward.jsonl output={tmp}/pairs.jsonl",
         ("{corpus}/scored_nan_reward.jsonl:2: field 'rewards.1': expected a finite number, got nan",)),
    Case("nan-pair-reward", "train-rm data.train={corpus}/pairs_nan_reward.jsonl " + TINY,
         ("{corpus}/pairs_nan_reward.jsonl:2: field 'chosen_reward': expected a finite number, got nan",)),
    Case("nan-reference-logp", "dpo data.train={corpus}/pairs_nan_ref_logp.jsonl " + TINY,
         ("{corpus}/pairs_nan_ref_logp.jsonl:2: field 'ref_chosen_logp': expected a finite number, got nan",)),
    # ---------------------------------------------------------------- unknown config keys, bad config files
    Case("unknown-key-in-yaml", "sft --config {corpus}/config_unknown_key.yaml " + TINY,
         ("{corpus}/config_unknown_key.yaml with overrides: unknown key 'train.lrr' (did you mean 'train.lr'?)",)),
    Case("unknown-key-override", "dpo data.train={good_pairs} loss.betta=0.1 " + TINY,
         ("config (command-line overrides): unknown key 'loss.betta' (did you mean 'loss.beta'?)",)),
    Case("unknown-section-override", "train-rm data.train={good_pairs} trian.lr=1e-5 " + TINY,
         ("config (command-line overrides): unknown key 'trian' (did you mean 'train'?)",)),
    Case("invalid-yaml", "sft --config {corpus}/config_invalid_yaml.yaml " + TINY,
         ("{corpus}/config_invalid_yaml.yaml:4: invalid YAML: mapping values are not allowed here",)),
    Case("yaml-not-a-mapping", "sft --config {corpus}/config_not_a_mapping.yaml " + TINY,
         ("{corpus}/config_not_a_mapping.yaml: the top level must be a mapping of keys, not list",)),
    # ---------------------------------------------------------------- wrong value types
    Case("wrong-type-in-yaml", "sft --config {corpus}/config_wrong_type.yaml " + TINY,
         ("{corpus}/config_wrong_type.yaml with overrides: 'train.epochs': Input should be a valid integer",
          "(got 'two')")),
    Case("wrong-type-override", "train-rm data.train={good_pairs} train.lr=fast " + TINY,
         ("config (command-line overrides): 'train.lr': Input should be a valid number", "(got 'fast')")),
    Case("list-for-a-number", "generate prompts={good_prompts} " + GEN + " sampling.n=[1,2]",
         ("config (command-line overrides): 'sampling.n': Input should be a valid integer (got [1, 2])",)),
    # ---------------------------------------------------------------- negative sizes
    Case("negative-batch-size-in-yaml", "sft --config {corpus}/config_negative_size.yaml " + TINY,
         (("{corpus}/config_negative_size.yaml with overrides: 'train.per_device_batch_size': Input should be "
           "greater than or equal to 1 (got -4)"),)),
    Case("negative-n", "generate prompts={good_prompts} " + GEN + " sampling.n=-2",
         ("config (command-line overrides): 'sampling.n': Input should be greater than or equal to 1 (got -2)",)),
    Case("negative-max-length", "sft data.train={good_sft} data.max_length=-5 " + TINY,
         ("config (command-line overrides): 'data.max_length': Input should be greater than 0 (got -5)",)),
    Case("negative-rows-per-write", "annotate input={good_generations} rows_per_write=-1 " + FUNCTION_JUDGE,
         ("config (command-line overrides): 'rows_per_write': Input should be greater than or equal to 1 (got -1)",)),
    # ---------------------------------------------------------------- models
    Case("model-path-does-not-exist",
         "sft data.train={good_sft} model.name_or_path={tmp}/no-such-model output_dir={tmp}/out",
         ("model.name_or_path", "{tmp}/no-such-model", "is not an existing path")),
    Case("reference-path-does-not-exist",
         "dpo data.train={good_pairs} reference.name_or_path={tmp}/no-such-reference " + TINY,
         ("reference.name_or_path", "{tmp}/no-such-reference", "is not an existing path")),
    Case("model-dir-without-weights", "sft data.train={good_sft} model.name_or_path={model_without_weights} "
         "output_dir={tmp}/out",
         ("model.name_or_path", "{model_without_weights}", "model.safetensors")),
    Case("model-dir-without-config", "sft data.train={good_sft} model.name_or_path={empty_dir} output_dir={tmp}/out",
         ("model.name_or_path", "{empty_dir}", "config.json")),
    Case("judge-without-weights", "annotate input={good_generations} output={tmp}/scored.jsonl "
         "judge.path={reward_model_without_weights}",
         ("judge.path", "{reward_model_without_weights}", "model.safetensors")),
    Case("judge-not-a-reward-model", "annotate input={good_generations} output={tmp}/scored.jsonl judge.path={model}",
         ("judge.path", "{model}", "reward model"),
         unexpected=("kind=",)),
    Case("tokenizer-without-chat-template-sft",
         "sft data.train={good_sft} model.name_or_path={model_without_template} output_dir={tmp}/out",
         ("{model_without_template}", "chat template", "data.apply_chat_template")),
    Case("tokenizer-without-chat-template-generate", "generate prompts={good_prompts} output={tmp}/generations.jsonl "
         "model.name_or_path={model_without_template} sampling.n=1 sampling.max_new_tokens=4",
         ("{model_without_template}", "chat template", "apply_chat_template=false"),
         unexpected=("data.apply_chat_template",)),
]


# ---------------------------------------------------------------- inputs made at test time


def _ten_mb_line(tmp: Path) -> Path:
    """One 10 MB line, no newline: a prompt given as a list holding a 10 MB string instead of messages."""
    path = tmp / "ten_mb_line.jsonl"
    path.write_text(json.dumps({"id": "big", "prompt": ["x" * TEN_MB]}), encoding="utf-8")
    return path


def _ten_mb_unterminated_line(tmp: Path) -> Path:
    """One 10 MB line cut off inside a string, as a crash or a full disk leaves it."""
    path = tmp / "ten_mb_unterminated_line.jsonl"
    path.write_text('{"id": "big", "prompt": "' + "x" * TEN_MB, encoding="utf-8")
    return path


def _empty_dir(tmp: Path) -> Path:
    path = tmp / "empty-model-dir"
    path.mkdir()
    return path


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "good_pairs": lambda tmp: write_jsonl(tmp / "good_pairs.jsonl", [
        {"prompt": "What is two plus three?", "chosen": "five", "rejected": "six"},
        {"prompt": "hello world", "chosen": "hi", "rejected": "go away"},
    ]),
    "good_sft": lambda tmp: write_jsonl(tmp / "good_sft.jsonl", [
        {"prompt": "What is two plus three?", "completion": "five"},
        {"messages": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "hi"}]},
    ]),
    "good_prompts": lambda tmp: write_jsonl(tmp / "good_prompts.jsonl", [{"id": "a", "prompt": "hello world"}]),
    "good_generations": lambda tmp: write_jsonl(tmp / "good_generations.jsonl", [
        {"id": "a", "prompt": "What is two plus three?", "responses": ["5", "six"]},
    ]),
    "ten_mb_line": _ten_mb_line,
    "ten_mb_unterminated_line": _ten_mb_unterminated_line,
    "empty_dir": _empty_dir,
}


@pytest.fixture(scope="module")
def broken_models(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Model directories that are wrong in one way each."""
    root = tmp_path_factory.mktemp("broken-models")
    without_weights = root / "model-without-weights"
    shutil.copytree(tiny_model_dir, without_weights, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))

    reward_model = root / "reward-model-without-weights"
    shutil.copytree(without_weights, reward_model)
    config = json.loads((reward_model / "config.json").read_text())
    config["architectures"] = ["LlamaForSequenceClassification"]
    (reward_model / "config.json").write_text(json.dumps(config))

    without_template = root / "model-without-chat-template"
    tokenizer = build_tokenizer("none")
    build_model(tokenizer).save_pretrained(without_template)
    tokenizer.save_pretrained(without_template)
    assert getattr(tokenizer, "chat_template", None) is None
    return {"model_without_weights": without_weights, "reward_model_without_weights": reward_model,
            "model_without_template": without_template}


# ---------------------------------------------------------------- the test


def _fill(text: str, places: dict[str, Path]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: str(places[m.group(1)]), text)


def _params() -> list:
    params = []
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=case.known_gap)] if case.known_gap else []
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


def test_case_ids_are_unique_and_every_corpus_file_is_used():
    assert len({case.id for case in CASES}) == len(CASES)
    used = {name for case in CASES for name in re.findall(r"\{corpus\}/([\w.]+)", case.command)}
    assert used == {path.name for path in CORPUS.iterdir()}


@pytest.mark.parametrize("case", _params())
def test_bad_input_is_one_clear_error(case, tmp_path, monkeypatch, capsys, caplog, tiny_model_dir, broken_models):
    monkeypatch.chdir(tmp_path)  # anything written to a relative path stays in the test's directory
    places: dict[str, Path] = {"corpus": CORPUS, "tmp": tmp_path, "model": tiny_model_dir, **broken_models}
    wanted = set(re.findall(r"\{(\w+)\}", case.command + " ".join(case.expected)))
    for name in sorted(wanted & BUILDERS.keys()):
        places[name] = BUILDERS[name](tmp_path)
    argv = [_fill(arg, places) for arg in shlex.split(case.command)]

    escaped = None
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    except Exception:  # noqa: BLE001 - any other exception is what this test looks for
        code, escaped = None, traceback.format_exc()
    captured = capsys.readouterr()
    assert escaped is None, f"an exception escaped the CLI:\n{escaped[-3000:]}"
    everything = captured.out + captured.err + caplog.text
    assert "Traceback (most recent call last)" not in everything, everything[-3000:]
    assert code == 2, f"exit status {code} (user errors exit with 2); output ends with:\n{everything[-2000:]}"
    assert len(captured.out) + len(captured.err) < MAX_OUTPUT_CHARS

    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, f"expected one 'error:' line, got {errors!r}"
    message = errors[0]
    assert captured.err.rstrip().endswith(message), "the error line is not the last thing printed"
    assert len(message) < MAX_ERROR_CHARS, f"an error line of {len(message)} characters: {message[:300]}..."
    for fragment in case.expected:
        assert _fill(fragment, places) in message, f"{_fill(fragment, places)!r} is not in\n{message}"
    for fragment in case.unexpected:
        assert _fill(fragment, places) not in message, f"{_fill(fragment, places)!r} misleads here:\n{message}"
    record = os.environ.get("BAD_INPUTS_RECORD")  # the README's table: BAD_INPUTS_RECORD=FILE pytest this file
    if record:
        shown = message
        for name, path in sorted(places.items(), key=lambda item: -len(str(item[1]))):
            shown = shown.replace(str(path), "{" + name + "}")
        with open(record, "a", encoding="utf-8") as f:
            f.write(json.dumps({"id": case.id, "command": case.command, "message": shown}) + "\n")
