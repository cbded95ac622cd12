"""The pairwise preference model: an LM that reads two responses and answers "A" or "B".

    [CONTEXT] {context} [RESPONSE A] {response_a} [RESPONSE B] {response_b}

is written as one user message (through the tokenizer's chat template, when it has one) and the
model's next token is read. P(A ≻ B) is the softmax over the logits of the two label tokens only.
At inference both orders are scored and averaged,

    P(a ≻ b) = ½ [ P_A(a, b) + P_B(b, a) ]

so the model's position bias cancels. The template and label tokens are part of the saved model
(``preference_model.json``) so that scoring always formats prompts the way training did.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from rlhf_workflow.errors import UserError
from rlhf_workflow.models.ranking import Ranking, both_orders, knockout, round_robin
from rlhf_workflow.models.forward import pad_batch, read_states

FORMAT_FILE = "preference_model.json"
DEFAULT_TEMPLATE = "[CONTEXT] {context} [RESPONSE A] {response_a} [RESPONSE B] {response_b}"


@dataclass(frozen=True)
class PreferenceFormat:
    """How a comparison is written for the preference model, and which tokens answer it."""

    template: str = DEFAULT_TEMPLATE
    label_a: str = "A"
    label_b: str = "B"
    chat_template: bool = True

    def render_context(self, messages: list[dict[str, str]]) -> str:
        """The conversation so far as text: a single user turn is its content, longer ones are role-tagged."""
        if len(messages) == 1 and messages[0]["role"] == "user":
            return messages[0]["content"]
        return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)

    def render(self, messages: list[dict[str, str]], response_a: str, response_b: str) -> str:
        return self.template.format(context=self.render_context(messages), response_a=response_a, response_b=response_b)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def load(cls, directory: str | Path) -> "PreferenceFormat | None":
        from rlhf_workflow.data.io import decode_json

        path = Path(directory, FORMAT_FILE)
        if not path.is_file():
            return None
        data = decode_json(path.read_text(encoding="utf-8", errors="replace"), str(path), whole_file=True)
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - known or not all(isinstance(v, (str, bool)) for v in data.values()):
            unknown = sorted(set(data) - known) if isinstance(data, dict) else []
            raise UserError(f"{path}: not a preference model's format ({', '.join(sorted(known))})"
                            + (f"; unknown keys {unknown}" if unknown else ""))
        fmt = cls(**data)
        if any(name not in fmt.template for name in ("{context}", "{response_a}", "{response_b}")):
            raise UserError(f"{path}: the template must hold {{context}}, {{response_a}} and {{response_b}}")
        return fmt


def label_token_ids(tokenizer: Any, fmt: PreferenceFormat) -> tuple[int, int]:
    """The single token ids of the two labels; a label that is not one token is an error."""
    ids = []
    for label in (fmt.label_a, fmt.label_b):
        tokens = tokenizer.encode(label, add_special_tokens=False)
        if len(tokens) != 1:
            raise UserError(f"preference label {label!r} is {len(tokens)} tokens for this tokenizer; choose a label that is one token")
        ids.append(tokens[0])
    if ids[0] == ids[1]:
        raise UserError(f"preference labels {fmt.label_a!r} and {fmt.label_b!r} are the same token")
    return ids[0], ids[1]


def encode_comparison(tokenizer: Any, fmt: PreferenceFormat, messages: list[dict[str, str]], response_a: str, response_b: str) -> list[int]:
    """Token ids of the comparison prompt, ending where the label token is to be predicted."""
    from rlhf_workflow.data.templating import encode_prompt

    text = fmt.render(messages, response_a, response_b)
    if fmt.chat_template:
        return encode_prompt(tokenizer, [{"role": "user", "content": text}], chat_template=True)
    return encode_prompt(tokenizer, text + "\n", chat_template=False)


class PreferenceModel(nn.Module):
    """Next-token logits after a comparison prompt, computed only at its last real token."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model  # HF causal LM (maybe LoRA-wrapped)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return read_states(self.model, "lm_head", input_ids, attention_mask).float()  # [batch, vocab]


