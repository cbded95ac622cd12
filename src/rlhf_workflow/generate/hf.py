"""The transformers backend: sampling with a KV cache on a CPU or a GPU, no server needed.

Where the time goes in plain batched ``model.generate`` and what this backend does instead:

* padding: prompts are sorted by length before they are cut into batches, so a batch pads little;
* the prompt is computed once for its n samples: one prefill row per prompt, whose cache is then
  repeated n times (``generate(num_return_sequences=n)`` prefills n copies);
* finished rows leave the batch: when a row samples its end-of-turn token (or a stop string, or
  runs out of tokens) it is dropped from the cache, so the decode steps that follow compute only
  rows still writing (``generate`` keeps computing every row until the longest one ends);
* no logits over the vocabulary for prompt positions: only the last position's are computed;
* on a CPU, the KV cache grows in place and a one-token query is computed per KV-head group
  (`models.decoding`), where transformers concatenates the whole cache at every step and runs
  its flash kernel for a query of one token.

Each sample also carries its log-probability under the model (the sum over its sampled tokens of
log softmax of the raw logits), so that the evaluation's KL estimate needs no second forward pass
of the policy; a sample cut at a stop string has none (the text no longer holds all its tokens).

Each sample draws its tokens from a `torch.Generator` of its own, seeded by `prompt_seed` (one
uniform number per token, mapped through the cumulative distribution), so a prompt's samples do
not depend on which other prompts share its batch.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Iterator, Sequence

import torch

from rlhf_workflow.data.templating import end_of_turn_ids  # the one definition; imported here by generate/command.py
from rlhf_workflow.errors import UserError
from rlhf_workflow.generate.base import (
    GenerationRequest,
    GenerationResult,
    Sample,
    cut_at_stop,
    prompt_seed,
)
from rlhf_workflow.models.decoding import GrowingCache, cache_argument, decode_step
from rlhf_workflow.models.forward import pad_batch, position_ids_from_mask

logger = logging.getLogger(__name__)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Next-token probabilities ``[rows, vocab]`` after temperature, top-k and top-p (nucleus).

    p = softmax(z / T), then tokens outside the k most likely, and outside the smallest set whose
    probability reaches top_p, get 0 (the most likely token always stays); not renormalised, as
    `sample_tokens` scales by the total.
    """
    logits = logits.float() / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs


def sample_tokens(logits: torch.Tensor, generators: Sequence[torch.Generator], *, temperature: float, top_k: int,
                  top_p: float) -> torch.Tensor:
    """One token per row: greedy when temperature is 0, else an exact draw from the filtered p by
    inverting its cumulative distribution with one uniform number from the row's own generator
    (the first token whose cumulative mass exceeds u·Σp; tokens of mass 0 are never picked)."""
    if temperature == 0:
        return logits.argmax(-1)
    cdf = filter_logits(logits, temperature, top_k, top_p).double().cumsum(-1)
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64, device=g.device) for g in generators])
    u = u.to(cdf.device).unsqueeze(-1) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.size(-1) - 1)


