"""Token ids and loss masks from chat templates (ChatML with a default system prompt, Llama-3)."""

from __future__ import annotations

import pytest

from conftest import build_tokenizer
from rlhf_workflow.data.schemas import Message
from rlhf_workflow.data.templating import (
    encode_conversation,
    encode_prompt,
    encode_prompt_response,
    truncate,
)
from rlhf_workflow.errors import UserError

END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}
PROMPT = "What is two plus three?"
RESPONSE = "The answer is five."


@pytest.fixture(params=["chatml", "llama3"])
def template(request, chatml_tokenizer, llama3_tokenizer):
    """(name, tokenizer) for both chat templates."""
    tokenizer = chatml_tokenizer if request.param == "chatml" else llama3_tokenizer
    return request.param, tokenizer


def masked_spans(ids: list[int], mask: list[int]) -> list[list[int]]:
    """The runs of consecutive ids whose mask is 1."""
    spans: list[list[int]] = []
    previous = 0
    for token, bit in zip(ids, mask):
        if bit and not previous:
            spans.append([])
        if bit:
            spans[-1].append(token)
        previous = bit
    return spans


def test_response_mask_is_response_plus_end_of_turn(template):
    name, tokenizer = template
    ids, mask = encode_prompt_response(tokenizer, PROMPT, RESPONSE)
    assert len(ids) == len(mask)
    spans = masked_spans(ids, mask)
    assert len(spans) == 1, "one contiguous response span, at the end"
    assert mask[-1] == 1
    assert tokenizer.decode(spans[0]) == RESPONSE + END_OF_TURN[name]
    assert ids[-1] == tokenizer.convert_tokens_to_ids(END_OF_TURN[name])


def test_prompt_ids_are_encode_prompt(template):
    _, tokenizer = template
    ids, mask = encode_prompt_response(tokenizer, PROMPT, RESPONSE)
    prompt_ids = encode_prompt(tokenizer, PROMPT)
    assert ids[: len(prompt_ids)] == prompt_ids
    assert mask[: len(prompt_ids)] == [0] * len(prompt_ids)
    assert all(mask[len(prompt_ids) :])
    expected_text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(prompt_ids) == expected_text


def test_chatml_default_system_prompt_is_in_prompt_part(chatml_tokenizer):
    ids, mask = encode_prompt_response(chatml_tokenizer, PROMPT, RESPONSE)
    prompt_part = chatml_tokenizer.decode([token for token, bit in zip(ids, mask) if not bit])
    learned_part = chatml_tokenizer.decode([token for token, bit in zip(ids, mask) if bit])
    assert prompt_part.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert prompt_part.endswith("<|im_start|>assistant\n")
    assert "helpful assistant" not in learned_part
    assert "<|im_start|>" not in learned_part


def test_llama3_bos_appears_once(llama3_tokenizer):
    bos = llama3_tokenizer.bos_token_id
    ids, _ = encode_prompt_response(llama3_tokenizer, PROMPT, RESPONSE)
    assert ids[0] == bos
    assert ids.count(bos) == 1
    conversation_ids, _ = encode_conversation(
        llama3_tokenizer,
        [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hello world"},
            {"role": "user", "content": "how are you"},
            {"role": "assistant", "content": "today"},
        ],
    )
    assert conversation_ids.count(bos) == 1


def test_multi_turn_masks_exactly_the_assistant_turns(template):
    name, tokenizer = template
    messages = [
        {"role": "system", "content": "Lowercase letters only."},
        {"role": "user", "content": "Write a short poem about the moon."},
        {"role": "assistant", "content": "the moon is blue"},
        {"role": "user", "content": "What is two plus three?"},
        {"role": "assistant", "content": "the answer is five."},
    ]
    ids, mask = encode_conversation(tokenizer, messages)
    spans = masked_spans(ids, mask)
    eot = END_OF_TURN[name]
    assert [tokenizer.decode(span) for span in spans] == ["the moon is blue" + eot, "the answer is five." + eot]
    unmasked = tokenizer.decode([token for token, bit in zip(ids, mask) if not bit])
    assert "Lowercase letters only." in unmasked
    assert "Write a short poem about the moon." in unmasked
    assert "What is two plus three?" in unmasked
    # The whole sequence reads as the template's render (up to the end of the last turn).
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert full.startswith(tokenizer.decode(ids))
    assert full[len(tokenizer.decode(ids)) :].strip() == ""


def test_trailing_non_assistant_messages_are_dropped(chatml_tokenizer):
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "how are you"},
    ]
    ids, mask = encode_conversation(chatml_tokenizer, messages)
    assert mask[-1] == 1
    assert "how are you" not in chatml_tokenizer.decode(ids)