@torch.inference_mode()
def prob_first_label(
    preference_model: PreferenceModel,
    prompts: Sequence[Sequence[int]],
    label_ids: tuple[int, int],
    *,
    pad_token_id: int,
    batch_size: int = 8,
    device: Any = None,
) -> list[float]:
    """P(label A) from the softmax over the two label logits, for each encoded comparison prompt."""
    device = device or next(preference_model.parameters()).device
    was_training = preference_model.training
    preference_model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [0.0] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = pad_batch([prompts[i] for i in chunk], pad_token_id)
        logits = preference_model(ids.to(device), mask.to(device))[:, list(label_ids)]
        for i, p in zip(chunk, torch.softmax(logits, dim=-1)[:, 0].tolist()):
            out[i] = p
    preference_model.train(was_training)
    return out


class PreferenceJudge:
    """Compares responses with a trained preference model; the online loop's PM judge."""

    def __init__(self, preference_model: PreferenceModel, tokenizer: Any, fmt: PreferenceFormat, *, batch_size: int = 8, max_length: int | None = None):
        self.model = preference_model
        self.tokenizer = tokenizer
        self.format = fmt
        self.label_ids = label_token_ids(tokenizer, fmt)
        self.batch_size = batch_size
        self.max_length = max_length
        self.calls = 0  # ordered comparisons scored (each is one forward pass)

    def prefer_many(self, items: Sequence[tuple[list[dict[str, str]], str, str]]) -> list[float]:
        """P(first ≻ second) as the model reads each (conversation, first, second) in that order,
        i.e. P("A") for the prompt with ``first`` as response A. One batched pass over all items."""
        prompts = [encode_comparison(self.tokenizer, self.format, messages, a, b) for messages, a, b in items]
        if self.max_length is not None:
            prompts = [p[-self.max_length :] for p in prompts]
        self.calls += len(prompts)
        return prob_first_label(
            self.model, prompts, self.label_ids, pad_token_id=self.tokenizer.pad_token_id, batch_size=self.batch_size
        )

    def prefer(self, messages: list[dict[str, str]], ordered_pairs: Sequence[tuple[str, str]]) -> list[float]:
        """`prefer_many` for several ordered pairs of responses to one conversation."""
        return self.prefer_many([(messages, a, b) for a, b in ordered_pairs])

    def compare_many(self, items: Sequence[tuple[list[dict[str, str]], str, str]]) -> list[float]:
        """P(a ≻ b) for each (conversation, a, b), both orders averaged (`models.ranking.both_orders`),
        all in one batched pass."""
        probs = self.prefer_many(list(items) + [(m, b, a) for m, a, b in items])
        return both_orders(probs[: len(items)], probs[len(items) :])

    def rank(self, messages: list[dict[str, str]], responses: Sequence[str], method: str = "knockout") -> Ranking:
        """Rank the n responses to one prompt: "knockout", "copeland" or "borda" (round-robin)."""
        def prefer(ordered: Sequence[tuple[int, int]]) -> list[float]:
            return self.prefer(messages, [(responses[i], responses[j]) for i, j in ordered])

        if method == "knockout":
            return knockout(len(responses), prefer)
        return round_robin(len(responses), prefer, method=method)


def detect_kind(path: str, *, hint: str = "set kind=rm or kind=pm to force one") -> str:
    """'pm' for a directory saved by train-pm, 'rm' for a sequence classifier; else a `UserError`
    (ending with ``hint``)."""
    from rlhf_workflow.models.loading import saved_architectures

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise UserError(f"{path} is not a saved model directory (no config.json)")
    architectures = saved_architectures(str(directory)) or []  # a config.json that is not JSON: an error naming it
    if (directory / FORMAT_FILE).is_file():
        return "pm"
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "rm"
    raise UserError(
        f"{path} is neither a reward model (a *ForSequenceClassification) nor a preference model "
        f"({FORMAT_FILE} from train-pm); {hint}"
    )


def load_preference_model(config: Any) -> PreferenceModel:
    from rlhf_workflow.models.loading import load_model

    return PreferenceModel(load_model(config))


def load_preference_judge(path: str, *, dtype: str = "float32", batch_size: int = 8, max_length: int | None = None) -> PreferenceJudge:
    """A `PreferenceJudge` for a model saved by `train-pm` (its format file says how to prompt it)."""
    from rlhf_workflow.config import ModelConfig
    from rlhf_workflow.models.loading import load_tokenizer

    fmt = PreferenceFormat.load(path)
    if fmt is None:
        raise UserError(f"{path} has no {FORMAT_FILE}: it was not saved by train-pm")
    tokenizer = load_tokenizer(path)
    model = load_preference_model(ModelConfig(name_or_path=path, dtype=dtype))
    return PreferenceJudge(model, tokenizer, fmt, batch_size=batch_size, max_length=max_length)
