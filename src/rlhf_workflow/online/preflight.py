"""What `run` checks before its first stage, so that a recipe that cannot run fails in seconds with one
line instead of after minutes of sampling.

`check_run` reads the prompts (files or task) as the first stage will, finds every model the run
loads (the policy, its tokenizer, the feedback models' backbones, the judge) without loading one,
imports every function it calls (judge, gold, simulated human) and calls the gold and feedback
functions once on a prompt of the run, and holds each training batch against the most examples the
run can give it. Every problem found is told at once, each naming the key to change.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

from rlhf_workflow.config import ModelConfig, RunConfig, TrainConfig
from rlhf_workflow.data.io import absent_file
from rlhf_workflow.data.run_layout import RunLayout
from rlhf_workflow.errors import UserError, keys_named, model_source
from rlhf_workflow.online.loop import RunState, make_prompts

SINGLE_PAIR = ("max_min", "max_random", "random", "max_max")  # strategies that make one pair per prompt


def check_run(config: RunConfig, processes: int = 1) -> None:
    """A `UserError` listing every problem of ``config`` found before any stage runs (see the module)."""
    problems: list[str] = []

    def attempt(check: Callable[[], Any]) -> Any:
        try:
            return check()
        except UserError as exc:
            problems.append(str(exc))
            return None

    state = attempt(lambda: RunState(Path(config.output_dir)))  # its state.json must read as a run's
    if state is not None and _keeps_its_prompts(config, state):  # a run continued: its own copies of them
        prompts = attempt(lambda: _written_prompts(config))
    else:
        absent = _absent_files(config)
        problems += absent
        prompts = None if absent else attempt(lambda: make_prompts(config))
    for key, model in _models(config):
        attempt(lambda key=key, model=model: _model(key, model))
    judge_found = False
    if not config.feedback.enabled:
        from rlhf_workflow.online.judges import check_judge

        judge_found = attempt(lambda: check_judge(config.judge) or True) is not None
    if prompts is not None:
        eval_rows, chunks, feedback_rows = prompts
        if config.eval.gold_function:
            attempt(lambda: _scores(config.eval.gold_function, "eval.gold_function", eval_rows, "eval prompts"))
        if config.judge.type == "function" and judge_found and chunks and chunks[0]:  # (a failed import: told once)
            attempt(lambda: _scores(config.judge.function, "judge.function", chunks[0], "training prompts"))
        if config.feedback.enabled:
            attempt(lambda: _scores(config.feedback.judge_function, "feedback.judge_function", feedback_rows,
                                    "feedback prompts"))
        problems += _batches(config, chunks, feedback_rows, processes)
    if problems:
        raise UserError(f"{config.output_dir}: the recipe cannot run, nothing was started: " + "; ".join(problems))


def _keeps_its_prompts(config: RunConfig, state: RunState) -> bool:
    """Whether the run in output_dir has written its prompts and keeps them under ``config``: no key
    that feeds its first stage (`stages.plan`) changed, so a continued run, or one --force redoes
    from a later stage, reads its own copies rather than the recipe's files."""
    from rlhf_workflow.config import load_config
    from rlhf_workflow.stages import changed_keys, plan

    first = plan(config)[0]
    if first.name not in state.completed:
        return False
    try:
        held = load_config(RunConfig, RunLayout(config.output_dir).config)
    except (OSError, UserError, ValueError):
        return False  # the run's recipe does not read: the run itself says so; check the new one's files
    return not any(first.fed_by(key) for key in changed_keys(held, config))


def _written_prompts(config: RunConfig) -> tuple[list[dict], list[list[dict]], list[dict]]:
    """The prompts a continued run wrote in its first stage (its recipe's files may since have moved)."""
    from rlhf_workflow.data.io import iter_jsonl

    layout = RunLayout(config.output_dir)

    def rows(path: Path) -> list[dict]:
        return [row for _, row in iter_jsonl(path)] if path.exists() else []

    chunks = [rows(layout.iteration(t).prompts) for t in range(1, config.iterations + 1)]
    return rows(layout.eval_prompts), chunks, rows(layout.feedback.prompts)


def _absent_files(config: RunConfig) -> list[str]:
    """The prompts files the recipe names that are not there (a Hub dataset name is not a file)."""
    p = config.prompts
    if p.task is not None:
        return []
    named = [("prompts.train", p.train), ("prompts.eval", p.eval)] + [
        (f"prompts.train_per_iteration[{i}]", path) for i, path in enumerate(p.train_per_iteration)]
    return [f"{key}: {path} does not exist" for key, path in named
            if path and absent_file(path)]


