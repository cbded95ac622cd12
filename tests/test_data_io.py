"""Row schemas and file IO: clear errors, round trips, atomic writes, resumable appends."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from conftest import write_jsonl as write_lines
from rlhf_workflow.data.io import JsonlAppender, atomic_write_text, iter_jsonl, read_rows, row_to_dict, write_jsonl
from rlhf_workflow.data.schemas import GenerationRow, Message, PairRow, PromptRow, SFTRow, derive_id, to_messages
from rlhf_workflow.errors import UserError

GOOD_PAIR = {"id": "p1", "prompt": "What is two plus three?", "chosen": "five", "rejected": "six"}


def error_of(path: Path, schema) -> str:
    """The UserError message of reading ``path`` as ``schema``."""
    with pytest.raises(UserError) as info:
        read_rows(path, schema)
    return str(info.value)


def pair_file(tmp_path: Path, bad_row: dict | str, name: str = "pairs.jsonl") -> Path:
    """A JSON Lines file with two good pairs, a blank line, then ``bad_row`` on line 4."""
    rows = [GOOD_PAIR, {**GOOD_PAIR, "id": "p2"}, "", bad_row]
    return write_lines(tmp_path / name, rows)


# --------------------------------------------------------------------------- errors


def test_malformed_json(tmp_path):
    path = pair_file(tmp_path, '{"id": "p3", "prompt": "x",')
    message = error_of(path, PairRow)
    assert message.startswith(f"{path}:4: invalid JSON (")
    assert "\n" not in message


def test_not_an_object(tmp_path):
    path = pair_file(tmp_path, "[1, 2]")
    assert error_of(path, PairRow) == f"{path}:4: expected a JSON object, got an array"


def test_missing_field(tmp_path):
    path = pair_file(tmp_path, {"id": "p3", "prompt": "x", "chosen": "a"})
    assert error_of(path, PairRow) == f"{path}:4: missing field 'rejected'"


def test_int_for_a_string(tmp_path):
    path = pair_file(tmp_path, {**GOOD_PAIR, "id": "p3", "chosen": 5})
    assert error_of(path, PairRow) == f"{path}:4: field 'chosen': expected a string or a list of messages, got int 5"


def test_integer_ids_are_accepted_as_text(tmp_path):
    path = pair_file(tmp_path, {**GOOD_PAIR, "id": 3})
    assert read_rows(path, PairRow)[-1].id == "3"


def test_float_id_is_an_error(tmp_path):
    path = pair_file(tmp_path, {**GOOD_PAIR, "id": 3.5})
    assert error_of(path, PairRow) == f"{path}:4: field 'id': expected a string, got float 3.5"


def test_str_for_a_float(tmp_path):
    path = pair_file(tmp_path, {**GOOD_PAIR, "id": "p3", "chosen_reward": "1.5"})
    assert error_of(path, PairRow) == f"{path}:4: field 'chosen_reward': expected a number, got str '1.5'"


def test_bad_role(tmp_path):
    bad = {**GOOD_PAIR, "id": "p3", "prompt": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}
    path = pair_file(tmp_path, bad)
    message = error_of(path, PairRow)
    assert message.startswith(f"{path}:4: field 'prompt.1.role': expected one of 'system', 'user'")
    assert message.endswith("got str 'bot'")


def test_message_with_extra_key_or_wrong_shape(tmp_path):
    path = pair_file(tmp_path, {**GOOD_PAIR, "id": "p3", "chosen": [{"role": "assistant", "content": "a", "x": 1}]})
    assert error_of(path, PairRow).startswith(f"{path}:4: unexpected field 'chosen.0.x'")
    path = pair_file(tmp_path, {**GOOD_PAIR, "id": "p3", "chosen": ["five"]})
    assert error_of(path, PairRow) == (
        f"{path}:4: field 'chosen.0': expected a message object with 'role' and 'content', got str 'five'"
    )
    path = pair_file(tmp_path, {**GOOD_PAIR, "id": "p3", "chosen": []})
    assert error_of(path, PairRow) == f"{path}:4: field 'chosen': expected at least 1 item, got an empty list"


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    assert error_of(path, PromptRow) == f"{path}: no rows"


def test_only_blank_lines(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n  \n\t\n\n", encoding="utf-8")
    assert error_of(path, PromptRow) == f"{path}: no rows"


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    assert error_of(path, PromptRow) == f"{path}:2: not valid UTF-8"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    assert error_of(path, PromptRow) == f"{path} does not exist"


def test_unsupported_extension(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("a,b\n", encoding="utf-8")
    assert "unsupported file type '.csv'" in error_of(path, PromptRow)


def test_nan_reward(tmp_path):
    path = tmp_path / "generations.jsonl"
    path.write_text(
        '{"id": "g1", "prompt": "x", "responses": ["a", "b"], "rewards": [0.5, 1]}\n'
        '{"id": "g2", "prompt": "x", "responses": ["a", "b", "c"], "rewards": [0.5, 1.0, NaN]}\n',
        encoding="utf-8",
    )
    assert error_of(path, GenerationRow) == f"{path}:2: field 'rewards.2': expected a finite number, got nan"


def test_infinite_pair_reward(tmp_path):
    path = pair_file(tmp_path, {**GOOD_PAIR, "id": "p3", "chosen_reward": float("inf")})
    assert error_of(path, PairRow) == f"{path}:4: field 'chosen_reward': expected a finite number, got inf"


def test_rewards_length_mismatch(tmp_path):
    row = {"id": "g1", "prompt": "x", "responses": ["a", "b"], "rewards": [1.0]}
    path = write_lines(tmp_path / "generations.jsonl", [row])
    assert error_of(path, GenerationRow) == (
        f"{path}:1: field 'rewards': expected 2 rewards (one per response), got 1"
    )


@pytest.mark.parametrize("field, value", [("response_tokens", [3]), ("finish_reasons", ["stop", "stop", "length"]),
                                          ("response_logps", [-1.5]), ("response_token_ids", [[1, 2]]),
                                          ("raw_rewards", [0.1, 0.2, 0.3])])
def test_every_per_response_field_has_one_value_per_response(tmp_path, field, value):
    """Every field generate and annotate add is declared: a list of the wrong length is the row's error."""
    path = write_lines(tmp_path / "generations.jsonl", [{"id": "g1", "prompt": "x", "responses": ["a", "b"], field: value}])
    assert error_of(path, GenerationRow) == (
        f"{path}:1: field '{field}': expected 2 {field} (one per response), got {len(value)}")


