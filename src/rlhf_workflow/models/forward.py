"""Forward passes that read a few positions of a (maybe LoRA-wrapped) Hugging Face model.

A reward model reads a scalar at each sequence's last token, a preference model the label
logits there, DPO the log-probabilities of response tokens. None of them needs the model's
head on every position: the transformer body runs on all tokens, the head only where it is read.

Masks come in two forms: the usual 2-D padding mask ``[rows, width]`` (1 = real token), or a
4-D boolean ``[rows, 1, width, width]`` saying which position may attend to which (packed rows
and shared prompts, `models.layout`). transformers hands a 4-D mask to the attention as it
is, so it is converted here to what the attention implementation takes.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from rlhf_workflow.models.lora import unwrap


def pad_batch(sequences: Sequence[Sequence[int]], pad_token_id: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into ``(input_ids, attention_mask)``, padding on the right (or left)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the rightmost position with mask 1 in each row (left or right padding)."""
    positions = torch.arange(attention_mask.size(-1), device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, … from each row's first real token (pads get 0): padding side does not matter."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def attention_mask_for(model: Any, mask: torch.Tensor) -> torch.Tensor:
    """``mask`` as ``model``'s attention takes it: a 2-D mask as is; a 4-D boolean mask as is for
    sdpa, as an additive float mask (0 visible, dtype min hidden) for eager attention."""
    if mask.dim() == 2:
        return mask
    implementation = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if implementation == "sdpa":
        return mask
    if implementation == "eager":
        dtype = model.get_input_embeddings().weight.dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    raise ValueError(
        f"shared prompts and packed rows need a 4-D attention mask, which attn_implementation '{implementation}' "
        "does not take: use sdpa or eager, or set train.share_prefix=false and train.pack_length=0"
    )


def body_hidden_states(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Last hidden states ``[rows, width, hidden]`` of the model's transformer body (no head).

    Without ``position_ids`` (2-D masks only) positions count from each row's first real token.
    """
    base = unwrap(model)
    if position_ids is None:
        if attention_mask.dim() != 2:
            raise ValueError("a 4-D attention mask needs explicit position_ids")
        position_ids = position_ids_from_mask(attention_mask)
    body = getattr(base, base.base_model_prefix)
    return body(
        input_ids=input_ids, attention_mask=attention_mask_for(base, attention_mask), position_ids=position_ids,
        use_cache=False,
    ).last_hidden_state


def read_states(model: Any, head_name: str, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, read_rows: torch.Tensor | None = None,
                read_cols: torch.Tensor | None = None) -> torch.Tensor:
    """``head(h)`` for the hidden states h at positions ``(read_rows, read_cols)``; by default each
    row's last real token of a 2-D mask. ``head_name`` names the head module (``score``, ``lm_head``)."""
    hidden = body_hidden_states(model, input_ids, attention_mask, position_ids)
    if read_rows is None:
        read_rows = torch.arange(hidden.size(0), device=hidden.device)
        read_cols = last_token_index(attention_mask)
    return getattr(unwrap(model), head_name)(hidden[read_rows, read_cols])
