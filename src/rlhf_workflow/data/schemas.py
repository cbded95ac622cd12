"""Row schemas of the files passed between stages (docs/formats.md).

Every row is a pydantic model that

* is strict about the fields it knows (``5`` is not accepted where a string is expected,
  ``"1.0"`` is not accepted where a number is expected, NaN and infinity are rejected),
* keeps every other field untouched (``extra="allow"``), so metadata such as ``answer``
  travels from the prompts file to the pairs file.

A *conversation value* (a prompt, response, completion, chosen or rejected) is either a plain
string or a non-empty list of messages ``{"role", "content"}`` — the standard and the
conversational formats of TRL. A string prompt means one user message; a string response means
one assistant message (`to_messages`).

`describe_validation_error` turns a pydantic error into one sentence such as
``field 'prompt.0.role': expected one of 'system', 'user', 'assistant' or 'tool', got str 'bot'``;
the reader (`rlhf_workflow.data.io`) puts the file and line in front of it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Annotated, Any, Literal, Union

from annotated_types import MinLen
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    PrivateAttr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

Role = Literal["system", "user", "assistant", "tool"]


class Message(BaseModel):
    """One chat message. Only ``role`` and ``content`` are allowed."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Role
    content: str


# Union tags are written in angle brackets so that `describe_validation_error` can drop them
# from error locations: no real field is named like that.
_TEXT_TAG = "<text>"
_MESSAGES_TAG = "<messages>"


def _conversation_kind(value: Any) -> str | None:
    """Pick the branch of `Conversation` from the Python type of ``value``."""
    if isinstance(value, str):
        return _TEXT_TAG
    if isinstance(value, list):
        return _MESSAGES_TAG
    return None


Conversation = Annotated[
    Union[
        Annotated[str, Tag(_TEXT_TAG)],
        Annotated[list[Message], MinLen(1), Tag(_MESSAGES_TAG)],
    ],
    Discriminator(
        _conversation_kind,
        custom_error_type="conversation_type",
        custom_error_message="expected a string or a list of messages",
    ),
]
"""A prompt, response, completion, chosen or rejected value: a string or a list of messages."""


def to_messages(value: str | list[Message] | list[dict[str, str]], default_role: str) -> list[dict[str, str]]:
    """Return ``value`` as a list of plain ``{"role", "content"}`` dicts.

    A string becomes a single message with ``default_role`` ("user" for prompts,
    "assistant" for responses); a list of messages is copied.
    """
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    messages: list[dict[str, str]] = []
    for message in value:
        if isinstance(message, Message):
            messages.append({"role": message.role, "content": message.content})
        else:
            messages.append({"role": message["role"], "content": message["content"]})
    return messages


def prompt_messages(prompt: str | list[Message] | list[dict[str, str]]) -> list[dict[str, str]]:
    """A prompt as a list of message dicts (a string prompt is one user message)."""
    return to_messages(prompt, "user")


def response_text(value: str | list[Message] | list[dict[str, str]]) -> str:
    """A response as plain text (the contents of a list of messages, joined by blank lines)."""
    return "\n\n".join(m["content"] for m in to_messages(value, "assistant"))


def canonical_json(value: Any) -> str:
    """JSON text with sorted keys and no spaces: equal values give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _plain(value: str | list[Message]) -> str | list[dict[str, str]]:
    """A conversation value as plain JSON data (a string or a list of dicts)."""
    if isinstance(value, str):
        return value
    return to_messages(value, "user")


def derive_id(value: Any) -> str:
    """A stable id for rows given without one: the first 16 hex digits of sha1(canonical JSON)."""
    return hashlib.sha1(canonical_json(value).encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------- rows


class Row(BaseModel):
    """Base of every row: validated fields are strict, unknown fields are kept as they are."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    _id_derived: bool = PrivateAttr(default=False)

    @property
    def id_was_derived(self) -> bool:
        """True when the input had no id and the row's id was computed from its content."""
        return self._id_derived


class _HasPrompt:
    """For the rows with a ``prompt`` field: the prompt as messages."""

    def prompt_messages(self) -> list[dict[str, str]]:
        """The prompt as a list of message dicts (a string prompt is one user message)."""
        return prompt_messages(self.prompt)  # type: ignore[attr-defined]