@pytest.mark.parametrize("field, value, message", [
    ("finish_reasons", ["stop", "eos"], "field 'finish_reasons.1': expected one of 'stop' or 'length', got str 'eos'"),
    ("response_tokens", [3, "4"], "field 'response_tokens.1'"),
    ("reward_errors", {"2": "timeout"}, "field 'reward_errors': keys are response indices 0..1, got '2'"),
])
def test_per_response_values_are_typed(tmp_path, field, value, message):
    path = write_lines(tmp_path / "generations.jsonl", [{"id": "g1", "prompt": "x", "responses": ["a", "b"], field: value}])
    assert error_of(path, GenerationRow).startswith(f"{path}:1: {message}")


def test_a_generated_row_keeps_its_fields_and_metadata(tmp_path):
    row = {"id": "g1", "prompt": "x", "answer": 3, "responses": ["a", "b"], "response_tokens": [1, 2],
           "finish_reasons": ["stop", "length"], "response_logps": [-1.0, -2.5], "rewards": [None, 0.5],
           "reward_errors": {"0": "timeout"}}
    path = write_lines(tmp_path / "generations.jsonl", [row])
    assert row_to_dict(read_rows(path, GenerationRow)[0]) == row


def test_no_responses(tmp_path):
    path = write_lines(tmp_path / "generations.jsonl", [{"id": "g1", "prompt": "x", "responses": []}])
    expected = f"{path}:1: field 'responses': expected at least 1 item, got an empty list"
    assert error_of(path, GenerationRow) == expected


def test_chosen_equals_rejected(tmp_path):
    path = pair_file(tmp_path, {**GOOD_PAIR, "id": "p3", "chosen": "same", "rejected": "same"})
    assert error_of(path, PairRow) == f"{path}:4: field 'rejected': chosen and rejected are identical"
    # Also when one is written as a string and the other as an assistant message.
    path = pair_file(
        tmp_path, {**GOOD_PAIR, "id": "p3", "chosen": "same", "rejected": [{"role": "assistant", "content": "same"}]}
    )
    assert "chosen and rejected are identical" in error_of(path, PairRow)


