"""The `generate` command: a prompts file in, a generations file out, resumable and shardable.

    rlhf-workflow generate prompts=prompts.jsonl output=gen.jsonl sampling.n=4 backend=hf

Each output row is the prompt row (id, prompt and any metadata, untouched) plus ``responses``
(n strings), ``response_tokens`` (their lengths in tokens) and ``finish_reasons`` ("stop": the
model ended its turn or hit a stop string; "length": max_new_tokens or the context ran out), and
``response_logps`` (each response's log-probability under the sampling model, when the backend
gives it for every sample: the hf backend does) and, with ``token_ids=true``, ``response_token_ids``
(the sampled tokens, so that another model's log-probabilities can be computed on exactly them).

* Resumable: rows are appended as each batch finishes; a rerun skips prompts already in the file.
  The settings that determine the rows (model, sampling, template) are recorded in
  ``<output>.settings.json``: a rerun with other settings is refused (``--force`` starts afresh).
  One process (or one launch) writes an output at a time (`data.outputs.OutputLock`).
* Several processes (``accelerate launch`` / ``torchrun``): process r takes every W-th prompt still
  to do and appends to ``<output>.rank<r>.jsonl``; at the end the main process appends those rows
  to the output and deletes the shards, so every prompt is in the output exactly once. Shards
  left by a killed run are merged on the next run, with any number of processes.
* Prompts that cannot be answered (too long for the model, or a server that kept failing) are
  listed in ``<output>.errors.jsonl`` with the reason; server failures make the stage exit
  non-zero after everything else is done, so a rerun retries just those prompts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rlhf_workflow.config import GenerateConfig
from rlhf_workflow.errors import UserError, model_source
from rlhf_workflow.generate.base import GenerationRequest, GenerationResult, Generator

logger = logging.getLogger(__name__)


def make_generator(config: GenerateConfig, device: Any) -> Generator:
    """The backend the config names, with its model loaded."""
    from rlhf_workflow.data.templating import require_chat_template
    from rlhf_workflow.models.loading import load_model, load_tokenizer
    from rlhf_workflow.processes import process_state

    model_config = config.model.model_copy(update={"lora": config.model.lora.model_copy(update={"r": 0}),
                                                   "gradient_checkpointing": False})
    tokenizer_source = config.model.tokenizer or config.model.name_or_path
    if config.backend == "hf":
        from rlhf_workflow.generate.hf import HFGenerator

        tokenizer = load_tokenizer(tokenizer_source, trust_remote_code=config.model.trust_remote_code)
        if config.apply_chat_template:
            require_chat_template(tokenizer, "apply_chat_template")
        model = load_model(model_config).to(config.model.device or device)
        return HFGenerator(model, tokenizer, batch_size=config.hf.batch_size, chat_template=config.apply_chat_template)
    if config.backend == "vllm":
        from rlhf_workflow.generate.hf import end_of_turn_ids
        from rlhf_workflow.generate.vllm import VLLMGenerator, import_vllm

        import_vllm()
        tokenizer = load_tokenizer(tokenizer_source, trust_remote_code=config.model.trust_remote_code)
        if config.apply_chat_template:
            require_chat_template(tokenizer, "apply_chat_template")
        return VLLMGenerator(model_config, config.vllm, tokenizer, chat_template=config.apply_chat_template,
                             stop_ids=end_of_turn_ids(tokenizer, chat_template=config.apply_chat_template),
                             seed=config.sampling.seed, launched=process_state().num_processes > 1)
    from rlhf_workflow.generate.openai import OpenAIGenerator

    tokenizer = None
    try:  # for exact token counts; the completions endpoint needs it to render prompts
        tokenizer = load_tokenizer(tokenizer_source, trust_remote_code=config.model.trust_remote_code)
    except UserError as exc:
        if config.openai.endpoint == "completions":
            raise UserError(f"the completions endpoint renders prompts with the model's tokenizer: {exc}") from None
        logger.info("no tokenizer for %s (%s): response lengths come from the server", tokenizer_source, exc)
    return OpenAIGenerator(config.openai, config.openai.model or config.model.name_or_path, tokenizer=tokenizer,
                           chat_template=config.apply_chat_template)


def generation_row(prompt_row: Any, result: GenerationResult, *, token_ids: bool = False) -> dict[str, Any]:
    """The prompt row with its responses, their token counts and finish reasons (and log-probabilities
    and, with ``token_ids``, sampled token ids where the backend gave them for every sample)."""
    from rlhf_workflow.data.io import row_to_dict

    row = {**row_to_dict(prompt_row), "responses": [s.text for s in result.samples],
           "response_tokens": [s.num_tokens for s in result.samples],
           "finish_reasons": [s.finish_reason for s in result.samples]}
    if all(s.logprob is not None for s in result.samples):
        row["response_logps"] = [s.logprob for s in result.samples]
    if token_ids and all(s.token_ids is not None for s in result.samples):
        row["response_token_ids"] = [s.token_ids for s in result.samples]
    return row


@dataclass
class GenerateStats:
    """What one process's share of `generate` made (gathered from every process to the main one)."""

    tokens: int = 0  # generated tokens, up to each response's end
    finished: int = 0  # responses that ended their turn (the others hit max_new_tokens)
    failed: list[tuple[str, str, bool]] = field(default_factory=list)  # (prompt id, error, whether a retry may help)
    identical: int = 0  # prompts whose n samples are all the same text

    @staticmethod
    def sum(shares: list["GenerateStats"]) -> "GenerateStats":
        return GenerateStats(sum(s.tokens for s in shares), sum(s.finished for s in shares),
                             [e for s in shares for e in s.failed], sum(s.identical for s in shares))