def test_single_turn_conversation_matches_prompt_response(template):
    _, tokenizer = template
    messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": RESPONSE}]
    assert encode_conversation(tokenizer, messages) == encode_prompt_response(tokenizer, PROMPT, RESPONSE)
    with_system = [{"role": "system", "content": "Lowercase letters only."}] + messages
    assert encode_conversation(tokenizer, with_system) == encode_prompt_response(
        tokenizer, with_system[:2], [{"role": "assistant", "content": RESPONSE}]
    )


def test_conversational_and_string_forms_agree(template):
    _, tokenizer = template
    as_strings = encode_prompt_response(tokenizer, PROMPT, RESPONSE)
    as_dicts = encode_prompt_response(
        tokenizer, [{"role": "user", "content": PROMPT}], [{"role": "assistant", "content": RESPONSE}]
    )
    as_models = encode_prompt_response(
        tokenizer, [Message(role="user", content=PROMPT)], [Message(role="assistant", content=RESPONSE)]
    )
    assert as_strings == as_dicts == as_models
    assert encode_prompt(tokenizer, PROMPT) == encode_prompt(tokenizer, [{"role": "user", "content": PROMPT}])


def test_plain_text_without_chat_template(chatml_tokenizer):
    ids, mask = encode_prompt_response(chatml_tokenizer, "hello", " world", chat_template=False)
    prompt_ids = encode_prompt(chatml_tokenizer, "hello", chat_template=False)
    assert ids[: len(prompt_ids)] == prompt_ids
    assert ids[-1] == chatml_tokenizer.eos_token_id
    assert chatml_tokenizer.decode([t for t, bit in zip(ids, mask) if bit]) == " world<|im_end|>"
    with pytest.raises(UserError, match="needs the chat template"):
        encode_prompt(chatml_tokenizer, [{"role": "user", "content": "hello"}], chat_template=False)
    single_turn = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": " world"}]
    assert encode_conversation(chatml_tokenizer, single_turn, chat_template=False) == (ids, mask)
    with pytest.raises(UserError, match="needs the chat template"):
        encode_conversation(chatml_tokenizer, single_turn * 2, chat_template=False)


def test_no_chat_template_is_a_user_error():
    tokenizer = build_tokenizer("none")
    expected = (
        f"the tokenizer of {tokenizer.name_or_path or 'the model'} has no chat template; set "
        "data.apply_chat_template=false to use plain text, or use a chat model"
    )
    with pytest.raises(UserError) as info:
        encode_prompt(tokenizer, PROMPT)
    assert str(info.value) == expected
    with pytest.raises(UserError, match="no chat template"):
        encode_prompt_response(tokenizer, PROMPT, RESPONSE)
    with pytest.raises(UserError, match="no chat template"):
        encode_conversation(tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    # Plain text still works with such a tokenizer.
    ids, mask = encode_prompt_response(tokenizer, PROMPT, RESPONSE, chat_template=False)
    assert sum(mask) > 0


def test_template_that_is_not_prefix_consistent(chatml_tokenizer):
    tokenizer = build_tokenizer("chatml")
    # Writes the number of messages first: every render differs from its prefixes.
    tokenizer.chat_template = "{{ messages | length }}" + chatml_tokenizer.chat_template
    with pytest.raises(UserError, match="not prefix-consistent"):
        encode_prompt_response(tokenizer, PROMPT, RESPONSE)
    with pytest.raises(UserError, match="not prefix-consistent"):
        encode_conversation(tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


def test_conversation_without_assistant_turn(chatml_tokenizer):
    with pytest.raises(UserError, match="no assistant message"):
        encode_conversation(chatml_tokenizer, [{"role": "user", "content": "hello"}])


def test_truncate():
    ids = [10, 11, 12, 13, 14, 15]
    mask = [0, 0, 0, 1, 1, 1]
    assert truncate(ids, mask, 100) == (ids, mask)
    assert truncate(ids, mask, 5) == ([10, 11, 12, 13, 14], [0, 0, 0, 1, 1])
    assert truncate(ids, mask, 4) == ([10, 11, 12, 13], [0, 0, 0, 1])
    assert truncate(ids, mask, 3) is None
    with pytest.raises(ValueError):
        truncate(ids, mask, 0)


def test_truncate_real_example(chatml_tokenizer):
    ids, mask = encode_prompt_response(chatml_tokenizer, PROMPT, RESPONSE)
    prompt_length = len(encode_prompt(chatml_tokenizer, PROMPT))
    kept = truncate(ids, mask, prompt_length + 1)
    assert kept is not None and kept[0] == ids[: prompt_length + 1] and sum(kept[1]) == 1
    assert truncate(ids, mask, prompt_length) is None
