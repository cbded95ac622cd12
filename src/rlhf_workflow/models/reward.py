"""The Bradley–Terry reward model: an LM backbone with a scalar head read at the last real token.

`RewardModel` wraps a Hugging Face `*ForSequenceClassification` (``num_labels=1``) but pools by
itself: the reward is read at the last position whose attention mask is 1, with position ids
counted from the first real token. So left and right padding give the same reward, and a
tokenizer whose pad token is its eos token (SmolLM2, Llama-3) does not make every sequence read
the same trailing pad. No logits over the vocabulary are ever computed.

Saved as an ordinary sequence-classification model (safetensors). When the tokenizer pads with
its eos token, the saved tokenizer and config get a distinct pad token (one that the chat
template never writes), so that transformers' own pooling ("the rightmost token that is not
the pad token") reads the same position as ours and plain `AutoModelForSequenceClassification`
gives the same rewards.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from rlhf_workflow.models.forward import pad_batch, read_states
from rlhf_workflow.models.layout import LayoutOptions, layout
from rlhf_workflow.models.lora import unwrap
from rlhf_workflow.models.prompt_states import response_hidden_states, supports

log = logging.getLogger(__name__)


class RewardModel(nn.Module):
    """r(x, y): one scalar per sequence, read at its last real token."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model  # HF *ForSequenceClassification with num_labels=1 (maybe LoRA-wrapped)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                read_rows: torch.Tensor | None = None, read_cols: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards read at each row's last real token, or at ``(read_rows, read_cols)`` of a packed /
        prefix-shared layout (`models.forward.read_states`)."""
        return read_states(self.model, "score", input_ids, attention_mask, position_ids, read_rows, read_cols).squeeze(-1).float()

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Rewards of last-token hidden states ``[rows, hidden]`` (the body already run)."""
        return unwrap(self.model).score(hidden).squeeze(-1).float()


