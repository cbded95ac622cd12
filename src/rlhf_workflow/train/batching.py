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


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log softmax(h W^T + b)[y] for N rows of h, ``chunk`` rows at a time.

    Forward keeps only the log-normaliser of each row; backward recomputes each chunk's logits.
    With p = softmax(z) and upstream gradient g_n: ∂/∂z_n = g_n (onehot(y_n) − p_n), so
    ∂/∂h = (∂/∂z) W, ∂/∂W = (∂/∂z)^T h, ∂/∂b = Σ_n ∂/∂z_n. Peak memory: chunk × vocab floats.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):  # type: ignore[override]
        out = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for start in range(0, hidden.size(0), chunk):
            rows = slice(start, start + chunk)
            logits = _logits(hidden[rows], weight, bias)
            lse[rows] = torch.logsumexp(logits, -1)
            out[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - lse[rows]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # accumulated in the weight's own dtype: an fp32 copy of a 128K-vocabulary bf16 head would cost GBs
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        for start in range(0, hidden.size(0), ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            grad_logits = torch.exp(_logits(hidden[rows], weight, bias) - lse[rows, None]).mul_(-grad_out[rows, None])
            grad_logits.scatter_add_(1, targets[rows, None], grad_out[rows, None])
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits @ weight.float()).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ hidden[rows].float()).to(weight.dtype)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0).to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits of a chunk, also under autocast (log-probs of a bf16 projection are too coarse for DPO)."""
    with torch.autocast(hidden.device.type, enabled=False):
        logits = hidden.float() @ weight.float().t()
        return logits + bias.float() if bias is not None else logits


def token_logprobs(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """log π(y_n | h_n) for hidden states ``[N, hidden]`` and target ids ``[N]``, in fp32.

    With ``chunk > 0`` the vocabulary projection runs ``chunk`` rows at a time forward and
    backward, so the ``[N, vocab]`` logits are never held whole (vocab is 49K for SmolLM2,
    128K for Llama-3). ``chunk = 0`` computes them in one piece through ``head``.
    """
    if chunk <= 0:
        return torch.log_softmax(head(hidden).float(), -1).gather(1, targets[:, None]).squeeze(1)
    return _ChunkedTokenLogprobs.apply(hidden, head.weight, head.bias, targets, chunk)


def sequence_logprobs(hidden: torch.Tensor, head: torch.nn.Linear, batch: dict[str, torch.Tensor],
                      chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and response lengths of every sequence of a `layout` batch.

    ``hidden``: the body's last hidden states ``[rows, width, hidden]`` for the batch. Returns
    ``(logp [S], tokens [S])`` in sequence order.
    """
    logp = token_logprobs(hidden[batch["target_row"], batch["target_col"]], head, batch["target_id"], chunk)
    sequences = batch["last_row"].numel()
    sums = torch.zeros(sequences, dtype=logp.dtype, device=logp.device).index_add(0, batch["target_seq"], logp)
    counts = torch.bincount(batch["target_seq"], minlength=sequences)
    return sums, counts
