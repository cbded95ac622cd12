"""models/prompt_states.py: prompt keys and values kept between passes give the values of a whole
pass over prompt + response, for the reward model's scores and π0's log-probs alike."""

from __future__ import annotations

import pytest
import torch

from conftest import build_model, build_tokenizer
from rlhf_workflow.models import prompt_states
from rlhf_workflow.models.forward import body_hidden_states
from rlhf_workflow.models.prompt_states import PromptStates, model_identity, response_hidden_states, shared, supports

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [5, 6, 7, 8, 9], [13, 14, 15, 16, 17, 18, 19]]  # one prompt twice
RESPONSES = [[20, 21], [22, 23, 24, 25], [26], [27, 28, 29]]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer()
    return tokenizer, build_model(tokenizer, seed=3, num_attention_heads=4, num_key_value_heads=2).eval()


def _alone(model, prompt, response):
    ids = torch.tensor([prompt + response])
    with torch.inference_mode():
        return body_hidden_states(model, ids, torch.ones_like(ids))[0]


@pytest.mark.parametrize("budget", [prompt_states.BUDGET_BYTES, 0])
def test_response_states_are_those_of_a_whole_pass_and_kept_prompts_are_reused(tiny, budget):
    tokenizer, model = tiny
    states = PromptStates(budget_bytes=budget)
    first = response_hidden_states(model, PROMPTS, RESPONSES, states, tokenizer.pad_token_id, prompt_batch=2)
    hidden, prompt_last, lengths = first
    assert lengths.tolist() == [len(r) for r in RESPONSES]
    for s, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        whole = _alone(model, prompt, response)
        torch.testing.assert_close(hidden[s, : len(response)], whole[len(prompt):], atol=1e-5, rtol=0)
        torch.testing.assert_close(prompt_last[s], whole[len(prompt) - 1], atol=1e-5, rtol=0)
    # three distinct prompts, kept within the budget (none with a budget of 0); the repeated one computed once
    assert len(states) == (3 if budget else 0) and states.reused == 0
    again = response_hidden_states(model, PROMPTS, RESPONSES, states, tokenizer.pad_token_id)
    assert states.reused == (3 if budget else 0)
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_reward_scores_with_kept_prompts_equal_the_shared_prefix_pass():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlhf_workflow.models.reward import RewardModel, RewardScorer

    tokenizer = build_tokenizer("chatml")
    torch.manual_seed(0)
    config = LlamaConfig(**{**build_model(tokenizer).config.to_dict(), "num_labels": 1})
    scorer = RewardScorer(RewardModel(LlamaForSequenceClassification(config).eval()), tokenizer, max_length=64,
                          batch_size=3)
    prompts = ["hello there", "what is two plus two?", "say something long please"]
    responses = [["hi", "hello friend", "yo"], ["four", "4, obviously"], ["ok"]]
    plain = scorer.score_groups(prompts, responses)
    scorer.prompt_states = PromptStates()
    kept = scorer.score_groups(prompts, responses)
    assert len(scorer.prompt_states) == 3
    again = scorer.score_groups(prompts, responses)
    assert scorer.prompt_states.reused >= 3
    for a, b, c in zip(plain, kept, again):
        assert b == pytest.approx(a, abs=1e-5) and c == pytest.approx(a, abs=1e-5)
    assert len({round(v, 4) for group in plain for v in group}) == 6  # six different rewards, not one read six times


def test_kl_log_probs_with_kept_prompts_equal_the_shared_prefix_pass(tiny_model_dir):
    from rlhf_workflow.config import ModelConfig
    from rlhf_workflow.eval.policy import response_logps
    from rlhf_workflow.models.loading import load_tokenizer

    config = ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = [{"id": "a", "prompt": "hello there", "responses": ["hi", "hello friend"]},
            {"id": "b", "prompt": "what is two plus two?", "responses": ["four"],
             "response_token_ids": [tokenizer.encode("4", add_special_tokens=False)]}]
    kwargs = dict(chat_template=True, device="cpu")
    plain = response_logps(config, tokenizer, rows, **kwargs)
    prompt_states._SHARED.clear()
    kept = response_logps(config, tokenizer, rows, keep_prompt_states=True, **kwargs)
    again = response_logps(config, tokenizer, rows, keep_prompt_states=True, **kwargs)
    (store,) = prompt_states._SHARED.values()
    assert len(store) == 2 and store.reused == 2
    assert set(plain) == set(kept) == {("a", 0), ("a", 1), ("b", 0)}
    for key in plain:
        assert kept[key] == pytest.approx(plain[key], abs=1e-4) and again[key] == pytest.approx(plain[key], abs=1e-4)


def test_identity_changes_with_the_weights_and_stores_are_few(tmp_path):
    import os

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"one")
    before = model_identity(str(tmp_path), ["bfloat16", "cpu"])
    assert model_identity(str(tmp_path), ["bfloat16", "cpu"]) == before
    assert model_identity(str(tmp_path), ["float32", "cpu"]) != before
    weights.write_bytes(b"two!")  # retrained in place
    os.utime(weights, ns=(1, 1))
    assert model_identity(str(tmp_path), ["bfloat16", "cpu"]) != before

    prompt_states._SHARED.clear()
    first = shared("a")
    assert shared("a") is first
    for name in "bcdef":
        shared(name)
    assert len(prompt_states._SHARED) == prompt_states.KEEP_MODELS and "a" not in prompt_states._SHARED


def test_only_attention_models_with_sdpa_or_eager_keep_prompts(tiny):
    tokenizer, _ = tiny
    model = build_model(tokenizer)
    assert supports(model)
    model.config.layer_types = ["full_attention", "linear_attention"]
    assert not supports(model)
    model.config.layer_types = ["full_attention", "full_attention"]
    model.config._attn_implementation = "flash_attention_2"
    assert not supports(model)
