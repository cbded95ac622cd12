"""The pairwise preference model: training through train-pm on a learnable rule, eval-rm of it (both
orders of every pair), and ranking responses with the trained judge."""

from __future__ import annotations

import json

import pytest

from conftest import build_model, build_tokenizer, read_metrics
from rlhf_workflow.cli import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def pm_model_dir(tmp_path_factory):
    """A wider, deeper tiny model: telling which response holds the rule word takes some capacity
    (with 2 layers of width 64 it learns the rule for some seeds only; with 4 for each seed tried)."""
    path = tmp_path_factory.mktemp("pm-model")
    tok = build_tokenizer("chatml")
    build_model(tok, hidden_size=64, intermediate_size=128, num_hidden_layers=4).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_preference_model_learns_the_rule_and_ranks(pm_model_dir, rule_data, tmp_path):
    train, held_out = rule_data
    out = tmp_path / "pm"
    assert main(["train-pm", f"model.name_or_path={pm_model_dir}", f"data.train={train}", f"data.eval={held_out}",
                 f"output_dir={out}", "train.lr=3e-3", "train.epochs=10", "train.per_device_batch_size=8",
                 "train.scheduler=cosine", "train.warmup_ratio=0.1", "train.log_every=64"]) == 0
    evals = read_metrics(out, "eval")
    assert evals[-1]["accuracy"] >= 0.75, evals
    assert (out / "model" / "preference_model.json").is_file()

    result_file = tmp_path / "pm-eval.json"
    assert main(["eval-rm", f"model={out / 'model'}", f"data={held_out}", f"output={result_file}"]) == 0
    result = json.loads(result_file.read_text())
    assert result["kind"] == "pm" and result["accuracy"] >= 0.75
    assert result["preference"]["forward_passes"] == 2 * 48  # both orders of every pair

    from rlhf_workflow.models.preference import load_preference_judge

    judge = load_preference_judge(str(out / "model"))
    responses = ["fox jumps dog over", "the quick blue fox", "lazy dog today", "moon blue poem"]
    for method in ("knockout", "copeland", "borda"):
        ranking = judge.rank([{"role": "user", "content": "hello world?"}], responses, method=method)
        assert "blue" in responses[ranking.best] and "dog" in responses[ranking.worst]
