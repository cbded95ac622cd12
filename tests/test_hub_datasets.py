"""Inputs by Hub dataset name, from the datasets cache with no network (HF_HUB_OFFLINE=1, as conftest sets),
and the published preference layouts (UltraFeedback binarized, HH-RLHF, TRL's implicit prompt) read as
they are."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import rule_pairs, write_jsonl

from rlhf_workflow.cli import main
from rlhf_workflow.data.io import hub_dataset, read_rows
from rlhf_workflow.data.schemas import PairRow, PromptRow, split_preference_columns
from rlhf_workflow.errors import UserError

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def ultrafeedback_rows(pairs):
    """Rule pairs in UltraFeedback binarized's layout: the prompt repeated as the first message of both sides."""
    rows = []
    for k, p in enumerate(pairs):
        prompt = p["prompt"] if isinstance(p["prompt"], str) else p["prompt"][0]["content"]
        chosen = p["chosen"] if isinstance(p["chosen"], str) else p["chosen"][0]["content"]
        rows.append({"prompt": prompt, "prompt_id": f"u{k}", "score_chosen": 8.0, "score_rejected": 3.0,
                     "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": p["rejected"]}]})
    return rows


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """``someorg/prefs`` (splits train_prefs, test_prefs) placed in a datasets cache as a load with network
    access would have left it: prepared by datasets' own Parquet builder, under the dataset's cache name."""
    import datasets
    import pandas as pd
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    cache = tmp_path / "datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    files = {}
    for split, pairs in (("train_prefs", rule_pairs(48, 1)), ("test_prefs", rule_pairs(12, 2))):
        files[split] = [str(tmp_path / f"{split}.parquet")]
        pd.DataFrame(ultrafeedback_rows(pairs)).to_parquet(files[split][0])
    builder = Parquet(cache_dir=str(tmp_path / "build"), dataset_name="prefs", config_name="default", hash="0" * 16,
                      data_files=DataFilesDict.from_patterns(files))
    builder.download_and_prepare()
    target = cache / "someorg___prefs" / "default" / "0.0.0"
    target.mkdir(parents=True)
    shutil.copytree(builder.cache_dir, target / ("0" * 16))
    return cache


def test_a_cached_hub_dataset_is_read_by_name_offline(hub_cache):
    rows = read_rows("someorg/prefs:train_prefs", PairRow)
    assert len(rows) == 48
    first = rows[0]  # UltraFeedback's repeated prompt is dropped from the responses
    assert [m.role for m in first.chosen] == ["assistant"] and first.model_extra["score_chosen"] == 8.0
    assert len(read_rows("someorg/prefs:default:test_prefs", PairRow)) == 12
    prompts = read_rows("someorg/prefs:test_prefs", PromptRow)  # the same name as a prompts input
    assert len(prompts) == 12 and prompts[0].model_extra["prompt_id"] == "u0"


@pytest.mark.parametrize("spec, message", [
    ("someorg/prefs", "has several splits (train_prefs, test_prefs); name one, e.g. someorg/prefs:train_prefs"),
    ("someorg/prefs:nope", 'Unknown split "nope"'),
    ("someorg/uncached:train", "not in the datasets cache"),
])
def test_hub_names_that_cannot_be_read_are_one_line(hub_cache, spec, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_rows(spec, PairRow)


def test_what_counts_as_a_hub_name(tmp_path, monkeypatch):
    assert hub_dataset("HuggingFaceH4/ultrafeedback_binarized:train_prefs") == (
        "HuggingFaceH4/ultrafeedback_binarized", None, "train_prefs")
    assert hub_dataset("org/name:cfg:test") == ("org/name", "cfg", "test")
    assert hub_dataset("org/name") == ("org/name", None, None)
    assert hub_dataset("examples/prefs.jsonl") is None  # a file name, even when the file is missing
    assert hub_dataset("data/train.parquet") is None and hub_dataset("a/b/c") is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub_dataset("org/name") is None  # a local directory wins


def test_training_and_eval_take_a_hub_name_and_the_card_names_the_dataset(hub_cache, tiny_model_dir, tmp_path,
                                                                         monkeypatch):
    out = tmp_path / "rm"
    assert main(["train-rm", f"model.name_or_path={tiny_model_dir}", "data.train=someorg/prefs:train_prefs",
                 "data.eval=someorg/prefs:test_prefs", f"output_dir={out}", "train.per_device_batch_size=8",
                 "data.max_length=64"]) == 0
    card = (out / "model" / "README.md").read_text()
    assert "datasets:\n- someorg/prefs" in card and "| train | `someorg/prefs:train_prefs` | 48 |" in card
    monkeypatch.chdir(tmp_path)  # the default results file of a Hub name is in the working directory
    assert main(["eval-rm", f"model={out / 'model'}", "data=someorg/prefs:test_prefs", "max_length=64"]) == 0
    assert json.loads((tmp_path / "someorg__prefs-test_prefs.eval.json").read_text())["pairs"] == 12


def test_hh_rlhf_and_implicit_prompt_layouts(tmp_path):
    hh = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell a joke\n\nAssistant: A good one.",
          "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell a joke\n\nAssistant: No."}
    row = PairRow.model_validate(hh)
    assert [(m.role, m.content) for m in row.prompt] == [("user", "Hi there"), ("assistant", "Hello!"),
                                                        ("user", "Tell a joke")]
    assert [m.content for m in row.chosen] == ["A good one."] and [m.content for m in row.rejected] == ["No."]
    implicit = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}
    assert split_preference_columns(implicit)["prompt"] == [{"role": "user", "content": "q"}]
    plain = {"prompt": "q", "chosen": "a", "rejected": "b"}
    assert split_preference_columns(plain) == plain  # our own layout is untouched
    rows = read_rows(write_jsonl(tmp_path / "hh.jsonl", [hh, implicit]), PairRow)
    assert len(rows) == 2 and rows[1].prompt_messages() == [{"role": "user", "content": "q"}]
    with pytest.raises(UserError, match="bad.jsonl:1: missing field .prompt."):  # no prompt to find: refused
        read_rows(write_jsonl(tmp_path / "bad.jsonl", [{"chosen": [], "rejected": "\n\nHuman: x"}]), PairRow)
