"""Log-probabilities of responses: log π(y | x) summed over the response tokens of each sequence.

DPO trains on them, its reference pass and the policy evaluation (KL to π0) read them. The
transformer body runs on every token of a `models.layout` batch; the vocabulary projection runs
only at response tokens, in chunks, so the ``[tokens, vocab]`` logits are never held whole.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rlhf_workflow.errors import UserError
from rlhf_workflow.models.forward import body_hidden_states
from rlhf_workflow.models.lora import unwrap


EXACT_TOP = 16  # logits recomputed in fp32 per row when the projection runs in 16 bits (`_projection`)


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log softmax(h W^T + b)[y] for N rows of h, ``chunk`` rows at a time.

    Forward keeps only the log-normaliser of each row; backward recomputes each chunk's logits.
    With p = softmax(z) and upstream gradient g_n: ∂/∂z_n = g_n (onehot(y_n) − p_n), so
    ∂/∂h = (∂/∂z) W, ∂/∂W = (∂/∂z)^T h, ∂/∂b = Σ_n ∂/∂z_n. Peak memory: chunk × vocab floats.

    The products run in fp32, or in 16 bits where the body does, the forward then corrected as
    `_projection` says.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):  # type: ignore[override]
        low = _projection(hidden, weight)
        product_weight = weight.to(low) if low is not None else weight  # cast once, not per chunk
        out = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for start in range(0, hidden.size(0), chunk):
            rows = slice(start, start + chunk)
            logits = _logits(hidden[rows], product_weight, bias)
            if low is None:
                picked = logits.gather(1, targets[rows, None]).squeeze(1)
            else:  # the target's logit and each row's largest, in fp32
                top = logits.topk(min(EXACT_TOP, logits.size(-1)), dim=-1).indices
                logits.scatter_(1, top, _exact_logits(hidden[rows], weight, bias, top))
                picked = _exact_logits(hidden[rows], weight, bias, targets[rows, None]).squeeze(1)
            lse[rows] = _logsumexp_(logits)
            out[rows] = picked - lse[rows]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk = chunk
        ctx.low = low  # the backward's products in the forward's dtype, whatever autocast says then
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dtype = ctx.low or torch.float32  # the products' dtype
        product_weight = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight: torch.Tensor | None = None
        grad_bias: torch.Tensor | None = None
        for start in range(0, hidden.size(0), ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            # in place on the recomputed logits: a chunk's [rows, vocab] floats are allocated once, not three times
            grad_logits = _logits(hidden[rows], product_weight, bias).sub_(lse[rows, None]).exp_().mul_(-grad_out[rows, None])
            grad_logits.scatter_add_(1, targets[rows, None], grad_out[rows, None])
            if bias is not None and ctx.needs_input_grad[2]:
                part = grad_logits.sum(0).to(bias.dtype)
                grad_bias = part if grad_bias is None else grad_bias.add_(part)
            grad_logits = grad_logits.to(dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits @ product_weight).to(hidden.dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = _accumulate(grad_weight, grad_logits.t(), hidden[rows].to(dtype), weight.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def _projection(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The 16-bit dtype the vocabulary projection runs in, or None for fp32.

    fp32 where the body runs in fp32 (no autocast, fp32 weights): the log-probs are then those of
    fp32 logits. Under bf16/fp16 autocast, or with 16-bit weights, the products run in that dtype
    (on a CPU with fast bf16 4x as fast as fp32, where the fp32 projection cost as much as the
    bf16 body of a 135M model), and the forward corrects what 16-bit logits get wrong: the
    target's logit and each row's `EXACT_TOP` largest are recomputed in fp32, one dot product
    each, and the log-normaliser is summed in fp32. Measured on SmolLM2-135M-Instruct's responses
    with a bf16 body: a response's log-prob then differs from the fp32 projection's by 0.02 nats
    on average (plain bf16 logits: 0.14), where the bf16 body itself puts both 0.19 from an
    all-fp32 pass. The backward's products run in 16 bits, as mixed precision runs every layer's.
    """
    device = hidden.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        if dtype in (torch.bfloat16, torch.float16):
            return dtype
    if weight.dtype in (torch.bfloat16, torch.float16):
        return weight.dtype
    return None


def _exact_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  index: torch.Tensor) -> torch.Tensor:
    """fp32 logits ``[rows, k]`` of ``hidden`` ``[rows, d]`` at the vocabulary entries ``index`` ``[rows, k]``."""
    with torch.autocast(hidden.device.type, enabled=False):
        logits = torch.einsum("nd,nkd->nk", hidden.float(), weight[index].float())
        return logits + bias.float()[index] if bias is not None else logits


def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """log Σ_v exp(z_v) of each row, overwriting ``logits`` (torch.logsumexp allocates a second [rows, vocab])."""
    top = logits.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return logits.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1))


def _accumulate(total: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``total + a @ b`` in ``dtype``, in place from the second chunk on (the first product is the buffer).

    In the weight's own dtype: an fp32 copy of a 128K-vocabulary bf16 head would cost GBs."""
    if total is None:
        return (a @ b).to(dtype)
    if total.dtype == a.dtype:
        return total.addmm_(a, b)
    return total.add_((a @ b).to(dtype))


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits of a chunk, outside autocast: the product in ``weight``'s dtype (fp32, or 16 bits
    where `_projection` says so), widened to fp32."""
    with torch.autocast(hidden.device.type, enabled=False):
        logits = (hidden.to(weight.dtype) @ weight.t()).float()
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


class SequenceLogprobs(nn.Module):
    """log π(response | prompt), summed over response tokens, of every sequence of a `layout` batch.

    Wraps a (maybe LoRA-wrapped) causal LM; returns ``(logp [S], response_tokens [S])``.
    """

    def __init__(self, model: Any, chunk: int = 1024):
        super().__init__()
        self.model = model
        self.chunk = chunk
        config = unwrap(model).config
        if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", 1.0) not in (None, 1.0):
            raise UserError(
                f"{config.model_type} scales or soft-caps its logits after the vocabulary projection, which the "
                "log-prob computation here does not reproduce; this model type is not supported for DPO yet"
            )

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = body_hidden_states(self.model, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        return sequence_logprobs(hidden, unwrap(self.model).get_output_embeddings(), batch, self.chunk)