def _drop_null_id(data: Any) -> Any:
    """Treat ``"id": null`` (as Parquet/Arrow files write for missing values) as no id, and
    accept integer ids (common in public data sets) as their decimal text."""
    if isinstance(data, dict) and "id" in data:
        if data["id"] is None:
            data = {key: value for key, value in data.items() if key != "id"}
        elif isinstance(data["id"], int) and not isinstance(data["id"], bool):
            data = {**data, "id": str(data["id"])}
    return data


class PromptRow(_HasPrompt, Row):
    """A prompt of the prompts file: ``{"id", "prompt", ...metadata}``.

    Without an id, IFEval's and IFBench's ``key`` (an integer) is the id; without either, the id is
    derived from the prompt with `derive_id`, and the reader adds ``-2``, ``-3``, ... when the same
    derived id repeats inside one file. ``key`` stays in the row, as all metadata does.
    """

    id: str = ""
    prompt: Conversation

    @model_validator(mode="before")
    @classmethod
    def _null_id(cls, data: Any) -> Any:
        data = _drop_null_id(data)
        if isinstance(data, dict) and "id" not in data and isinstance(data.get("key"), (int, str)) \
                and not isinstance(data.get("key"), bool) and str(data["key"]).strip():
            data = {**data, "id": str(data["key"])}
        return data

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str | list[Message]) -> str | list[Message]:
        if all(not m["content"].strip() for m in to_messages(value, "user")):
            raise ValueError("the prompt is empty")
        return value

    @model_validator(mode="after")
    def _fill_id(self) -> PromptRow:
        if not self.id:
            self.id = derive_id(_plain(self.prompt))
            self._id_derived = True
        return self


class SFTRow(Row):
    """A supervised fine-tuning example, in one of two forms.

    * ``{"messages": [...]}`` — a whole conversation with at least one assistant message;
    * ``{"prompt": ..., "completion": ...}`` — TRL's prompt-completion format, each a string or a
      list of messages (a string prompt is a user message, a string completion an assistant one).
    """

    messages: Annotated[list[Message], MinLen(1)] | None = None
    prompt: Conversation | None = None
    completion: Conversation | None = None

    @field_validator("messages")
    @classmethod
    def _check_messages(cls, messages: list[Message] | None) -> list[Message] | None:
        if messages is None:
            return None
        if messages[0].role == "assistant":
            raise ValueError("the first message must not be an assistant message")
        if not any(message.role == "assistant" for message in messages):
            raise ValueError("expected at least one assistant message to learn from")
        return messages

    @model_validator(mode="after")
    def _check_form(self) -> SFTRow:
        if self.messages is not None:
            if self.prompt is not None or self.completion is not None:
                raise ValueError("give either 'messages' or 'prompt' + 'completion', not both")
            return self
        if self.prompt is None and self.completion is None:
            raise ValueError("missing field 'messages' (or the fields 'prompt' and 'completion')")
        if self.prompt is None:
            raise ValueError("missing field 'prompt' (a 'completion' needs a 'prompt')")
        if self.completion is None:
            raise ValueError("missing field 'completion' (a 'prompt' needs a 'completion')")
        if not any(message["role"] == "assistant" for message in to_messages(self.completion, "assistant")):
            raise ValueError("field 'completion': expected at least one assistant message to learn from")
        return self

    def to_messages(self) -> list[dict[str, str]]:
        """The whole conversation as a list of ``{"role", "content"}`` dicts."""
        if self.messages is not None:
            return to_messages(self.messages, "user")
        assert self.prompt is not None and self.completion is not None  # guaranteed by _check_form
        return to_messages(self.prompt, "user") + to_messages(self.completion, "assistant")


# what `generate` and `annotate` add to a prompt row (the rest is the prompt row, passed along)
GENERATED_FIELDS = ("responses", "response_tokens", "finish_reasons", "response_logps", "response_token_ids", "rewards",
                    "raw_rewards", "reward_errors")


FinishReason = Literal["stop", "length"]  # the response ended (end of turn or a stop string), or ran out of tokens
PER_RESPONSE = ("rewards", "response_tokens", "finish_reasons", "response_logps", "response_token_ids", "raw_rewards")