def run_generate(config: GenerateConfig, *, force: bool = False, progress: bool = True) -> Path:
    """The `generate` command (see the module docstring); returns the output path. ``force``: start an
    output whose rows were made with other settings afresh (the old file kept as a backup)."""
    from rlhf_workflow.data.io import read_rows, write_jsonl
    from rlhf_workflow.data.outputs import errors_path
    from rlhf_workflow.data.schemas import PromptRow
    from rlhf_workflow.data.shards import run_sharded
    from rlhf_workflow.processes import process_state

    state = process_state()
    output = Path(config.output)
    prompts = read_rows(config.prompts, PromptRow)
    start = time.perf_counter()
    # vLLM under several processes: an engine per group of vllm.tensor_parallel_size processes (one
    # GPU each), each group sampling its own share; building the engines is collective over all
    # processes, so a process builds its engine even when its group has nothing left to do
    collective = config.backend == "vllm" and state.num_processes > 1
    group_size = config.vllm.tensor_parallel_size if collective else 1

    def work(mine: list[PromptRow], sink: Any) -> GenerateStats:
        stats = GenerateStats()
        if not mine and not collective:
            return stats
        with model_source("model.name_or_path"):
            generator = make_generator(config, state.device)
        by_id = {p.id: p for p in mine}
        requests = [GenerationRequest(p.id, p.prompt_messages()) for p in mine]
        bar = tqdm(total=len(mine), desc="generate", unit="prompt", disable=not (progress and state.is_main_process))
        try:
            for results in generator.generate(requests, config.sampling):
                rows = []
                for result in results:
                    if result.error is not None:
                        stats.failed.append((result.id, result.error, result.retryable))
                        continue
                    rows.append(generation_row(by_id[result.id], result, token_ids=config.token_ids))
                    stats.identical += len(result.samples) > 1 and len({s.text for s in result.samples}) == 1
                    stats.tokens += sum(s.num_tokens or 0 for s in result.samples)
                    stats.finished += sum(s.finish_reason == "stop" for s in result.samples)
                sink.append(rows)
                bar.update(len(results))
                bar.set_postfix(tokens_per_s=f"{stats.tokens / max(time.perf_counter() - start, 1e-9):.0f}")
        finally:
            bar.close()
            generator.close()
            for line in generator.summary():
                print(f"generate{f' (process {state.process_index})' if state.num_processes > 1 else ''}: {line}")
        return stats

    result = run_sharded(f"generate ({config.backend})", state, output, prompts, work, settings=config.row_settings(),
                         force=force, group_size=group_size)
    if result is None:  # not the main process
        return output
    todo, everything = result
    seconds = time.perf_counter() - start
    total = GenerateStats.sum(everything)
    tokens, finished, failed, identical = total.tokens, total.finished, total.failed, total.identical
    answered = len(todo) - len(failed)
    if config.sampling.n > 1 and config.sampling.temperature > 0 and answered >= 4 and identical > answered / 2:
        logger.warning("generate: %d of %d prompts got %d identical samples at temperature %g: the backend seems to "
                       "sample greedily (some servers ignore temperature), and the pairs stage drops identical "
                       "responses as ties", identical, answered, config.sampling.n, config.sampling.temperature)
    error_file = errors_path(output)
    if failed:
        write_jsonl(error_file, [{"id": i, "error": message, "retryable": retry} for i, message, retry in failed])
    else:
        error_file.unlink(missing_ok=True)
    samples = (len(todo) - len(failed)) * config.sampling.n
    if todo:
        print(f"generate: {len(todo) - len(failed)} prompts × {config.sampling.n} responses in {seconds:.1f} s "
              f"({tokens / max(seconds, 1e-9):.1f} tokens/s); {finished} of {samples} responses ended their turn, "
              f"the rest hit max_new_tokens -> {output}")
    else:
        print(f"generate: all {len(prompts)} prompts are already in {output}")
    if failed:
        first_id, first_error, _ = failed[0]
        retryable = sum(1 for *_, r in failed if r)
        if not retryable and len(failed) == len(todo):
            from rlhf_workflow.data.io import row_positions

            where = row_positions(config.prompts)[[p.id for p in prompts].index(first_id)]
            raise UserError(f"{where}: field 'prompt': {first_error}; no prompt of {config.prompts} can be answered "
                            f"(all {len(failed)} are listed in {error_file})")
        message = (f"{len(failed)} of {len(todo)} prompts got no responses (listed in {error_file}); "
                   f"first, prompt {first_id!r}: {first_error}")
        if retryable:
            raise UserError(message + f". {retryable} failed on the server side: run the same command again to retry them")
        logger.warning(message)
    return output