def _models(config: RunConfig) -> list[tuple[str, ModelConfig]]:
    """(the key that names it, the model) of every model the run loads from a source the user gave."""
    models = [("policy", config.policy)]
    f = config.feedback
    if f.enabled:
        if f.rm.model is not None:
            models.append(("feedback.rm.model", f.rm.model))
        if (f.train_pm or f.judge == "pm") and f.pm.model is not None:
            models.append(("feedback.pm.model", f.pm.model))
    return models


def _model(key: str, model: ModelConfig) -> None:
    """The model and its tokenizer name something loadable (a causal LM where a local directory says)."""
    from rlhf_workflow.models.loading import check_loadable, resolve_source

    with keys_named({"model": key}), model_source("model.name_or_path"):
        source = resolve_source(model.name_or_path)
        if source.kind == "dir":
            check_loadable(model, source.location, causal_lm=True)
        if source.kind == "hub":
            _cached_offline(model.name_or_path)
    if model.tokenizer:
        with model_source(f"{key}.tokenizer"):
            tokenizer = resolve_source(model.tokenizer)
            if tokenizer.kind == "hub":
                _cached_offline(model.tokenizer)


def _cached_offline(repo: str) -> None:
    """With HF_HUB_OFFLINE set, a Hub id must be in the local cache: say so now rather than at loading."""
    from rlhf_workflow.errors import ModelSourceError

    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes"):
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(repo, "config.json"), str):
        raise ModelSourceError(f"model '{repo}' is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set")


def _scores(spec: str, key: str, rows: list[dict], what: str) -> None:
    """The function ``spec`` imports and scores the first of ``rows`` (an empty answer): a gold function
    of another task fails here, not as a null score for every prompt at the end."""
    from rlhf_workflow.online.judges import load_function

    function = load_function(spec, key)
    if not rows:
        return
    row = rows[0]
    try:
        value = function(row, "")
    except Exception as exc:  # the user's function: any failure is told with the prompt it failed on
        raise UserError(f"{key} {spec!r} cannot score the {what}: on prompt {row.get('id')!r} (an empty answer) it "
                        f"raised {type(exc).__name__}: {exc}; is it the judge of this task?") from None
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{key} {spec!r} gives {value!r} for prompt {row.get('id')!r} of the {what} (an empty "
                        "answer), not a number; is it the judge of this task?")


def _pairs_per_prompt(strategy: str, responses: int) -> int:
    """The most pairs one prompt's ``responses`` scored responses give under ``strategy``."""
    return 1 if strategy in SINGLE_PAIR else responses * (responses - 1) // 2


def _batches(config: RunConfig, chunks: list[list[dict]], feedback_rows: list[dict], processes: int) -> list[str]:
    """Each training step's global batch against the most examples the run can give it: a batch larger
    than that would stop the stage after its sampling and scoring."""
    problems = []

    def check(train: TrainConfig, key: str, most: int, unit: str, where: str) -> None:
        batch = train.per_device_batch_size * train.gradient_accumulation_steps * processes
        if batch > most:
            problems.append(
                f"{key}.per_device_batch_size {train.per_device_batch_size} × {key}.gradient_accumulation_steps "
                f"{train.gradient_accumulation_steps} × {processes} process{'es' if processes > 1 else ''} = {batch} "
                f"{unit} per step, more than the {most} {unit} {where}; lower {key}.per_device_batch_size")

    g = config.generation
    responses = g.sampling.n * max(1, len(g.temperatures)) * (1 + g.earlier_policies)
    per_prompt = _pairs_per_prompt(config.pairs.strategy, responses)
    if config.mode == "online" and chunks:
        smallest = min(len(chunk) for chunk in chunks)
        check(config.dpo.train, "dpo.train", smallest * per_prompt, "pairs",
              f"an iteration of {smallest} prompts gives at most ({config.pairs.strategy})")
    if config.mode == "offline" or config.offline.after_online:
        total = sum(len(chunk) for chunk in chunks) * _pairs_per_prompt(config.pairs.strategy, g.sampling.n)
        if config.offline.max_pairs:
            total = min(total, config.offline.max_pairs)
        check(config.dpo.train, "dpo.train", total, "pairs", "the offline baseline gets at most")
    f = config.feedback
    if f.enabled and feedback_rows:
        prompts = len(feedback_rows)
        pairs = prompts * _pairs_per_prompt(f.strategy, f.sampling.n)
        rm_examples = prompts if f.rm.group_by_prompt else pairs
        check(f.rm.train, "feedback.rm.train", rm_examples, "prompts" if f.rm.group_by_prompt else "pairs",
              f"the feedback's {prompts} prompts give the reward model at most")
        if f.train_pm or f.judge == "pm":
            check(f.pm.train, "feedback.pm.train", pairs, "pairs", f"the feedback's {prompts} prompts give the "
                  "preference model at most")
    return problems