class GenerationRow(_HasPrompt, Row):
    """n sampled responses for one prompt (`generate`), with one reward each after annotation
    (`annotate`). Every list but ``responses`` is optional and, when given, has one value per response."""

    id: str
    prompt: Conversation
    responses: Annotated[list[str], MinLen(1)]
    response_tokens: list[int] | None = None  # each response's length in tokens
    finish_reasons: list[FinishReason] | None = None
    response_logps: list[float] | None = None  # log π(response | prompt) under the sampling model (hf backend)
    response_token_ids: list[list[int]] | None = None  # the sampled token ids (generate's token_ids=true)
    rewards: list[float | None] | None = None  # None: the judge could not score that response
    raw_rewards: list[float | None] | None = None  # the judge's scores before the length penalty
    reward_errors: dict[str, str] | None = None  # response index -> why the judge gave it no reward

    @field_validator(*PER_RESPONSE)
    @classmethod
    def _one_per_response(cls, values: list | None, info: ValidationInfo) -> list | None:
        responses = info.data.get("responses")
        if values is not None and responses is not None and len(values) != len(responses):
            raise ValueError(f"expected {len(responses)} {info.field_name} (one per response), got {len(values)}")
        return values

    @field_validator("reward_errors")
    @classmethod
    def _response_indices(cls, errors: dict[str, str] | None, info: ValidationInfo) -> dict[str, str] | None:
        count = len(info.data.get("responses") or [])
        wrong = [key for key in errors or {} if not (key.isdigit() and int(key) < count)]
        if wrong:
            raise ValueError(f"keys are response indices 0..{count - 1}, got {wrong[0]!r}")
        return errors


class ScoredRow(GenerationRow):
    """A generation row after annotation: ``rewards`` is required."""

    rewards: list[float | None]


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def hh_messages(transcript: str) -> list[dict[str, str]] | None:
    """An HH-RLHF transcript (``"\n\nHuman: ...\n\nAssistant: ..."``) as messages; None for other text."""
    parts = _HH_TURN.split(transcript)
    if len(parts) < 3 or parts[0].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[k]], "content": parts[k + 1].strip()} for k in range(1, len(parts) - 1, 2)]


def _as_message_dicts(value: Any) -> list[dict[str, Any]] | None:
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return value
    return None


