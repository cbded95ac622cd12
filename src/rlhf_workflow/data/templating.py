"""Token ids and loss masks from the tokenizer's own chat template.

Chat templates differ in ways that break naive masking: ChatML (SmolLM2) inserts a default
system prompt when none is given, Llama-3 writes ``<|begin_of_text|>`` into the text and ends
turns with ``<|eot_id|>`` rather than the eos token. So nothing here guesses token ids of markers.
Instead the conversation is rendered as text, prefixes of it are rendered too, and the text is
cut at the places where the prefixes end:

    render(prompt, add_generation_prompt=True)   = "<sys...><user turn><|im_start|>assistant\\n"
    render(prompt + [answer])                    = "<sys...><user turn><|im_start|>assistant\\nHi<|im_end|>\\n"
    response text                                = the difference = "Hi<|im_end|>\\n"

Each piece is tokenized on its own (``add_special_tokens=False``: the template already writes
BOS where it wants one) and the ids are concatenated, so token boundaries fall on the cuts and
the prompt ids are exactly `encode_prompt`'s — the ids the policy generates after.

Whitespace after the final end-of-turn marker: ChatML writes ``"\\n"`` after ``<|im_end|>``.
Generation stops at ``<|im_end|>`` (the eos), so that newline is never sampled. When the text
after a turn's last special token is only whitespace, it is cut from the learned part: the
response ids end with the end-of-turn token (which is learned), and a sequence is then exactly
prompt ids + what the policy would generate. Between turns of a multi-turn conversation the
newline is kept (unlearned, at the start of the next segment); after the last assistant turn it
is dropped, together with any later non-assistant messages, which carry no loss.

Requires templates that are *prefix-consistent* (rendering more messages only appends text);
templates that rewrite earlier turns are reported with a clear `UserError`.
"""

from __future__ import annotations

from typing import Any

from rlhf_workflow.data.schemas import Message, to_messages
from rlhf_workflow.errors import UserError, config_key

NOT_PREFIX_CONSISTENT = (
    "the chat template is not prefix-consistent: the rendered conversation does not start with the "
    "rendered {what}, so the assistant tokens cannot be located"
)

ConversationValue = str | list[Message] | list[dict[str, str]]


def require_chat_template(tokenizer: Any, key: str = "data.apply_chat_template") -> None:
    """A `UserError` naming the tokenizer when it has no chat template; ``key`` is the option that
    turns templating off in the calling stage (``apply_chat_template`` for generate, annotate, run)."""
    if getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", "") or "the model"
        raise UserError(f"the tokenizer of {name} has no chat template; set {config_key(key)}=false to use plain text, "
                        "or use a chat model")


def render(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    """The chat template's text for ``messages`` (no tokenization)."""
    import jinja2

    require_chat_template(tokenizer)
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except jinja2.TemplateError as exc:
        raise UserError(f"the chat template rejected the conversation: {exc}") from None
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    """Ids of ``text`` with no special tokens added (special-token text in it still maps to its id)."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _special_token_texts(tokenizer: Any) -> list[str]:
    """The text of every special token (eos, bos, pad and added special tokens such as <|eot_id|>)."""
    texts = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False):
            texts.add(added.content)
    return [text for text in texts if text]


def _special_token_ids(tokenizer: Any) -> set[int]:
    """The id of every special token: those the tokenizer names (eos, bos, pad, additional ones) and
    those marked special only in tokenizer.json's added tokens (Llama-3's ``<|eot_id|>`` when eos is
    ``<|end_of_text|>``), which ``all_special_ids`` leaves out."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return ids


def _generation_eos_ids(model_or_config: Any) -> set[int]:
    """The ``eos_token_id`` (an int or a list) of a generation config, or of a model's
    ``generation_config``; empty for None or when it names none."""
    if model_or_config is None:
        return set()
    config = getattr(model_or_config, "generation_config", None)
    if config is None:
        config = model_or_config
    value = getattr(config, "eos_token_id", None)
    values = value if isinstance(value, (list, tuple, set)) else [value]
    return {int(v) for v in values if v is not None}


def end_of_turn_ids(tokenizer: Any, model_config: Any = None, *, chat_template: bool = True) -> set[int]:
    """The token ids that end an assistant's answer: the one definition that generation (hf, vLLM)
    stops at and that evaluation strips from a response cut at max length.

    They are the tokenizer's eos; the ``eos_token_id`` of ``model_config`` (a model, or its
    ``GenerationConfig``; an int or a list) when one is given; and, with the chat template, the
    token the template closes an assistant turn with (``<|im_end|>``, ``<|eot_id|>``) when it is a
    special token, including one marked special only among tokenizer.json's added tokens.
    """
    ids = _generation_eos_ids(model_config)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if chat_template and getattr(tokenizer, "chat_template", None):
        full, mask = encode_prompt_response(tokenizer, "hi", "ok", chat_template=True)
        if mask and mask[-1] == 1 and full[-1] in _special_token_ids(tokenizer):
            ids.add(int(full[-1]))
    return ids


def _end_of_turn(text: str, special_tokens: list[str]) -> int:
    """Length of ``text`` without the whitespace that follows its last special token.

    ``"Hi<|im_end|>\\n"`` -> ``len("Hi<|im_end|>")``; text that does not end with a special
    token followed by whitespace is kept whole.
    """
    stripped = text.rstrip()
    if len(stripped) < len(text) and any(stripped.endswith(token) for token in special_tokens):
        return len(stripped)
    return len(text)


