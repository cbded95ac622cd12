"""What every generation backend shares: the request, the result, the protocol, seeds and stops.

A backend turns prompts into n sampled responses each:

    for results in generator.generate(requests, sampling):   # yields as work finishes
        for result in results: ...                            # one GenerationResult per request

and yields results as soon as a batch (hf), a chunk (vllm) or a request (openai) is done, so
the stage can write them before the next one starts. Each prompt's samples are drawn from a
random stream of its own, seeded by `prompt_seed` (the run's seed and the prompt id), so a
prompt gets the same samples whatever batch, shard or restart it lands in (exactly so for the
hf backend on a CPU; where the server honours seeds for the others).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence

from rlhf_workflow.data.schemas import FinishReason  # (declared with the rows that carry it)


@dataclass
class GenerationRequest:
    """One prompt to answer: its id (for seeding and reports), messages and token ids."""

    id: str
    messages: list[dict[str, str]]
    prompt_ids: list[int] | None = None  # filled by backends that tokenize (hf, vllm, completions)


@dataclass
class Sample:
    """One sampled response: its text, its length in tokens and why it ended."""

    text: str
    num_tokens: int | None  # None when a server does not say
    finish_reason: FinishReason
    # log π(response | prompt) of the sampled tokens (the end-of-turn token too when it was sampled)
    # under the model's own distribution, before temperature and filters; None when not known
    logprob: float | None = None
    token_ids: list[int] | None = None  # the sampled tokens, the end-of-turn token too when it was sampled


@dataclass
class GenerationResult:
    """The n samples of one request, or the error that kept it from being answered."""

    id: str
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None
    retryable: bool = False  # a rerun may succeed (a server error), unlike a prompt too long for the model


class Generator(Protocol):
    """A generation backend."""

    def generate(self, requests: Sequence[GenerationRequest], sampling: Any) -> Iterator[list[GenerationResult]]:
        """n samples for each request (``sampling.n``), yielded in groups as they finish."""
        ...

    def close(self) -> None:
        """Release the model or connections."""
        ...

    def summary(self) -> list[str]:
        """Lines worth printing after the stage (the openai backend's per-server counts), or none."""
        ...


def prompt_seed(seed: int, prompt_id: str, index: int = 0) -> int:
    """A 63-bit seed for sample ``index`` of prompt ``prompt_id`` (stable across runs and machines)."""
    digest = hashlib.sha256(f"{seed}\x00{prompt_id}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first occurrence of any stop string, and whether one occurred."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
