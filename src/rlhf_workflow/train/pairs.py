"""Preference pairs as token ids: a prompt and two responses, shared by the reward and DPO objectives."""

from __future__ import annotations

import logging
from typing import Any, Callable

from rlhf_workflow.data.schemas import PairRow
from rlhf_workflow.data.templating import encode_prompt_response
from rlhf_workflow.models.layout import LayoutOptions

log = logging.getLogger(__name__)


def encode_pair(tokenizer: Any, row: PairRow, *, max_length: int, chat_template: bool) -> tuple[list[int], list[int], list[int], int] | None:
    """Token ids of (prompt, chosen response, rejected response) with the prompt cut from the left
    so that prompt + the longer response fits ``max_length``; both responses keep the same prompt.

    Returns ``(prompt_ids, chosen_ids, rejected_ids, prompt_tokens_cut)``, or None when a response
    alone (plus one prompt token) is longer than ``max_length``.
    """
    chosen, chosen_mask = encode_prompt_response(tokenizer, row.prompt, row.chosen, chat_template=chat_template)
    rejected, rejected_mask = encode_prompt_response(tokenizer, row.prompt, row.rejected, chat_template=chat_template)
    prompt_length = chosen_mask.index(1)  # the prompt is the unmasked prefix, the same in both
    prompt, chosen, rejected = chosen[:prompt_length], chosen[prompt_length:], rejected[rejected_mask.index(1):]
    overflow = prompt_length + max(len(chosen), len(rejected)) - max_length
    if overflow >= prompt_length:
        return None
    cut = max(overflow, 0)
    return prompt[cut:], chosen, rejected, cut


def tokenize_pairs(rows: list[PairRow], tokenizer: Any, *, max_length: int, chat_template: bool, source: str,
                   extra: Callable[[PairRow], dict[str, Any]] | None = None, dropped: list | None = None,
                   limit: str = "") -> list[dict]:
    """Examples ``{"id", "prompt_ids", "chosen_ids", "rejected_ids", **extra(row)}`` (responses
    without the prompt; see `encode_pair`). Cut prompts and dropped pairs are counted in a warning;
    dropped pairs are listed in ``dropped`` as (index, field, why), ``limit`` naming max_length."""
    examples, truncated = [], 0
    dropped = dropped if dropped is not None else []
    for index, row in enumerate(rows):
        encoded = encode_pair(tokenizer, row, max_length=max_length, chat_template=chat_template)
        if encoded is None:
            lengths = {}
            for side in ("chosen", "rejected"):
                ids, mask = encode_prompt_response(tokenizer, row.prompt, getattr(row, side), chat_template=chat_template)
                lengths[side] = len(ids) - mask.index(1)
            side = max(lengths, key=lengths.__getitem__)
            dropped.append((index, side, f"the response has {lengths[side]} tokens, too many for "
                            f"{limit or f'max_length {max_length}'} with at least one prompt token (responses are "
                            "never cut)"))
            continue
        prompt, chosen, rejected, cut = encoded
        truncated += cut > 0
        example = {"id": row.id, "prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
        examples.append(example | (extra(row) if extra else {}))
    if truncated or dropped:
        log.warning("%s: %d pairs had their prompt cut from the left to fit max_length %d; %d dropped "
                    "(a response alone is longer)", source, truncated, max_length, len(dropped))
    return examples


def pair_row_length(example: dict[str, Any], options: LayoutOptions) -> int:
    """Tokens a tokenized pair (or prompt group, `group_by_prompt`) puts in a row of the batch: the
    prompt and every response when they share the row, else the prompt and the longest response."""
    responses = [len(r) for r in example["responses"]] if "responses" in example else \
        [len(example["chosen_ids"]), len(example["rejected_ids"])]
    return len(example["prompt_ids"]) + (sum(responses) if options.share_prefix else max(responses))


def group_by_prompt(examples: list[dict]) -> list[dict]:
    """Merge tokenized pairs that share a prompt into one example per prompt (InstructGPT's
    K-wise comparisons: Ouyang et al., 2022): ``{"id", "pair_ids", "prompt_ids", "responses",
    "chosen_index", "rejected_index", "margin"}``, where ``responses`` are the distinct responses
    and pair k compares ``responses[chosen_index[k]]`` with ``responses[rejected_index[k]]``.

    Laid out with a shared prefix, the prompt and each response are computed once however many
    pairs they are in: the n(n−1)/2 pairs of n ranked responses cost one prompt and n responses
    instead of n(n−1)/2 prompts and n(n−1) responses. Groups keep the order of first appearance."""
    groups: dict[tuple[int, ...], dict] = {}
    for e in examples:
        key = tuple(e["prompt_ids"])
        group = groups.setdefault(key, {"id": e["id"], "pair_ids": [], "prompt_ids": e["prompt_ids"], "responses": [],
                                        "chosen_index": [], "rejected_index": [], "margin": [], "_index": {}})
        for side in ("chosen", "rejected"):
            ids = tuple(e[f"{side}_ids"])
            if ids not in group["_index"]:
                group["_index"][ids] = len(group["responses"])
                group["responses"].append(e[f"{side}_ids"])
            group[f"{side}_index"].append(group["_index"][ids])
        group["pair_ids"].append(e["id"])
        group["margin"].append(e.get("margin", 0.0))
    for group in groups.values():
        del group["_index"]
        if len(group["pair_ids"]) > 1:
            group["id"] = f"{group['id']} (+{len(group['pair_ids']) - 1} pairs of the same prompt)"
    return list(groups.values())