def encode_prompt(tokenizer: Any, prompt: ConversationValue, *, chat_template: bool = True) -> list[int]:
    """Ids of a prompt, ready for the model to generate the assistant's answer.

    With the chat template: the messages (a string is one user message) rendered with
    ``add_generation_prompt=True`` and tokenized without adding special tokens. Without it:
    the plain string tokenized with the tokenizer's special tokens (e.g. BOS).
    """
    if not chat_template:
        if not isinstance(prompt, str):
            raise UserError(
                "a prompt given as a list of messages needs the chat template; set "
                f"{config_key('data.apply_chat_template')}=true"
            )
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    text = render(tokenizer, to_messages(prompt, "user"), add_generation_prompt=True)
    return _tokenize(tokenizer, text)


def encode_prompt_response(
    tokenizer: Any, prompt: ConversationValue, response: ConversationValue, *, chat_template: bool = True
) -> tuple[list[int], list[int]]:
    """``(input_ids, response_mask)`` of a prompt followed by one response.

    The first part is exactly ``encode_prompt(tokenizer, prompt)`` (mask 0). The rest (mask 1)
    is the text the template adds for the response: its content and the end-of-turn marker
    (``<|im_end|>``, ``<|eot_id|>``), without whitespace after that marker (see the module
    docstring). A string response is one assistant message. Without the chat template: the
    response tokens followed by the eos token.
    """
    prompt_ids = encode_prompt(tokenizer, prompt, chat_template=chat_template)
    if not chat_template:
        if not isinstance(response, str):
            raise UserError(
                "a response given as a list of messages needs the chat template; set "
                f"{config_key('data.apply_chat_template')}=true"
            )
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has no eos token to end a plain-text response with")
        response_ids = _tokenize(tokenizer, response) + [tokenizer.eos_token_id]
        return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)

    prompt_messages = to_messages(prompt, "user")
    prompt_text = render(tokenizer, prompt_messages, add_generation_prompt=True)
    full_text = render(tokenizer, prompt_messages + to_messages(response, "assistant"), add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise UserError(NOT_PREFIX_CONSISTENT.format(what="prompt"))
    response_text = full_text[len(prompt_text) :]
    response_text = response_text[: _end_of_turn(response_text, _special_token_texts(tokenizer))]
    response_ids = _tokenize(tokenizer, response_text)
    return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)


def encode_conversation(
    tokenizer: Any, messages: list[Message] | list[dict[str, str]], *, chat_template: bool = True
) -> tuple[list[int], list[int]]:
    """``(input_ids, loss_mask)`` of a multi-turn conversation for SFT.

    The loss covers every assistant turn (its content and end-of-turn marker) and nothing else.
    Text after the last assistant turn is dropped. For a single user + assistant exchange this
    gives the same ids and mask as `encode_prompt_response`. Without the chat template only
    that single exchange is possible (encoded as plain text, see `encode_prompt_response`).
    """
    plain = to_messages(messages, "user")
    if not any(message["role"] == "assistant" for message in plain):
        raise UserError("the conversation has no assistant message to learn from")
    if plain[0]["role"] == "assistant":
        raise UserError("the conversation starts with an assistant message; it needs a prompt before it")
    if not chat_template:
        if [message["role"] for message in plain] != ["user", "assistant"]:
            raise UserError(
                "a conversation other than one user and one assistant message needs the chat template; "
                f"set {config_key('data.apply_chat_template')}=true"
            )
        return encode_prompt_response(tokenizer, plain[0]["content"], plain[1]["content"], chat_template=False)
    full_text = render(tokenizer, plain, add_generation_prompt=False)
    special_tokens = _special_token_texts(tokenizer)

    # Character spans [start, end) of the learned text of each assistant turn.
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(plain):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, plain[:index], add_generation_prompt=True)
        after = render(tokenizer, plain[: index + 1], add_generation_prompt=False)
        if not full_text.startswith(before) or not full_text.startswith(after) or len(after) < len(before):
            raise UserError(NOT_PREFIX_CONSISTENT.format(what=f"messages before turn {index + 1}"))
        start = len(before)
        end = start + _end_of_turn(after[start:], special_tokens)
        if spans and start < spans[-1][1]:
            raise UserError(NOT_PREFIX_CONSISTENT.format(what=f"messages before turn {index + 1}"))
        spans.append((start, end))

    input_ids: list[int] = []
    loss_mask: list[int] = []
    position = 0
    for start, end in spans:
        context_ids = _tokenize(tokenizer, full_text[position:start])
        turn_ids = _tokenize(tokenizer, full_text[start:end])
        input_ids += context_ids + turn_ids
        loss_mask += [0] * len(context_ids) + [1] * len(turn_ids)
        position = end
    return input_ids, loss_mask


def truncate(ids: list[int], mask: list[int], max_length: int) -> tuple[list[int], list[int]] | None:
    """Keep the first ``max_length`` tokens (the prompt comes first; the end is cut).

    Returns None when no masked (learned) token is left, so the caller can drop the example
    and count it.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if len(ids) != len(mask):
        raise ValueError(f"ids and mask differ in length: {len(ids)} != {len(mask)}")
    ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask):
        return None
    return ids, mask


def truncate_prompt_left(prompt_ids: list[int], response_ids: list[int], max_length: int) -> list[int] | None:
    """``prompt_ids + response_ids`` within ``max_length`` by cutting the prompt from the left.

    The response is never cut: a reward or preference judged on a cut-off response is judged on
    something the policy did not write. Returns None when the response alone (plus one prompt
    token) does not fit, so the caller drops the example and counts it.
    """
    overflow = len(prompt_ids) + len(response_ids) - max_length
    if overflow <= 0:
        return prompt_ids + response_ids
    if overflow >= len(prompt_ids):
        return None
    return prompt_ids[overflow:] + response_ids