def distinct_pad_token(tokenizer: Any) -> str | None:
    """A special token to pad with that is not eos/bos and that the chat template never writes.

    Returns None when the current pad token is already distinct from eos, or when no candidate
    exists (then transformers' own pooling may read one token early; ours is unaffected).
    """
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return None
    template = tokenizer.chat_template or ""
    taken = {tokenizer.eos_token, tokenizer.bos_token}
    candidates = [tokenizer.unk_token] + [t for t in tokenizer.all_special_tokens if "pad" in t.lower()]
    candidates += [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    for token in candidates:
        if token and token not in taken and token not in template:
            return token
    return None


def prepare_reward_tokenizer(tokenizer: Any) -> Any:
    """Give the tokenizer a pad token distinct from eos when it can (see module docstring)."""
    token = distinct_pad_token(tokenizer)
    if token is not None:
        log.debug("reward model pads with %r instead of the eos token %r", token, tokenizer.eos_token)
        tokenizer.pad_token = token
    return tokenizer


def load_reward_model(config: Any, tokenizer: Any) -> RewardModel:
    """A reward model from any causal LM or saved reward model that `config.name_or_path` names.

    A causal LM gets a new scalar head (its vocabulary head is not loaded).
    """
    from transformers import AutoModelForSequenceClassification

    from rlhf_workflow.models.loading import load_model

    model = load_model(
        config, model_class=AutoModelForSequenceClassification, num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    return RewardModel(model)


def save_reward_model(reward_model: RewardModel, tokenizer: Any, path: Any,
                      extra_files: dict[str, str] | None = None) -> None:
    from rlhf_workflow.models.saving import save_model

    unwrap(reward_model.model).config.pad_token_id = tokenizer.pad_token_id
    save_model(reward_model.model, tokenizer, path, extra_files=extra_files)


@torch.inference_mode()
def score(
    reward_model: RewardModel,
    sequences: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    batch_size: int = 16,
    device: Any = None,
    progress: bool = False,
) -> list[float]:
    """Rewards of token sequences, in input order.

    Sequences are sorted by length and batched so that each batch pads as little as possible.
    """
    device = device or next(reward_model.parameters()).device
    was_training = reward_model.training
    reward_model.eval()
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    rewards: list[float] = [0.0] * len(sequences)
    for start in tqdm(range(0, len(order), batch_size), desc="score", disable=not progress):
        chunk = order[start : start + batch_size]
        ids, mask = pad_batch([sequences[i] for i in chunk], pad_token_id)
        values = reward_model(ids.to(device), mask.to(device)).tolist()
        for i, value in zip(chunk, values):
            rewards[i] = value
    reward_model.train(was_training)
    return rewards


class RewardScorer:
    """Scores (prompt, response) pairs with a reward model: the RM judge of eval and the online loop.

    Prompts are rendered with the tokenizer's chat template exactly as in training and cut from
    the left when a sequence is longer than ``max_length``; a response that alone does not fit
    gets NaN (counted in ``unscored``) rather than a score of a response it never saw whole.

    With ``prompt_states`` set (`models.prompt_states`), `score_groups` keeps each prompt's keys
    and values there and computes only the responses of a prompt it has seen (the run's evaluations).
    """

    def __init__(self, reward_model: RewardModel, tokenizer: Any, *, max_length: int = 1024,
                 chat_template: bool = True, batch_size: int = 16):
        self.model = reward_model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.chat_template = chat_template
        self.batch_size = batch_size
        self.unscored = 0
        self.prompt_states: Any = None

    def encode(self, prompt: Any, response: Any) -> list[int] | None:
        from rlhf_workflow.data.templating import encode_prompt_response, truncate_prompt_left

        ids, mask = encode_prompt_response(self.tokenizer, prompt, response, chat_template=self.chat_template)
        prompt_length = mask.index(1)  # the prompt is the unmasked prefix
        return truncate_prompt_left(ids[:prompt_length], ids[prompt_length:], self.max_length)

    def score(self, prompts: Sequence[Any], responses: Sequence[Any], *, progress: bool = False) -> list[float]:
        encoded = [self.encode(p, r) for p, r in zip(prompts, responses)]
        keep = [i for i, ids in enumerate(encoded) if ids is not None]
        values = score(self.model, [encoded[i] for i in keep], pad_token_id=self.tokenizer.pad_token_id,
                       batch_size=self.batch_size, progress=progress)
        out = [float("nan")] * len(encoded)
        for i, value in zip(keep, values):
            out[i] = value
        self.unscored += len(encoded) - len(keep)
        return out


    @torch.inference_mode()
    def score_groups(self, prompts: Sequence[Any], responses: Sequence[Sequence[Any]], *, batch_size: int | None = None,
                     progress: bool = False) -> list[list[float | None]]:
        """Rewards of several responses to each prompt, the prompt computed once per group (one row
        ``[prompt | response 1 | response 2 | ...]`` with a mask that keeps the responses apart, as in
        training). The same values as `score` (to float rounding) when nothing is cut; when the longest
        response needs it, the shared prompt loses its start for all of the group. None for a response
        that does not fit even so (a NaN is what the model itself returned).

        A forward pass reads at most ``batch_size`` responses (default: the scorer's ``batch_size``,
        the judge's "sequences per forward pass"); a prompt with more responses than that is split
        over several passes, its prompt repeated, which changes no reward."""
        from rlhf_workflow.data.templating import encode_prompt_response

        groups: list[tuple[list[int], list[list[int]], list[int]]] = []  # (prompt, fitting responses, their indices)
        for prompt, answers in zip(prompts, responses):
            prompt_ids: list[int] | None = None
            kept: list[list[int]] = []
            index: list[int] = []
            for k, answer in enumerate(answers):
                ids, mask = encode_prompt_response(self.tokenizer, prompt, answer, chat_template=self.chat_template)
                start = mask.index(1)
                if prompt_ids is None:
                    prompt_ids = ids[:start]
                if len(ids) - start < self.max_length:
                    kept.append(ids[start:])
                    index.append(k)
            prompt_ids = prompt_ids or []
            longest = max((len(r) for r in kept), default=0)
            cut = max(0, len(prompt_ids) + longest - self.max_length)  # the prompt loses its start, as in `encode`
            groups.append((prompt_ids[cut:], kept, index))
        out: list[list[float | None]] = [[None] * len(answers) for answers in responses]
        todo = [g for g, (_, kept, _) in enumerate(groups) if kept]
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        order = sorted(todo, key=lambda g: len(groups[g][0]) + sum(len(r) for r in groups[g][1]))
        pieces = [(g, range(len(groups[g][1]))) for g in order]  # positions in each group's fitting responses
        states = self.prompt_states if self.prompt_states is not None and supports(self.model.model) else None
        for chunk in tqdm(sequence_batches(pieces, batch_size or self.batch_size), desc="score", disable=not progress):
            if states is not None:
                hidden, _, lengths = response_hidden_states(
                    self.model.model, [groups[g][0] for g, kept in chunk for _ in kept],
                    [groups[g][1][i] for g, kept in chunk for i in kept], states, self.tokenizer.pad_token_id)
                values = iter(self.model.head(hidden[torch.arange(hidden.size(0)), lengths - 1]).tolist())
            else:
                batch = layout([(groups[g][0], [groups[g][1][i] for i in kept]) for g, kept in chunk],
                               self.tokenizer.pad_token_id, LayoutOptions(share_prefix=True))
                batch = {k: v.to(device) for k, v in batch.items()}
                values = iter(self.model(batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                                         batch["last_row"], batch["last_col"]).tolist())
            for g, kept in chunk:
                for i in kept:
                    out[g][groups[g][2][i]] = next(values)
        self.model.train(was_training)
        self.unscored += sum(len(answers) - len(groups[g][1]) for g, answers in enumerate(responses))
        return out


def sequence_batches(groups: Sequence[tuple[int, Sequence[int]]], batch_size: int) -> list[list[tuple[int, list[int]]]]:
    """``(group, response positions)`` items cut into batches of at most ``batch_size`` responses.

    Groups are taken in order and kept whole when they fit in the batch being filled; a group with
    more than ``batch_size`` responses is split into pieces of ``batch_size`` (its last piece may
    share a batch with the next group)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    batches: list[list[tuple[int, list[int]]]] = []
    current: list[tuple[int, list[int]]] = []
    filled = 0
    for group, indices in groups:
        for start in range(0, len(indices), batch_size):
            piece = list(indices[start : start + batch_size])
            if filled + len(piece) > batch_size:
                batches.append(current)
                current, filled = [], 0
            current.append((group, piece))
            filled += len(piece)
    if current:
        batches.append(current)
    return batches


def load_reward_scorer(path: str, *, dtype: str = "float32", max_length: int = 1024, chat_template: bool = True,
                       batch_size: int = 16) -> RewardScorer:
    """A `RewardScorer` for a reward model saved by `train-rm` (or any 1-label sequence classifier)."""
    from rlhf_workflow.config import ModelConfig
    from rlhf_workflow.models.loading import load_tokenizer

    tokenizer = prepare_reward_tokenizer(load_tokenizer(path))
    model = load_reward_model(ModelConfig(name_or_path=path, dtype=dtype), tokenizer)
    return RewardScorer(model, tokenizer, max_length=max_length, chat_template=chat_template, batch_size=batch_size)
