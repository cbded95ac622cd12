"""How prompt/response sequences are laid out in a batch: padded rows, packed rows, shared prompts.

The unit is a *group*: one prompt and the responses that continue it (a preference pair is a
group of two responses). Sequence s = (group g, response b) is ``prompt_g + response_{g,b}``;
sequences are numbered group-major (s = g·k + b for groups of k responses), whatever the layout.

Three layouts, all giving every sequence the same logits as a forward pass of that sequence
alone (tests hold them to 1e-4 in fp32):

* **padded** (``share_prefix=False, pack_length=0``): one sequence per row, right-padded to the
  longest row, an ordinary 2-D attention mask. Works with every attention implementation.
* **shared prefix** (``share_prefix=True``): a group is laid out once as
  ``[prompt | response 1 | response 2 | …]``. Response b sees the prompt and itself, never
  another response; its position ids continue from the end of the prompt, so rotary/learned
  positions are what they would be in ``prompt + response_b``. The prompt is computed once per
  group instead of once per response.
* **packed** (``pack_length=L``): several groups (or sequences) share a row of up to L tokens,
  with a block-diagonal causal mask and position ids restarting at each group, so no compute is
  spent on padding between them.

Shared and packed rows need a 4-D boolean mask ``[rows, 1, width, width]``, which
`models.forward` hands to sdpa as it is and turns into an additive float mask for eager
attention. (Position ids alone do not isolate packed sequences under sdpa or eager attention.)

What the objectives read from the layout:

* ``last_row, last_col``: the position of each sequence's last token (reward models read there);
* ``target_row, target_col, target_id, target_seq``: for each response token, the position
  whose logits predict it and the sequence it belongs to (log-probabilities for DPO).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rlhf_workflow.config import TrainConfig


@dataclass(frozen=True)
class LayoutOptions:
    share_prefix: bool = False
    pack_length: int = 0  # tokens per packed row; 0 = no packing

    @property
    def needs_4d_mask(self) -> bool:
        return self.share_prefix or self.pack_length > 0

    @classmethod
    def from_config(cls, config: TrainConfig) -> "LayoutOptions":
        return cls(share_prefix=config.share_prefix, pack_length=config.pack_length)


def _placements(units: list[int], pack_length: int) -> list[list[int]]:
    """Unit indices per row: first-fit decreasing into rows of ``pack_length`` tokens (0: one per row).

    A unit longer than ``pack_length`` gets a row of its own.
    """
    if pack_length <= 0:
        return [[i] for i in range(len(units))]
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(units)), key=lambda k: -units[k]):
        for r, room in enumerate(free):
            if units[i] <= room:
                rows[r].append(i)
                free[r] -= units[i]
                break
        else:
            rows.append([i])
            free.append(max(pack_length - units[i], 0))
    return rows


def layout(
    groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    pad_token_id: int,
    options: LayoutOptions = LayoutOptions(),
) -> dict[str, torch.Tensor]:
    """Lay out ``groups`` = [(prompt_ids, [response_ids, …]), …] as one batch (see module docstring).

    Every prompt and response must hold at least one token. Returns tensors: ``input_ids``,
    ``position_ids``, ``attention_mask`` (2-D long, or 4-D bool ``[rows, 1, W, W]`` when shared or
    packed), the read-out indices, and ``num_tokens``: the tokens of all sequences, a shared
    prompt counted once per sequence that reads it (the work the batch stands for, whatever the layout).
    """
    # A unit is what is placed contiguously: a whole group when prompts are shared, else one sequence.
    # Each unit is a list of spans (kind, ids): kind 0 = prompt, kind b >= 1 = response b - 1.
    units: list[list[tuple[int, Sequence[int]]]] = []
    unit_sequences: list[list[int]] = []  # the sequence numbers each unit holds, in span order
    seq = 0
    for prompt, responses in groups:
        if not prompt or not responses or not all(responses):
            raise ValueError("every prompt and response needs at least one token")
        if options.share_prefix:
            units.append([(0, prompt)] + [(b + 1, r) for b, r in enumerate(responses)])
            unit_sequences.append(list(range(seq, seq + len(responses))))
        else:
            for b, response in enumerate(responses):
                units.append([(0, prompt), (1, response)])
                unit_sequences.append([seq + b])
        seq += len(responses)
    num_sequences = seq
    sizes = [sum(len(ids) for _, ids in unit) for unit in units]
    rows = _placements(sizes, options.pack_length)
    width = max(sum(sizes[u] for u in row) for row in rows)

    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)  # unit slot in the row; -1 = padding
    branch = torch.zeros((len(rows), width), dtype=torch.long)  # 0 = prompt (seen by all), b = response b
    last = torch.zeros((num_sequences, 2), dtype=torch.long)
    targets: list[torch.Tensor] = []  # rows of (row, predicting col, token, sequence)
    num_tokens = 0
    for r, row in enumerate(rows):
        col = 0
        for slot, u in enumerate(row):
            prompt_end = 0  # the column after the prompt
            prompt_length = 0
            for (kind, span), s in zip(units[u], [None] + unit_sequences[u]):
                n = len(span)
                ids[r, col : col + n] = torch.as_tensor(list(span), dtype=torch.long)
                segment[r, col : col + n] = slot
                branch[r, col : col + n] = kind
                if kind == 0:
                    positions[r, col : col + n] = torch.arange(n)
                    prompt_end, prompt_length = col + n, n
                else:
                    positions[r, col : col + n] = torch.arange(prompt_length, prompt_length + n)
                    last[s] = torch.tensor([r, col + n - 1])
                    # token j of the response is predicted at the column before it; token 0 at the prompt's end
                    predicting = torch.arange(col - 1, col + n - 1)
                    predicting[0] = prompt_end - 1
                    targets.append(torch.stack([torch.full((n,), r), predicting, ids[r, col : col + n],
                                                torch.full((n,), s)], 1))
                    num_tokens += prompt_length + n
                col += n

    out = {"input_ids": ids, "position_ids": positions, "last_row": last[:, 0], "last_col": last[:, 1]}
    target = torch.cat(targets)
    out.update(target_row=target[:, 0], target_col=target[:, 1], target_id=target[:, 2], target_seq=target[:, 3])
    out["num_tokens"] = torch.tensor(num_tokens)
    if options.needs_4d_mask:
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same_unit = segment[:, :, None] == segment[:, None, :]
        visible_branch = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
        out["attention_mask"] = (causal & same_unit & visible_branch)[:, None]
    else:
        out["attention_mask"] = (segment >= 0).long()
    return out