def _same_message(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.get("role") == b.get("role") and a.get("content") == b.get("content")


def split_preference_columns(data: Any) -> Any:
    """The common published preference layouts, as ``prompt`` / ``chosen`` / ``rejected``:

    * HH-RLHF: ``chosen`` and ``rejected`` are whole transcripts (``\n\nHuman: ... \n\nAssistant:
      ...``) and there is no prompt: parsed into messages, then as below;
    * TRL's implicit prompt: no ``prompt``, ``chosen`` and ``rejected`` are conversations that
      share their opening: the prompt is the shared messages up to the last one before the
      responses' first assistant turn, the responses what follows;
    * UltraFeedback binarized: ``prompt`` is given and ``chosen`` / ``rejected`` repeat it as their
      first messages: the repeated messages are dropped from the responses.

    Anything else is returned unchanged."""
    if not isinstance(data, dict):
        return data
    chosen, rejected = data.get("chosen"), data.get("rejected")
    if data.get("prompt") is None and isinstance(chosen, str) and isinstance(rejected, str):
        parsed_chosen, parsed_rejected = hh_messages(chosen), hh_messages(rejected)
        if parsed_chosen is None or parsed_rejected is None:
            return data
        chosen, rejected = parsed_chosen, parsed_rejected
    chosen, rejected = _as_message_dicts(chosen), _as_message_dicts(rejected)
    if chosen is None or rejected is None:
        return data
    prompt = data.get("prompt")
    if prompt is None:
        shared = 0
        while shared < min(len(chosen), len(rejected)) and _same_message(chosen[shared], rejected[shared]):
            shared += 1
        # the responses start at the last assistant turn both still have, at or before the divergence
        starts = [k for k in range(1, shared + 1) if k < len(chosen) and k < len(rejected)
                  and chosen[k].get("role") == rejected[k].get("role") == "assistant"]
        if not starts:
            return data
        cut = starts[-1]
        return {**data, "prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}
    opening = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _as_message_dicts(prompt)
    if opening is None:
        return data
    n = len(opening)
    if all(len(side) > n and all(_same_message(a, b) for a, b in zip(side[:n], opening)) for side in (chosen, rejected)):
        return {**data, "chosen": chosen[n:], "rejected": rejected[n:]}
    return data


class PairRow(_HasPrompt, Row):
    """A preference pair: ``chosen`` is preferred to ``rejected`` for ``prompt``.

    The rewards are the annotator's scores; ``ref_*_logp`` are the summed log-probabilities of
    each response under the reference policy, filled in once before DPO. A missing id is derived
    from prompt, chosen and rejected. The layouts of HH-RLHF, TRL's implicit prompt and
    UltraFeedback binarized are read as they are published (`split_preference_columns`).
    """

    id: str = ""
    prompt: Conversation
    chosen: Conversation
    rejected: Conversation
    chosen_reward: float | None = None
    rejected_reward: float | None = None
    ref_chosen_logp: float | None = None
    ref_rejected_logp: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_id(cls, data: Any) -> Any:
        return split_preference_columns(_drop_null_id(data))

    @field_validator("chosen", "rejected")
    @classmethod
    def _check_not_empty(cls, value: str | list[Message]) -> str | list[Message]:
        if all(not m["content"].strip() for m in to_messages(value, "assistant")):
            raise ValueError("the response is empty")
        return value

    @field_validator("rejected")
    @classmethod
    def _check_different(cls, rejected: str | list[Message], info: ValidationInfo) -> str | list[Message]:
        chosen = info.data.get("chosen")
        if chosen is not None and to_messages(chosen, "assistant") == to_messages(rejected, "assistant"):
            raise ValueError("chosen and rejected are identical")
        return rejected

    @field_validator("ref_chosen_logp", "ref_rejected_logp")
    @classmethod
    def _check_logp(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and value <= 0):
            raise ValueError(f"a log-probability must be a finite number <= 0, got {value}")
        return value

    @model_validator(mode="after")
    def _fill_id(self) -> PairRow:
        if not self.id:
            self.id = derive_id([_plain(self.prompt), _plain(self.chosen), _plain(self.rejected)])
            self._id_derived = True
        return self


# --------------------------------------------------------------------------- errors


def describe_value(value: Any) -> str:
    """A short description of a JSON value for error messages, e.g. ``int 5`` or ``null``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"bool {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"int {value}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"float {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"str {shown!r}"
    if isinstance(value, list):
        return "an empty list" if not value else f"a list of {len(value)} items"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _location(loc: tuple[Any, ...]) -> str:
    """``("prompt", "<messages>", 0, "role")`` -> ``"prompt.0.role"`` (union tags dropped)."""
    parts = [str(part) for part in loc if not (isinstance(part, str) and part.startswith("<") and part.endswith(">"))]
    return ".".join(parts)


_EXPECTED = {
    "string_type": "a string",
    "float_type": "a number",
    "int_type": "an integer",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def describe_validation_error(exc: ValidationError) -> str:
    """One sentence about the first error of ``exc``, naming the field by its dotted path."""
    err = exc.errors(include_url=False)[0]
    where = _location(tuple(err["loc"]))
    field = f"field '{where}': " if where else ""
    kind = err["type"]
    value = err.get("input")
    if kind == "missing":
        return f"missing field '{where}'"
    if kind == "value_error":
        return field + str(err["msg"]).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        return f"unexpected field '{where}' (a message has only 'role' and 'content')"
    if kind == "conversation_type":
        return f"{field}expected a string or a list of messages, got {describe_value(value)}"
    if kind == "literal_error":
        return f"{field}expected one of {err['ctx']['expected']}, got {describe_value(value)}"
    if kind in ("too_short", "too_long"):
        bound = err["ctx"]["min_length" if kind == "too_short" else "max_length"]
        return (f"{field}expected {'at least' if kind == 'too_short' else 'at most'} {bound} "
                f"item{'s' if bound != 1 else ''}, got {describe_value(value)}")
    if kind == "finite_number":
        return f"{field}expected a finite number, got {describe_value(value)}"
    if kind in ("model_type", "model_attributes_type") and err.get("ctx", {}).get("class_name") == "Message":
        return f"{field}expected a message object with 'role' and 'content', got {describe_value(value)}"
    if kind in _EXPECTED:
        return f"{field}expected {_EXPECTED[kind]}, got {describe_value(value)}"
    message = str(err["msg"])
    message = message[:1].lower() + message[1:]
    return f"{field}{message}, got {describe_value(value)}"