def test_duplicate_explicit_id(tmp_path):
    path = write_lines(tmp_path / "prompts.jsonl", [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}])
    assert error_of(path, PromptRow) == f"{path}:2: field 'id': duplicate id 'a' (first at {path}:1)"


def test_sft_row_errors(tmp_path):
    path = write_lines(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    expected = f"{path}:1: field 'messages': expected at least one assistant message to learn from"
    assert error_of(path, SFTRow) == expected
    path = write_lines(tmp_path / "sft.jsonl", [{"text": "hi"}])
    assert error_of(path, SFTRow) == f"{path}:1: missing field 'messages' (or the fields 'prompt' and 'completion')"
    path = write_lines(tmp_path / "sft.jsonl", [{"prompt": "hi"}])
    assert error_of(path, SFTRow) == f"{path}:1: missing field 'completion' (a 'prompt' needs a 'completion')"


# --------------------------------------------------------------------------- good rows


def test_string_and_conversational_rows_parse(tmp_path):
    conversational = {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"}],
        "chosen": [{"role": "assistant", "content": "5"}],
        "rejected": [{"role": "assistant", "content": "6"}],
        "chosen_reward": 1,
        "rejected_reward": -0.5,
    }
    path = write_lines(tmp_path / "pairs.jsonl", [GOOD_PAIR, conversational])
    standard, chat = read_rows(path, PairRow)
    assert standard.id == "p1" and standard.prompt == "What is two plus three?" and standard.chosen == "five"
    assert chat.prompt_messages() == conversational["prompt"]
    assert isinstance(chat.chosen[0], Message) and chat.chosen[0].content == "5"
    assert chat.chosen_reward == 1.0 and chat.rejected_reward == -0.5
    assert chat.id == derive_id([conversational["prompt"], conversational["chosen"], conversational["rejected"]])
    assert len(chat.id) == 16


def test_sft_rows_both_forms(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"prompt": "hi", "completion": "hello"},
        {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "hello"}]},
    ]
    path = write_lines(tmp_path / "sft.jsonl", rows)
    expected = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert [row.to_messages() for row in read_rows(path, SFTRow)] == [expected, expected, expected]


def test_to_messages():
    assert to_messages("hi", "user") == [{"role": "user", "content": "hi"}]
    assert to_messages("hi", "assistant") == [{"role": "assistant", "content": "hi"}]
    assert to_messages([Message(role="tool", content="x")], "user") == [{"role": "tool", "content": "x"}]


def test_derived_prompt_ids_are_stable_and_unique(tmp_path):
    rows = [{"prompt": "same"}, {"prompt": "other"}, {"prompt": "same"}, {"prompt": "same"}]
    path = write_lines(tmp_path / "prompts.jsonl", rows)
    ids = [row.id for row in read_rows(path, PromptRow)]
    base = derive_id("same")
    assert ids == [base, derive_id("other"), f"{base}-2", f"{base}-3"]
    assert [row.id for row in read_rows(path, PromptRow)] == ids


def test_metadata_round_trip(tmp_path):
    rows = [
        {"id": "q1", "prompt": "2+3?", "answer": "5", "meta": {"source": "demo", "tags": [1, None]}, "note": None},
        {"prompt": [{"role": "user", "content": "moon?"}], "answer": 7},
    ]
    source = write_lines(tmp_path / "prompts.jsonl", rows)
    first = read_rows(source, PromptRow)
    assert first[0].answer == "5" and first[0].meta == {"source": "demo", "tags": [1, None]}
    target = tmp_path / "out" / "prompts.jsonl"
    assert write_jsonl(target, first) == 2
    second = read_rows(target, PromptRow)
    assert [row.model_dump() for row in second] == [row.model_dump() for row in first]
    on_disk = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert on_disk[0] == rows[0]
    assert on_disk[1] == {"id": first[1].id, **rows[1]}


def test_pair_round_trip_leaves_out_unset_fields(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [PairRow.model_validate(GOOD_PAIR)])
    assert json.loads(path.read_text(encoding="utf-8")) == GOOD_PAIR


