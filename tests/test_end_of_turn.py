"""The end-of-turn token ids: one definition (`data.templating.end_of_turn_ids`) that the hf and vLLM
backends stop at and that policy evaluation strips from responses cut at max length.

The case that broke: a Llama-3 style tokenizer whose end-of-turn token (``<|eot_id|>``) is not its
eos and is marked special only in tokenizer.json's added tokens, so ``all_special_ids`` misses it."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from conftest import LLAMA3, build_model, build_tokenizer

from rlhf_workflow.config import ModelConfig, SamplingConfig, VLLMBackendConfig
from rlhf_workflow.data.templating import end_of_turn_ids
from rlhf_workflow.generate.base import GenerationRequest
from rlhf_workflow.generate.hf import HFGenerator

EOT = "<|eot_id|>"


@pytest.fixture(scope="module")
def eot_tokenizer():
    """Llama-3 template ending turns with <|eot_id|>, eos another token: <|eot_id|> is special only as an added token."""
    from transformers import PreTrainedTokenizerFast

    base = build_tokenizer("llama3")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, bos_token="<|begin_of_text|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>", chat_template=LLAMA3)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    assert eot not in tokenizer.all_special_ids and tokenizer.eos_token_id != eot  # the case under test
    assert tokenizer.added_tokens_decoder[eot].special
    return tokenizer


def _eot_model(tokenizer, bonus: float):
    """A tiny model with a logit bonus on <|eot_id|>."""
    model = build_model(tokenizer, tie_word_embeddings=False).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
        head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tokenizer.convert_tokens_to_ids(EOT)] = bonus
    model.lm_head = head
    return model


def test_end_of_turn_ids_cover_added_special_tokens_and_the_generation_config(eot_tokenizer):
    eot = eot_tokenizer.convert_tokens_to_ids(EOT)
    assert end_of_turn_ids(eot_tokenizer) == {eot_tokenizer.eos_token_id, eot}
    assert end_of_turn_ids(eot_tokenizer, chat_template=False) == {eot_tokenizer.eos_token_id}
    model = build_model(eot_tokenizer)
    model.generation_config.eos_token_id = [7, 9]
    assert end_of_turn_ids(eot_tokenizer, model) == {eot_tokenizer.eos_token_id, eot, 7, 9}
    model.generation_config.eos_token_id = 11
    assert end_of_turn_ids(eot_tokenizer, model.generation_config) == {eot_tokenizer.eos_token_id, eot, 11}
    # ChatML: <|im_end|> both closes the turn and is the eos
    chatml = build_tokenizer("chatml")
    assert end_of_turn_ids(chatml) == {chatml.eos_token_id}


def test_hf_generation_stops_at_an_end_of_turn_token_special_only_as_an_added_token(eot_tokenizer):
    generator = HFGenerator(_eot_model(eot_tokenizer, 50.0), eot_tokenizer, batch_size=2)
    requests = [GenerationRequest(f"p{i}", [{"role": "user", "content": text}])
                for i, text in enumerate(["hello world", "What is two plus three?", "today"])]
    sampling = SamplingConfig(n=2, temperature=1.0, max_new_tokens=12)
    results = [r for batch in generator.generate(requests, sampling) for r in batch]
    samples = [s for r in results for s in r.samples]
    assert len(samples) == 6
    assert all(s.finish_reason == "stop" and s.num_tokens == 0 for s in samples)


def test_hf_generation_stops_midway_at_the_end_of_turn(eot_tokenizer):
    """A smaller bonus: answers end at <|eot_id|> after some tokens, and it is not part of the text."""
    generator = HFGenerator(_eot_model(eot_tokenizer, 3.0), eot_tokenizer, batch_size=4)
    requests = [GenerationRequest(f"p{i}", [{"role": "user", "content": f"Write about the moon {i}."}])
                for i in range(6)]
    sampling = SamplingConfig(n=4, temperature=1.0, max_new_tokens=16, seed=3)
    samples = [s for batch in generator.generate(requests, sampling) for r in batch for s in r.samples]
    assert any(s.finish_reason == "stop" for s in samples)
    for sample in samples:  # a response either stopped or ran out of tokens
        assert (sample.finish_reason == "stop") != (sample.num_tokens == 16)


def test_vllm_backend_stops_at_the_same_ids(eot_tokenizer, tmp_path, monkeypatch):
    """The vLLM backend's stop_token_ids: the end-of-turn ids with the model's generation config (a stand-in
    vllm module records the parameters; the real engine is tested in test_vllm.py)."""
    from rlhf_workflow.generate.vllm import VLLMGenerator

    model = build_model(eot_tokenizer)
    model.generation_config.eos_token_id = [eot_tokenizer.eos_token_id, 13]
    model.save_pretrained(tmp_path)
    eot_tokenizer.save_pretrained(tmp_path)

    class FakeLLM:
        def __init__(self, **kwargs):
            self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=256))

    fake = types.SimpleNamespace(LLM=FakeLLM, SamplingParams=lambda **kwargs: kwargs)
    platform = types.SimpleNamespace(is_cpu=lambda: True, is_sleep_mode_available=lambda: False)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.platforms", types.SimpleNamespace(current_platform=platform))
    generator = VLLMGenerator(ModelConfig(name_or_path=str(tmp_path)), VLLMBackendConfig(), eot_tokenizer)
    params = generator._params(GenerationRequest("p0", [{"role": "user", "content": "hi"}]), SamplingConfig())
    eot = eot_tokenizer.convert_tokens_to_ids(EOT)
    assert set(params["stop_token_ids"]) == {eot_tokenizer.eos_token_id, eot, 13}
    assert params["logprobs"] == 0  # the sampled tokens' log-probs: the evaluation's KL reads them


def test_vllm_samples_carry_their_logprob_and_tokens_unless_cut_at_a_stop_string():
    """What the backend keeps of vLLM's CompletionOutput (its fields as vLLM documents them)."""
    from rlhf_workflow.generate.vllm import engine_sample

    def output(**fields):
        return types.SimpleNamespace(**{"text": "hi there", "token_ids": (5, 6, 7), "finish_reason": "stop",
                                        "stop_reason": None, "cumulative_logprob": -3.5, **fields})

    ended = engine_sample(output())  # stopped at an end-of-turn token (stop_reason None or its id): 7
    assert (ended.logprob, ended.token_ids, ended.num_tokens, ended.finish_reason) == (-3.5, [5, 6, 7], 2, "stop")
    assert engine_sample(output(stop_reason=7)).logprob == -3.5
    assert engine_sample(output(stop_reason=7)).num_tokens == 2  # as the hf backend counts: the text's tokens
    long = engine_sample(output(finish_reason="length"))
    assert (long.finish_reason, long.num_tokens) == ("length", 3)
    cut = engine_sample(output(stop_reason="\n\n"))  # the text ends before its last tokens
    assert cut.logprob is None and cut.token_ids is None
    assert engine_sample(output(cumulative_logprob=None)).logprob is None


def test_kl_trimming_strips_the_end_of_turn_of_responses_cut_at_max_length(eot_tokenizer, tmp_path):
    """A response cut at max length never sampled <|eot_id|>, so its log-prob leaves it out: it is the
    log-prob of the same text that stopped, less log p(<|eot_id|>) < 0."""
    from rlhf_workflow.eval.policy import response_logps

    build_model(eot_tokenizer).save_pretrained(tmp_path)
    eot_tokenizer.save_pretrained(tmp_path)
    rows = [{"id": "a", "prompt": "hello", "responses": ["hello world", "hello world"],
             "finish_reasons": ["length", "stop"]}]
    logps = response_logps(ModelConfig(name_or_path=str(tmp_path)), eot_tokenizer, rows, chat_template=True,
                           device="cpu")
    assert logps[("a", 0)] > logps[("a", 1)]
