"""models/decoding.py: the growing KV cache and the one-token attention against transformers' own."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache

from conftest import build_model, build_tokenizer
from rlhf_workflow.models import decoding
from rlhf_workflow.models.forward import pad_batch, position_ids_from_mask


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=4, num_attention_heads=4, num_key_value_heads=2).eval()
    return tokenizer, model


def _decode(model, prompts, pad_id, *, fast: bool, reserve: int = 3):
    """Prefill a left-padded batch, repeat each row twice, then feed 12 fixed tokens, dropping rows
    after steps 3 and 7; the last-position logits of every step."""
    import inspect

    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids, mask = pad_batch(prompts, pad_id, left=True)
    positions = position_ids_from_mask(mask)
    out = []
    with torch.inference_mode(), decoding.decode_step(model) as applied:
        assert applied == fast
        cache = decoding.GrowingCache(reserve=reserve) if fast else DynamicCache(config=model.config)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       logits_to_keep=1, **{cache_arg: cache}).logits[:, -1]
        cache.batch_repeat_interleave(2)
        mask = mask.repeat_interleave(2, 0)
        next_pos = positions[:, -1:].repeat_interleave(2, 0) + 1
        out.append(logits.repeat_interleave(2, 0))
        for step in range(12):
            if step in (3, 7):
                keep = torch.arange(0, mask.size(0), 2) if step == 3 else torch.tensor([0, 2])
                cache.batch_select_indices(keep)
                mask, next_pos = mask[keep], next_pos[keep]
            token = torch.full((mask.size(0), 1), 5 + step)
            mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], dim=1)
            logits = model(input_ids=token, attention_mask=mask, position_ids=next_pos, use_cache=True,
                           logits_to_keep=1, **{cache_arg: cache}).logits[:, -1]
            next_pos = next_pos + 1
            out.append(logits)
    return out


def _sliding_window_model(tokenizer):
    """A tiny Qwen2 whose layers all attend to the last 4 positions only."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(5)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         use_sliding_window=True, sliding_window=4, max_window_layers=0,
                         pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa")
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("kind", ["llama", "sliding-window"])
def test_growing_cache_and_decode_attention_match_the_dynamic_cache_and_sdpa(tiny, monkeypatch, kind):
    """Prompts of different lengths (left padding in the mask), rows repeated and dropped, buffers that
    must grow (reserve 3 for 12 tokens): every step's logits equal the default path's (fp32). With
    sliding-window layers the cache keeps every token and the mask limits what attention reads."""
    tokenizer, model = tiny
    if kind == "sliding-window":
        model = _sliding_window_model(tokenizer)
        assert set(model.config.layer_types) == {"sliding_attention"}
    prompts = [tokenizer.encode("the sky is"), tokenizer.encode("a b c d e f g h i j"), tokenizer.encode("hi")]
    fast = _decode(model, prompts, tokenizer.pad_token_id, fast=True)
    monkeypatch.setattr(decoding, "applies", lambda model: False)
    slow = _decode(model, prompts, tokenizer.pad_token_id, fast=False)
    assert len(fast) == len(slow) == 13
    for step, (a, b) in enumerate(zip(fast, slow)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")


def test_decode_step_leaves_the_model_as_it_was(tiny):
    tokenizer, model = tiny
    assert model.config._attn_implementation == "sdpa"
    with decoding.decode_step(model) as applied:
        assert applied and model.config._attn_implementation == decoding.ATTENTION
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), decoding.decode_step(model):
        raise RuntimeError("a failed step")
    assert model.config._attn_implementation == "sdpa"
    model.config.layer_types = ["full_attention", "linear_attention"]
    try:  # a model with layers a KV cache does not serve: nothing is changed
        with decoding.decode_step(model) as applied:
            assert not applied
    finally:
        del model.config.layer_types
    model.train()
    try:  # training, or another attention implementation: nothing is changed
        with decoding.decode_step(model) as applied:
            assert not applied and model.config._attn_implementation == "sdpa"
    finally:
        model.eval()


def test_the_cache_layer_grows_crops_and_selects_rows():
    layer = decoding.GrowingLayer(reserve=2)
    prompt = torch.arange(2 * 1 * 3 * 4, dtype=torch.float32).view(2, 1, 3, 4)
    keys, values = layer.update(prompt, prompt + 100)
    assert keys is prompt  # the prompt's attention reads the states it was given
    assert layer.get_seq_length() == 3 and layer._keys.shape[-2] == 5
    written = [prompt]
    for t in range(4):  # the third new token fills the buffer's 5 slots; the fourth doubles it
        token = torch.full((2, 1, 1, 4), -1.0 - t)
        keys, values = layer.update(token, token + 100)
        written.append(token)
        torch.testing.assert_close(keys, torch.cat(written, dim=-2), rtol=0, atol=0)
        torch.testing.assert_close(values, torch.cat(written, dim=-2) + 100, rtol=0, atol=0)
    assert layer.get_seq_length() == 7 and layer._keys.shape[-2] == 10
    layer.crop(-2)
    assert layer.get_seq_length() == 5 and layer.keys.shape[-2] == 5
    layer.batch_select_indices(torch.tensor([1]))
    torch.testing.assert_close(layer.keys, torch.cat(written, dim=-2)[1:, :, :5], rtol=0, atol=0)
    layer.batch_repeat_interleave(3)
    assert layer.keys.shape == (3, 1, 5, 4) and layer.values.shape == (3, 1, 5, 4)


def test_decode_attention_leaves_what_it_does_not_compute_to_sdpa(tiny):
    """A one-token query with a float mask per head (ALiBi-style biases) is computed by sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _, model = tiny
    module = model.model.layers[0].self_attn
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    bias = torch.randn(2, 4, 1, 5)
    ours, _ = decoding.decode_attention(module, query, key, value, bias, scaling=0.3)
    theirs, _ = sdpa_attention_forward(module, query, key, value, bias, scaling=0.3)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    shared = torch.randn(2, 1, 1, 5)  # one mask for all heads: computed here, the same up to rounding
    ours, _ = decoding.decode_attention(module, query, key, value, shared, scaling=0.3)
    theirs, _ = sdpa_attention_forward(module, query, key, value, shared, scaling=0.3)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