def test_json_array_and_json_lines_in_json(tmp_path):
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([{"prompt": "a", "answer": 1}, {"prompt": "b"}], indent=2), encoding="utf-8")
    assert [row.prompt for row in read_rows(array, PromptRow)] == ["a", "b"]
    lines = write_lines(tmp_path / "lines.json", [{"prompt": "a"}, {"prompt": "b"}])
    assert [row.prompt for row in read_rows(lines, PromptRow)] == ["a", "b"]
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"prompt": "a"},\n  {"prompt": 5}\n]\n', encoding="utf-8")
    expected = f"{bad}: row 2: field 'prompt': expected a string or a list of messages, got int 5"
    assert error_of(bad, PromptRow) == expected
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"prompt": "a"},\n  {"prompt": }\n]\n', encoding="utf-8")
    assert error_of(broken, PromptRow).startswith(f"{broken}:3: invalid JSON (")


def _dataset_rows() -> list[dict]:
    return [
        {"id": "a", "prompt": "2+3?", "chosen": "5", "rejected": "6", "chosen_reward": 1.0},
        {"id": "b", "prompt": "1+1?", "chosen": "2", "rejected": "3", "chosen_reward": None},
    ]


def test_parquet_arrow_and_saved_dataset(tmp_path):
    import datasets

    dataset = datasets.Dataset.from_list(_dataset_rows())
    parquet = tmp_path / "pairs.parquet"
    dataset.to_parquet(str(parquet))
    saved = tmp_path / "saved"
    dataset.save_to_disk(str(saved))
    arrow = next(saved.glob("*.arrow"))
    for path in (parquet, saved, arrow):
        rows = read_rows(path, PairRow)
        assert [row.id for row in rows] == ["a", "b"]
        assert rows[0].chosen_reward == 1.0 and rows[1].chosen_reward is None


def test_tabular_errors_name_the_row(tmp_path):
    import datasets

    rows = [
        {"id": "a", "prompt": [{"role": "user", "content": "x"}], "chosen": "1", "rejected": "2"},
        {"id": "b", "prompt": [{"role": "robot", "content": "x"}], "chosen": "1", "rejected": "2"},
    ]
    parquet = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    assert error_of(parquet, PairRow).startswith(f"{parquet}: row 2: field 'prompt.0.role': expected one of")
    empty = tmp_path / "empty.parquet"
    datasets.Dataset.from_list(rows).select([]).to_parquet(str(empty))
    assert error_of(empty, PairRow) == f"{empty}: no rows"


def test_messages_with_optional_keys_in_parquet(tmp_path):
    """Arrow columns hold a value for every row: nulls read back as missing fields."""
    import datasets

    rows = [
        {
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
            "prompt": None,
            "completion": None,
        },
        {"messages": None, "prompt": "hi", "completion": "yo"},
    ]
    parquet = tmp_path / "sft.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    parsed = read_rows(parquet, SFTRow)
    assert parsed[0].to_messages() == parsed[1].to_messages()


def test_iter_jsonl_line_numbers(tmp_path):
    path = write_lines(tmp_path / "rows.jsonl", [{"a": 1}, "", {"a": 2}])
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (3, {"a": 2})]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    assert list(iter_jsonl(empty, allow_empty=True)) == []


# --------------------------------------------------------------------------- writing


def test_atomic_write_creates_parents(tmp_path):
    path = tmp_path / "a" / "b" / "config.yaml"
    atomic_write_text(path, "x: 1\n")
    assert path.read_text(encoding="utf-8") == "x: 1\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [GOOD_PAIR])
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_jsonl(path, [{**GOOD_PAIR, "id": "p2"}, {"id": "p3", "bad": object()}])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.jsonl"]


def test_failed_write_from_generator_leaves_nothing(tmp_path):
    def rows():
        yield {"id": "a"}
        raise RuntimeError("generation crashed")

    path = tmp_path / "new.jsonl"
    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- appending