class HFGenerator:
    """Samples from a transformers causal LM; see the module docstring for how."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 8, chat_template: bool = True):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.chat_template = chat_template
        self.stop_ids = end_of_turn_ids(tokenizer, model, chat_template=chat_template)
        if not self.stop_ids:
            raise UserError("the tokenizer has no eos token and the model no eos_token_id: nothing would end a response; "
                            "set eos_token in the tokenizer or eos_token_id in the model's generation_config.json")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop_ids)
        self.context = getattr(model.config, "max_position_embeddings", None)
        parameters = inspect.signature(model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in parameters
        self._cache_arg = cache_argument(model.forward)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def close(self) -> None:
        self.model = None

    def summary(self) -> list[str]:
        return []

    def generate(self, requests: Sequence[GenerationRequest], sampling: Any) -> Iterator[list[GenerationResult]]:
        from rlhf_workflow.data.templating import encode_prompt

        ready: list[GenerationRequest] = []
        for request in requests:
            if request.prompt_ids is None:
                prompt = request.messages if self.chat_template else request.messages[-1]["content"]
                request.prompt_ids = encode_prompt(self.tokenizer, prompt, chat_template=self.chat_template)
            if self.context is not None and len(request.prompt_ids) >= self.context:
                yield [GenerationResult(request.id, error=f"the prompt has {len(request.prompt_ids)} tokens, the "
                                        f"model's context is {self.context}: no room for a response")]
            else:
                ready.append(request)
        ready.sort(key=lambda r: len(r.prompt_ids or ()))
        for start in range(0, len(ready), self.batch_size):
            yield self._generate_batch(ready[start : start + self.batch_size], sampling)

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self._cache_arg: cache}, **extra)
        return out.logits[:, -1, :], getattr(out, self._cache_arg)

    @torch.inference_mode()
    def _generate_batch(self, batch: Sequence[GenerationRequest], sampling: Any) -> list[GenerationResult]:
        n, device = sampling.n, self.device
        prompts = [r.prompt_ids or [] for r in batch]
        ids, mask = pad_batch(prompts, self.pad_id, left=True)
        ids, mask = ids.to(device), mask.to(device)
        budget = [sampling.max_new_tokens if self.context is None else min(sampling.max_new_tokens, self.context - len(p))
                  for p in prompts for _ in range(n)]
        with decode_step(self.model) as fast:
            cache = GrowingCache(reserve=max(budget)) if fast else None  # else the model's DynamicCache
            return self._sample(batch, prompts, sampling, budget, ids, mask, cache)

    def _sample(self, batch: Sequence[GenerationRequest], prompts: list[list[int]], sampling: Any, budget: list[int],
                ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> list[GenerationResult]:
        n, device = sampling.n, ids.device
        logits, cache = self._forward(ids, mask, position_ids_from_mask(mask), cache)
        # one prefill row per prompt; its cache and logits serve all n samples of that prompt
        if n > 1:
            cache.batch_repeat_interleave(n)
            logits, mask = logits.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        lengths = torch.tensor([len(p) for p in prompts], device=device).repeat_interleave(n)
        rows = list(range(len(batch) * n))  # active rows, as indices into the batch's samples
        generators = []
        for request in batch:
            for k in range(n):
                generators.append(torch.Generator(device=device).manual_seed(prompt_seed(sampling.seed, request.id, k)))
        tokens: list[list[int]] = [[] for _ in rows]
        logprobs = [0.0] * len(rows)
        cut: set[int] = set()  # rows whose text was cut at a stop string
        ended: dict[int, int] = {}  # row -> the end-of-turn token it sampled
        finish: list[str] = ["length"] * len(rows)
        stop_ids, stops = self.stop_ids, [s for s in sampling.stop if s]
        tail = max((len(s) for s in stops), default=0) + 4
        positions = lengths.clone()
        while rows:
            picked = sample_tokens(logits, [generators[r] for r in rows], temperature=sampling.temperature,
                                   top_k=sampling.top_k, top_p=sampling.top_p)
            own = torch.log_softmax(logits.float(), dim=-1).gather(1, picked.unsqueeze(1)).squeeze(1).tolist()
            chosen = picked.tolist()
            keep: list[int] = []
            for slot, (row, token) in enumerate(zip(rows, chosen)):
                logprobs[row] += own[slot]
                if token in stop_ids:
                    finish[row] = "stop"
                    ended[row] = token
                    continue
                tokens[row].append(token)
                if stops and cut_at_stop(self.tokenizer.decode(tokens[row][-tail:]), stops)[1]:
                    finish[row] = "stop"
                    cut.add(row)
                elif len(tokens[row]) < budget[row]:
                    keep.append(slot)
            if not keep:
                break
            next_ids = torch.tensor([[chosen[slot]] for slot in keep], device=device)
            if len(keep) < len(rows):  # drop the finished rows from the batch
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
                rows = [rows[slot] for slot in keep]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            logits, cache = self._forward(next_ids, mask, positions.unsqueeze(1), cache)
            positions = positions + 1
        results = []
        for b, request in enumerate(batch):
            samples = []
            for row in range(b * n, (b + 1) * n):
                text = self.tokenizer.decode(tokens[row], skip_special_tokens=True)
                if stops:
                    text = cut_at_stop(text, stops)[0]
                samples.append(Sample(text, len(tokens[row]), finish[row],  # type: ignore[arg-type]
                                      None if row in cut else logprobs[row],
                                      tokens[row] + ([ended[row]] if row in ended else [])))
            results.append(GenerationResult(request.id, samples))
        return results
