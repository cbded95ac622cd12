"""What every training command (sft, train-rm, train-pm, dpo) does around the loop.

    job = start_job(config, resume=..., force=...)  # output dir locked and claimed, config.yaml, seed,
                                                    # tokenizer, length limit
    train_split, eval_split = read_splits(config, PairRow, tokenize)
    ... load the model, build the objective ...
    model = train(objective, model, train_split.examples, ...)  # the one loop
    finish_job(job, save, what, config, (train_split, eval_split))  # main process saves the model and
                                                                    # its card, checkpoints removed, unlocked

The saved ``output_dir/model`` is the job's one commit point: it appears complete (card
included) by a rename, and what comes after it only tidies up. A caller that finds it does not
train again, and removes the checkpoints in case a kill came between.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rlhf_workflow.config import TrainingCommandConfig, save_config
from rlhf_workflow.data.outputs import OutputLock, claim_directory, directory_owner
from rlhf_workflow.errors import UserError, config_key, model_source

log = logging.getLogger(__name__)


@dataclass
class TrainingJob:
    """A training command once started."""

    accelerator: Any
    output_dir: Path
    tokenizer: Any
    max_length: int  # tokens a training sequence may have (`length_limit`)
    limit: str  # how to name that limit in messages
    lock: OutputLock  # on output_dir, released by `finish_job`


def check_inputs(config: TrainingCommandConfig) -> None:
    """A `UserError` naming every input of ``config`` (its ``input_keys``) that is not there: a data file
    that does not exist (a Hub dataset name is not a file), a model or tokenizer source that names
    nothing loadable. Found before anything is written or loaded."""
    from rlhf_workflow.data.io import absent_file
    from rlhf_workflow.models.loading import resolve_source

    problems = []
    for key in config.input_keys:
        for path in config.paths_at(key):
            try:
                if key.endswith(("name_or_path", "tokenizer")):
                    with model_source(key):
                        resolve_source(path)
                elif absent_file(path):
                    raise UserError(f"{config_key(key)}: {path} does not exist")
            except UserError as exc:
                problems.append(str(exc))
    if problems:
        raise UserError("; ".join(problems))


def start_job(config: TrainingCommandConfig, *, resume: bool, force: bool,
                prepare_tokenizer: Callable[[Any], Any] | None = None) -> TrainingJob:
    """Lock and claim the output directory (`data.outputs`: ``resume`` continues this command's run
    there, ``force`` moves what is there aside), write the resolved config, seed, load the tokenizer
    (passed through ``prepare_tokenizer`` when given) and find the length limit."""
    from transformers import set_seed

    from rlhf_workflow.config import command_name
    from rlhf_workflow.models.loading import load_tokenizer
    from rlhf_workflow.processes import on_main
    from rlhf_workflow.train.checkpoint import remove_checkpoints
    from rlhf_workflow.train.loop import make_accelerator

    check_inputs(config)  # before the output directory is claimed: a failed start leaves no claim
    output_dir = Path(config.output_dir)
    accelerator = make_accelerator(config.train, output_dir)
    lock = OutputLock(output_dir, directory=True).acquire(accelerator)

    def claim() -> None:
        ours = directory_owner(output_dir) == command_name(config)  # (before a claim makes it so)
        claim_directory(output_dir, command_name(config), force=force, resume=resume)
        if resume and (output_dir / "model").is_dir():
            if ours:
                remove_checkpoints(output_dir)  # those a kill right after the model's save left
            raise UserError(f"{output_dir} holds a finished run (its model is in {output_dir / 'model'}): nothing to "
                            "resume; --force to train again (the old files are moved aside), or another output_dir")
        save_config(config, output_dir / "config.yaml")

    on_main(accelerator, claim)
    # the same seed everywhere: new heads and LoRA adapters start from the same weights every run
    set_seed(config.train.seed)
    with model_source("model.name_or_path"):
        tokenizer = load_tokenizer(config.model.tokenizer or config.model.name_or_path,
                                   trust_remote_code=config.model.trust_remote_code)
        if prepare_tokenizer is not None:
            tokenizer = prepare_tokenizer(tokenizer)
        max_length, limit = length_limit(config)
    return TrainingJob(accelerator, output_dir, tokenizer, max_length, limit, lock)


def _is_dropout(name: str, value: Any) -> bool:
    """A dropout probability by its name (``attention_dropout``, ``hidden_dropout_prob``, ``resid_pdrop``)."""
    return isinstance(value, float) and not isinstance(value, bool) and ("dropout" in name or "pdrop" in name)


def _zero_dropout_settings(holder: Any, seen: set[int]) -> int:
    """Set every nonzero dropout probability among ``holder``'s attributes to 0, and those of the model
    configs it holds (a multimodal config's text_config too); returns how many there were."""
    from transformers import PretrainedConfig

    if id(holder) in seen:
        return 0
    seen.add(id(holder))
    changed = 0
    for name, value in list(vars(holder).items()):
        if _is_dropout(name, value) and value > 0:
            setattr(holder, name, 0.0)
            changed += 1
        elif isinstance(value, PretrainedConfig):
            changed += _zero_dropout_settings(value, seen)
    return changed


def disable_dropout(model: Any) -> int:
    """Turn every dropout of ``model`` off; returns how many were on.

    Three kinds: `nn.Dropout` modules (p = 0; LoRA's dropout is one), probabilities that modules keep
    as attributes and pass to a functional dropout (Llama's attention keeps ``attention_dropout``),
    and the fields of the model's config, so that a saved model keeps dropout off as it was trained.
    """
    from torch import nn

    changed = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            module.p = 0.0
            changed += 1
        changed += _zero_dropout_settings(module, seen)
    return changed


def preference_training_model(model: Any, config: TrainingCommandConfig) -> Any:
    """The model a preference objective (dpo, train-rm, train-pm) trains: with its dropout off unless
    ``train.keep_dropout``. DPO's reference log-probs come from the model in eval mode (no dropout),
    so with dropout on, the policy would disagree with its own reference at step 0; a reward or
    preference model's pair of responses would be scored under different dropout masks. SFT keeps
    the model's dropout: it compares nothing to a reference, and dropout there is the plain
    regularizer its authors chose."""
    if config.train.keep_dropout:
        return model
    changed = disable_dropout(model)
    if changed:
        log.info("dropout turned off in %d places for training (%s=true keeps it)", changed, config_key("train.keep_dropout"))
    return model


class Dropped(list):
    """Rows a tokenizer dropped: ``(row index, field, why)``, in row order."""

    def add(self, index: int, field: str, why: str) -> None:
        self.append((index, field, why))


def nothing_usable(path: str, dropped: Dropped, what: str = "row") -> UserError:
    """The error for a split whose every row was dropped, naming the first one by file:line and field."""
    from rlhf_workflow.data.io import row_positions

    if not dropped:
        return UserError(f"{path}: no {what} is usable")
    index, field, why = dropped[0]
    return UserError(f"{row_positions(path)[index]}: field '{field}': {why}; no {what} of {path} is usable "
                     f"({len(dropped)} dropped)")


@dataclass
class Split:
    """The rows of a data file and the examples tokenized from them (dropped rows have none)."""

    rows: list[Any]
    examples: list[dict]


def read_split(path: str, schema: Any, tokenize: Callable[[list, str, Dropped], list[dict]], what: str = "row") -> Split:
    """Read and validate ``path``, then ``tokenize(rows, path, dropped)``; a split with nothing usable
    is a `UserError` naming the first dropped ``what`` by file:line and field."""
    from rlhf_workflow.data.io import read_rows

    rows = read_rows(path, schema)
    dropped = Dropped()
    examples = tokenize(rows, path, dropped)
    if not examples:
        raise nothing_usable(path, dropped, what)
    return Split(rows, examples)


def read_splits(config: TrainingCommandConfig, schema: Any, tokenize: Callable[[list, str, Dropped], list[dict]],
                what: str = "row") -> tuple[Split, Split | None]:
    """The training split (``data.train``) and the held-out one (``data.eval``, None when not given)."""
    train = read_split(config.data.train, schema, tokenize, what)  # type: ignore[arg-type]
    return train, read_split(config.data.eval, schema, tokenize, what) if config.data.eval else None


def length_limit(config: TrainingCommandConfig) -> tuple[int, str]:
    """The tokens a training sequence may have: ``data.max_length``, or the model's context when
    that is shorter (longer sequences would index positions the model never learned). Returns the
    limit and how to name it in messages."""
    from rlhf_workflow.models.loading import model_context

    context = model_context(config.model)
    if context is not None and config.data.max_length > context:
        key = config_key("data.max_length")
        log.warning("%s %d is longer than the model's context of %d tokens: sequences are limited to %d", key,
                    config.data.max_length, context, context)
        return context, f"the model's context of {context} tokens ({key} {config.data.max_length} is longer)"
    return config.data.max_length, f"{config_key('data.max_length')} {config.data.max_length}"


def finish_job(job: TrainingJob, save: Callable[[Path, dict[str, str]], None], what: str, config: TrainingCommandConfig,
                 splits: tuple[Split, Split | None]) -> Path:
    """Save the trained model on the main process with its model card (`models.card`: data of
    ``splits``, hyperparameters of ``config``, metrics) in one atomic write (``save(target,
    extra_files)``), drop the checkpoints it no longer needs, and release the output directory."""
    from rlhf_workflow.config import command_name
    from rlhf_workflow.models.card import model_card
    from rlhf_workflow.train.checkpoint import remove_checkpoints

    target = job.output_dir / "model"
    if job.accelerator.is_main_process:
        rows = {role: len(split.rows) for role, split in zip(("train", "eval"), splits) if split is not None}
        save(target, {"README.md": model_card(config, command_name(config), rows, job.output_dir / "metrics.jsonl")})
        remove_checkpoints(job.output_dir)
        job.accelerator.print(f"saved the {what} to {target}")
    job.accelerator.wait_for_everyone()
    job.lock.release()
    return target