def test_appender_skips_done_ids_and_never_duplicates(tmp_path):
    path = tmp_path / "run" / "generations.jsonl"
    with JsonlAppender(path) as sink:
        assert set(sink.done_ids) == set()
        assert sink.append([{"id": "a", "x": 1}, {"id": "b", "x": 2}]) == 2
        assert sink.append([{"id": "b", "x": 99}, {"id": "c", "x": 3}, {"id": "c", "x": 4}]) == 1
    with JsonlAppender(path) as sink:
        assert set(sink.done_ids) == {"a", "b", "c"}
        assert sink.append([{"id": "a"}, PromptRow(id="d", prompt="p")]) == 1
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows == [
        {"id": "a", "x": 1},
        {"id": "b", "x": 2},
        {"id": "c", "x": 3},
        {"id": "d", "prompt": "p"},
    ]


def test_appender_recovers_truncated_last_line(tmp_path, caplog):
    path = tmp_path / "generations.jsonl"
    path.write_text('{"id": "a", "x": 1}\n{"id": "b", "x": 2}\n{"id": "c", "x', encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        sink = JsonlAppender(path)
    assert "generations.jsonl:3: last line is incomplete" in caplog.text
    assert set(sink.done_ids) == {"a", "b"}
    sink.append([{"id": "b", "x": 2}, {"id": "c", "x": 3}])
    sink.close()
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [row["id"] for row in rows] == ["a", "b", "c"]
    assert rows[2] == {"id": "c", "x": 3}


def test_appender_recovers_garbage_last_line_and_cut_utf8(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_bytes('{"id": "a"}\n{"id": "b", "t": "caf'.encode() + "é".encode()[:1])
    with JsonlAppender(path) as sink:
        assert set(sink.done_ids) == {"a"}
    assert path.read_bytes() == b'{"id": "a"}\n'
    path.write_bytes(b'{"id": "a"}\n{"id": "b", \n')
    with JsonlAppender(path) as sink:
        assert set(sink.done_ids) == {"a"}
    assert path.read_bytes() == b'{"id": "a"}\n'


def test_appender_keeps_complete_last_line_without_newline(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}')
    with JsonlAppender(path) as sink:
        assert set(sink.done_ids) == {"a", "b"}
        sink.append([{"id": "c"}])
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n{"id": "c"}\n'


def test_appender_reports_corruption_before_the_last_line(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_bytes(b'{"id": "a"}\nnot json\n{"id": "c"}\n')
    with pytest.raises(UserError, match=r"g\.jsonl:2: invalid JSON"):
        JsonlAppender(path)


SEPARATORS = "a\u2028b\u2029c\x85d\x0be\x0cf\x1cg\x1dh\x1ei"  # str.splitlines splits at each


def test_rows_whose_text_holds_line_separators_are_read_whole(tmp_path):
    """Model outputs hold U+2028 and the like, which json.dumps(ensure_ascii=False) writes as they are:
    every reader of row files splits at newlines only (an iteration's pairs holding one counted as
    two pairs and set the offline baseline's budget one too high, and the report failed on it)."""
    from rlhf_workflow.data.io import count_jsonl_rows, jsonl_lines
    from rlhf_workflow.eval.report import read_metrics
    from rlhf_workflow.models.card import _last_rows
    from rlhf_workflow.online.loop import online_pair_count
    from rlhf_workflow.train.metrics import _truncate_after

    rows = [{"id": f"r{i}", "prompt": SEPARATORS, "chosen": SEPARATORS, "rejected": "no", "step": i, "split": "train"}
            for i in range(1, 4)]
    run = tmp_path / "run"
    pairs = write_jsonl(run / "iter_1" / "pairs.jsonl", rows) and run / "iter_1" / "pairs.jsonl"
    text = pairs.read_text(encoding="utf-8")
    assert "\u2028" in text and "\u2029" in text and "\x85" in text  # written as they are (ASCII ones escaped)
    assert count_jsonl_rows(pairs) == 3 and [json.loads(line) for line in jsonl_lines(pairs)] == rows
    assert [row for _, row in iter_jsonl(pairs)] == rows
    assert online_pair_count(run) == 3
    metrics = run / "metrics.jsonl"
    write_jsonl(metrics, rows)
    assert read_metrics(run) == rows
    assert _last_rows(metrics)[0] == rows[-1]
    _truncate_after(metrics, 2)
    assert [row for _, row in iter_jsonl(metrics)] == rows[:2]
