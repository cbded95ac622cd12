"""Every saved model carries a model card: Hub-style YAML front matter naming the base model, then the
stage, data, hyperparameters, metrics and how to load it."""

from __future__ import annotations

import shutil

import pytest
from conftest import rule_pairs, sft_args, write_jsonl

from rlhf_workflow.cli import main
from rlhf_workflow.models.card import origin, read_front_matter

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_cards_name_the_base_model_through_a_chain_of_local_models(tiny_model_dir, sft_data, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "README.md").write_text("---\nbase_model: org/tiny-base\nlicense: mit\n---\n# tiny\n")
    assert main(sft_args(base, sft_data, tmp_path / "sft", "train.epochs=1", f"data.eval={sft_data}")) == 0
    card_path = tmp_path / "sft" / "model" / "README.md"
    meta = read_front_matter(card_path)
    assert meta["base_model"] == "org/tiny-base" and meta["license"] == "mit"
    assert meta["library_name"] == "transformers" and set(meta["tags"]) == {"rlhf-workflow", "sft"}
    card = card_path.read_text()
    assert f"from `{base}`" in card and f"| train | `{sft_data}` | 32 |" in card and f"| eval | `{sft_data}` | 32 |" in card
    assert "Held-out data (step" in card and "| loss |" in card
    assert "lr: 0.003" in card and "AutoModelForCausalLM.from_pretrained" in card

    # DPO from the SFT model: the card follows the chain back to the Hub id, and names the reference
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rule_pairs(8, 0))
    sft_model = tmp_path / "sft" / "model"
    assert main(["dpo", f"model.name_or_path={sft_model}", f"data.train={pairs}", f"output_dir={tmp_path / 'dpo'}",
                 "train.per_device_batch_size=4", "data.max_length=64"]) == 0
    dpo_card = (tmp_path / "dpo" / "model" / "README.md").read_text()
    dpo_meta = read_front_matter(tmp_path / "dpo" / "model" / "README.md")
    assert dpo_meta["base_model"] == "org/tiny-base" and "dpo" in dpo_meta["tags"]
    assert f"π_ref = `{sft_model}`" in dpo_card and "β = 0.1" in dpo_card and "| train | " in dpo_card


def test_reward_model_card_says_how_to_read_the_reward(tiny_model_dir, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rule_pairs(8, 0))
    assert main(["train-rm", f"model.name_or_path={tiny_model_dir}", f"data.train={pairs}",
                 f"output_dir={tmp_path / 'rm'}", "train.per_device_batch_size=4", "data.max_length=64"]) == 0
    meta = read_front_matter(tmp_path / "rm" / "model" / "README.md")
    assert meta["pipeline_tag"] == "text-classification" and "reward-model" in meta["tags"]
    assert "base_model" not in meta  # a local model without a card: no Hub id is known
    assert "AutoModelForSequenceClassification" in (tmp_path / "rm" / "model" / "README.md").read_text()


def test_origin_of_builtin_hub_and_unknown_sources(tmp_path):
    assert origin("smollm2-135m-instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
    assert origin("meta-llama/Meta-Llama-3-8B-Instruct") == ("meta-llama/Meta-Llama-3-8B-Instruct", None)
    (tmp_path / "README.md").write_text("---\nbad: [yaml\n---\n")
    assert read_front_matter(tmp_path / "README.md") == {}
    assert read_front_matter(tmp_path / "missing.md") == {}
