"""Prompt states kept between forward passes: each prompt's keys and values in every layer of a
model, so that a later pass over the same prompt computes only the response.

A run evaluates every policy on the same held-out prompts: the reward model scores the answers
of π0 and of each iterate, and π0 reads each iterate's answers for the KL. In the demo a prompt
(system message, instruction, chat markup: 71 tokens on average) is 63–72 % of such a sequence's
tokens, so from the second pass over the eval prompts on, a pass computes about a third of what
it did.

The prompt is computed alone (prompts batched together, padded on the left), the response then
attends to its keys and values through the model's KV cache, its positions continuing from the
prompt's end: the computation of one pass over prompt + response, grouped otherwise, so the
values agree with it to float rounding (the tests hold them to 1e-5 in fp32), not bit for bit.

`PromptStates` holds them for one model, in host memory whatever the model's device (a GPU keeps
all of its memory for the stages in between), within a budget (prompts beyond it are computed
each time, as without it); `shared` gives the process's store for a model, so the stages of a
run, each loading the model afresh, find what the earlier ones kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from rlhf_workflow.models.decoding import attention_layers_only, cache_argument
from rlhf_workflow.models.forward import pad_batch, position_ids_from_mask
from rlhf_workflow.models.lora import unwrap

BUDGET_BYTES = 1 << 30  # per model; SmolLM2-135M's states take 23 KB a token (bf16)
KEEP_MODELS = 4  # models `shared` keeps stores for, the least recently asked dropped first

Entry = tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]  # [(keys, values) per layer], last hidden state


class PromptStates:
    """Keys and values ``[kv_heads, prompt_tokens, head_dim]`` of every layer, and the last hidden
    state, of each prompt (by its token ids) under one model, up to ``budget_bytes``."""

    def __init__(self, budget_bytes: int = BUDGET_BYTES):
        self.budget = budget_bytes
        self.entries: dict[tuple[int, ...], Entry] = {}
        self.bytes = 0
        self.reused = 0  # prompts read from the store instead of computed

    def __len__(self) -> int:
        return len(self.entries)

    def keep(self, ids: tuple[int, ...], entry: Entry) -> None:
        size = entry[1].numel() * entry[1].element_size()
        size += sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in entry[0])
        if ids not in self.entries and self.bytes + size <= self.budget:
            self.entries[ids] = entry
            self.bytes += size


_SHARED: dict[str, PromptStates] = {}


def shared(identity: str) -> PromptStates:
    """The process's store for the model ``identity`` names (`model_identity`)."""
    states = _SHARED.pop(identity, None)
    _SHARED[identity] = states = PromptStates() if states is None else states  # most recently asked last
    while len(_SHARED) > KEEP_MODELS:
        _SHARED.pop(next(iter(_SHARED)))
    return states


def model_identity(location: str, settings: Any) -> str:
    """A string equal for the same weights loaded the same way: the source, each weights file's size
    and modification time (a model retrained in place is another model), and ``settings`` (dtype,
    device: anything JSON can write)."""
    path = Path(os.path.expanduser(location))
    files: list[tuple[str, int, int]] = []
    if path.is_dir():
        for item in sorted(path.iterdir()):
            if item.suffix in (".safetensors", ".bin", ".pt", ".gguf") and item.is_file():
                stat = item.stat()
                files.append((item.name, stat.st_size, stat.st_mtime_ns))
    where = str(path.resolve()) if path.exists() else location
    return json.dumps([where, files, settings], sort_keys=True, default=str)


def supports(model: Any) -> bool:
    """Whether the prompt's keys and values can stand in for it: a model whose decoder layers all
    attend (no state-space or linear-attention layer) with sdpa or eager attention."""
    config = unwrap(model).config
    return getattr(config, "_attn_implementation", None) in ("sdpa", "eager") and attention_layers_only(config)


def _body(model: Any) -> tuple[Any, str]:
    base = unwrap(model)
    body = getattr(base, base.base_model_prefix)
    return body, cache_argument(body.forward)


def _compute(body: Any, cache_arg: str, prompts: list[tuple[int, ...]], pad_token_id: int,
             device: torch.device) -> list[Entry]:
    """Each prompt's states, from one left-padded pass over all of them."""
    from transformers.cache_utils import DynamicCache

    ids, mask = pad_batch(prompts, pad_token_id, left=True)
    ids, mask = ids.to(device), mask.to(device)
    out = body(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True,
               **{cache_arg: DynamicCache()})
    cache = getattr(out, cache_arg, None)
    cache = out.past_key_values if cache is None else cache
    width = ids.size(1)
    entries = []
    cpu = torch.device("cpu")
    for row, prompt in enumerate(prompts):
        start = width - len(prompt)
        layers = [(layer.keys[row, :, start:].to(cpu, copy=True), layer.values[row, :, start:].to(cpu, copy=True))
                  for layer in cache.layers]
        entries.append((layers, out.last_hidden_state[row, -1].to(cpu, copy=True)))
    return entries


@torch.inference_mode()
def response_hidden_states(model: Any, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                           states: PromptStates, pad_token_id: int, *,
                           prompt_batch: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The body's last hidden states of sequence s = prompts[s] + responses[s] at its response tokens,
    the prompt's keys and values read from ``states`` (computed first, and kept there within its
    budget, where missing).

    Returns ``(hidden [S, W, d], prompt_last [S, d], lengths [S])``: ``hidden[s, j]`` is the state at
    response token j for j < lengths[s] (right-padded), ``prompt_last[s]`` the state at the prompt's
    last token, which predicts the response's first."""
    from transformers.cache_utils import DynamicCache

    body, cache_arg = _body(model)
    device = next(body.parameters()).device
    keys = [tuple(int(t) for t in p) for p in prompts]
    found: dict[tuple[int, ...], Entry] = {}
    for ids in dict.fromkeys(keys):
        if ids in states.entries:
            found[ids] = states.entries[ids]
            states.reused += 1
    missing = sorted((ids for ids in dict.fromkeys(keys) if ids not in found), key=len)
    for start in range(0, len(missing), prompt_batch):
        chunk = missing[start : start + prompt_batch]
        for ids, entry in zip(chunk, _compute(body, cache_arg, chunk, pad_token_id, device)):
            found[ids] = entry
            states.keep(ids, entry)

    longest = max(len(ids) for ids in keys)
    layers = []
    for layer in range(len(found[keys[0]][0])):
        first_keys, first_values = found[keys[0]][0][layer]
        past_keys = first_keys.new_zeros((len(keys), first_keys.size(0), longest, first_keys.size(-1)), device=device)
        past_values = first_values.new_zeros((len(keys), first_values.size(0), longest, first_values.size(-1)),
                                             device=device)
        for row, ids in enumerate(keys):
            k, v = found[ids][0][layer]
            past_keys[row, :, longest - len(ids):] = k
            past_values[row, :, longest - len(ids):] = v
        layers.append((past_keys, past_values))
    prompt_mask = pad_batch(keys, pad_token_id, left=True)[1]
    ids, response_mask = pad_batch(responses, pad_token_id)
    lengths = torch.tensor([len(p) for p in keys])
    positions = lengths[:, None] + torch.arange(ids.size(1))[None, :]
    out = body(input_ids=ids.to(device), attention_mask=torch.cat([prompt_mask, response_mask], 1).to(device),
               position_ids=positions.to(device), use_cache=True, **{cache_arg: DynamicCache(ddp_cache_data=layers)})
    prompt_last = torch.stack([found[ids][1] for ids in keys]).to(device)
    return out.last_hidden_state, prompt_last, response_mask.sum(1).to(device)
