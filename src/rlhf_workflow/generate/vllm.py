"""The vLLM backend: the offline ``vllm.LLM`` engine on one or more GPUs (an optional extra).

    pip install 'rlhf-workflow[vllm]'

Prompts are rendered with our chat template code and handed to the engine as token ids, so the
hf and vllm backends see the same tokens. Each prompt gets its own ``SamplingParams`` with
``n`` samples and a seed from `prompt_seed`, so its samples do not depend on its batch. The engine
schedules and batches by itself (continuous batching, prefix caching); this backend only feeds it
``chunk_size`` prompts at a time so that each chunk is written before the next starts.

Under ``accelerate launch`` / ``torchrun`` with W processes (one GPU each) every process builds an
engine with ``distributed_executor_backend="external_launcher"``: vLLM joins the processes already
started into tensor-parallel groups of ``tensor_parallel_size`` k consecutive ranks, so there are
W / k engines. `data.shards.run_sharded` gives each group its own share of the prompts (all k
members feed the same prompts and get the same outputs; member 0 writes them). With one process,
vLLM starts its own workers for the k GPUs.

Memory: the engines are built with ``enable_sleep_mode``; when the stage ends, `close` puts each
to sleep at level 2, which frees its weights and KV cache on the GPU (vLLM's own path for giving
memory back to training), then drops it and vLLM's tensor-parallel groups. The next stage (DPO)
then loads the policy into the memory given back; the processes' own CUDA context stays.
Not yet run on GPUs in this project (no vLLM on the machines it was built on).
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Sequence

from rlhf_workflow.data.templating import end_of_turn_ids
from rlhf_workflow.errors import UserError
from rlhf_workflow.generate.base import (
    GenerationRequest,
    GenerationResult,
    Sample,
    prompt_seed,
)

logger = logging.getLogger(__name__)


def import_vllm() -> Any:
    """The vllm module, or a clear message on how to get it."""
    try:
        import vllm
    except ImportError as exc:
        raise UserError("the vllm backend needs vLLM, which is not installed: pip install 'rlhf-workflow[vllm]' "
                        f"(it needs a CUDA GPU; use backend=hf on a CPU). Import error: {exc}") from None
    return vllm


def read_generation_config(location: str) -> Any:
    """The model's ``GenerationConfig`` (generation_config.json), or None when it has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(location)
    except (OSError, ValueError):
        return None


class VLLMGenerator:
    """Samples with vLLM's offline engine.

    It stops at `end_of_turn_ids` of the tokenizer and the model's generation config (the same
    ids as the hf backend), and at any ``stop_ids`` given besides."""

    def __init__(self, model_config: Any, backend: Any, tokenizer: Any, *, chat_template: bool = True,
                 stop_ids: set[int] | None = None, seed: int = 0, launched: bool = False):
        from rlhf_workflow.models.loading import local_directory

        vllm = import_vllm()
        self.vllm = vllm
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.chunk_size = backend.chunk_size
        location = local_directory(model_config.name_or_path)  # a built-in or .gguf model as an HF directory
        end_of_turn = end_of_turn_ids(tokenizer, read_generation_config(location), chat_template=chat_template)
        self.stop_ids = sorted(end_of_turn | set(stop_ids or ()))
        tokenizer_location = local_directory(model_config.tokenizer) if model_config.tokenizer else location
        self.launched = launched  # processes started by a launcher, each with its GPU: external_launcher
        self.llm = vllm.LLM(
            model=location, tokenizer=tokenizer_location,
            dtype=model_config.dtype, seed=seed, trust_remote_code=model_config.trust_remote_code,
            tensor_parallel_size=backend.tensor_parallel_size, gpu_memory_utilization=backend.gpu_memory_utilization,
            enable_prefix_caching=backend.enable_prefix_caching, max_model_len=backend.max_model_len,
            enable_sleep_mode=True, **({"distributed_executor_backend": "external_launcher"} if launched else {}),
        )
        self.context = self.llm.llm_engine.model_config.max_model_len

    def close(self) -> None:
        """Give the GPU memory back (see the module docstring)."""
        import gc

        import torch

        if self.llm is None:
            return
        self.llm.sleep(level=2)  # weights and KV cache freed on the GPU
        self.llm = None
        if self.launched:  # vLLM's tensor-parallel groups, not the launcher's process group
            from vllm.distributed.parallel_state import destroy_model_parallel

            destroy_model_parallel()
        gc.collect()
        torch.cuda.empty_cache()

    def summary(self) -> list[str]:
        return []

    def _params(self, request: GenerationRequest, sampling: Any) -> Any:
        kwargs: dict[str, Any] = dict(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_new_tokens,
            seed=prompt_seed(sampling.seed, request.id) & 0x7FFFFFFF, stop=list(sampling.stop) or None,
            stop_token_ids=self.stop_ids or None, skip_special_tokens=True,
            # the sampled token's log-prob at each step, under the model's own distribution (vLLM's default
            # logprobs_mode, raw_logprobs: before temperature and filters), summed in cumulative_logprob
            logprobs=0,
        )
        if sampling.top_k > 0:
            kwargs["top_k"] = sampling.top_k
        return self.vllm.SamplingParams(**kwargs)

    def generate(self, requests: Sequence[GenerationRequest], sampling: Any) -> Iterator[list[GenerationResult]]:
        from rlhf_workflow.data.templating import encode_prompt

        ready = []
        for request in requests:
            if request.prompt_ids is None:
                prompt = request.messages if self.chat_template else request.messages[-1]["content"]
                request.prompt_ids = encode_prompt(self.tokenizer, prompt, chat_template=self.chat_template)
            if len(request.prompt_ids) >= self.context:
                yield [GenerationResult(request.id, error=f"the prompt has {len(request.prompt_ids)} tokens, the "
                                        f"engine's context is {self.context}: no room for a response")]
            else:
                ready.append(request)
        for start in range(0, len(ready), self.chunk_size):
            chunk = ready[start : start + self.chunk_size]
            outputs = self.llm.generate([{"prompt_token_ids": r.prompt_ids} for r in chunk],
                                        [self._params(r, sampling) for r in chunk], use_tqdm=True)
            yield [GenerationResult(request.id, [engine_sample(c) for c in output.outputs])
                   for request, output in zip(chunk, outputs)]


def engine_sample(completion: Any) -> Sample:
    """A `Sample` from one of vLLM's ``CompletionOutput``s, with its log-prob and tokens. A response
    cut at a stop string has a text shorter than its tokens: it gets neither, as in the hf backend."""
    cut = isinstance(getattr(completion, "stop_reason", None), str)
    logprob = getattr(completion, "cumulative_logprob", None)
    return Sample(completion.text, len(completion.token_ids), "length" if completion.finish_reason == "length" else "stop",
                  logprob=None if cut or logprob is None else float(logprob),
                  token_ids=None if cut else list(completion.token_ids))
