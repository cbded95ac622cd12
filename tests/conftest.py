"""Shared fixtures: a tokenizer trained here and tiny random Llama models. Nothing is downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Two chat templates that differ in the ways that break naive masking: ChatML with a default
# system prompt inserted when none is given (as SmolLM2's), and a Llama-3 style template with a
# BOS written into the text and an end-of-turn token that is not the tokenizer's eos.
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIAL_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Write a short poem about the moon. Include the word blue.",
    "What is two plus three? The answer is five.",
    "You are a helpful assistant. Answer the question of the user.",
    "system user assistant hello world how are you today",
    "Lowercase letters only, no commas, end with a period.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
] * 20


def build_tokenizer(template: str = "chatml"):
    """A byte-level BPE tokenizer trained on a small corpus, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if template == "chatml":
        kwargs = dict(eos_token="<|im_end|>", pad_token="<|im_end|>", chat_template=CHATML)
    elif template == "llama3":
        kwargs = dict(
            bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|eot_id|>", chat_template=LLAMA3
        )
    elif template == "none":
        kwargs = dict(eos_token="<|im_end|>", pad_token="<|im_end|>")
    else:
        raise ValueError(template)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def build_model(tokenizer, seed: int = 0, **overrides):
    """A 2-layer Llama with random weights sized for the tokenizer above."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg))


@pytest.fixture(scope="session")
def chatml_tokenizer():
    return build_tokenizer("chatml")


@pytest.fixture(scope="session")
def llama3_tokenizer():
    return build_tokenizer("llama3")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny chat model (ChatML template): loadable with from_pretrained(dir)."""
    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tokenizer("chatml")
    build_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process stage builds its own accelerate state; accelerate keeps one per process."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
